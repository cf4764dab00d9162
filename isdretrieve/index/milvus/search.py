"""An index directory of the Milvus backend opened for search (:class:`MilvusIndex`): the collection its
manifest names, searched with the tuned parameters, behind the one index interface; the directory's bank
is where labels, paths and thumbnails come from."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from isdretrieve.errors import BankError, IsdError
from isdretrieve.files.bank import FeatureBank
from isdretrieve.files.manifest import (
    BACKEND_MILVUS,
    BANK_FILE,
    IndexManifest,
    check_bank_fingerprint,
    read_manifest,
)
from isdretrieve.index.backend import LabelFilter, VectorIndex, pad_hits, widen_for_filter
from isdretrieve.index.milvus.collection import BankCollection
from isdretrieve.index.milvus.connect import Connection, MilvusTarget, connect
from isdretrieve.index.milvus.params import MilvusIndexSpec, milvus_index


def target_of(manifest: IndexManifest) -> MilvusTarget:
    """Where a Milvus index directory's collection is (its token read again from the named variable)."""
    recorded = manifest.milvus
    try:
        return MilvusTarget(recorded["uri"], recorded["collection"], recorded.get("token_env"))
    except (KeyError, TypeError):
        raise IsdError("the manifest of a Milvus index lacks its uri or collection") from None


class MilvusIndex(VectorIndex):
    """A Milvus index directory, opened for search: ``manifest``, ``bank``, ``search`` and ``recall``."""

    def __init__(
        self,
        directory: Path,
        manifest: IndexManifest,
        bank: FeatureBank,
        conn: Connection,
        collection: BankCollection,
    ) -> None:
        self.directory, self.manifest, self.bank = directory, manifest, bank
        self.conn, self.collection = conn, collection
        self.spec: MilvusIndexSpec = milvus_index(manifest.factory)
        self._search_params = self.spec.search_params(manifest.params)
        self._labels: np.ndarray | None = None

    @classmethod
    def open(cls, index_dir: str | Path) -> MilvusIndex:
        """Open ``index_dir`` and reach its collection; a bank or a collection that does not match the
        manifest is a BankError, a Milvus that is down or refuses a MilvusUnavailable."""
        directory = Path(index_dir)
        manifest = read_manifest(directory)
        if manifest.backend != BACKEND_MILVUS:
            raise IsdError(f"{directory} is a {manifest.backend} index, not a Milvus one")
        bank = FeatureBank.open(directory / BANK_FILE)
        conn = None
        try:
            check_bank_fingerprint(directory, manifest, bank.fingerprint)
            if len(bank) != manifest.count or bank.dim != manifest.dim:
                raise BankError(f"bank {directory / BANK_FILE} does not have the manifest's rows: rebuild")
            conn = connect(target_of(manifest), directory)
            collection = BankCollection.open(conn)
            collection.check_holds(bank)
            collection.load()
        except BaseException:
            if conn is not None:
                conn.close()
            bank.close()
            raise
        return cls(directory, manifest, bank, conn, collection)

    def search_unit(self, x: np.ndarray, k: int, filter: LabelFilter | None) -> tuple[np.ndarray, np.ndarray]:
        """Milvus search of unit queries. A label filter is a boolean expression on ``label``, and the
        knob is widened for it as on FAISS; a list can still come back short (row -1): unlike FAISS there
        is no exact fallback here, the collection may hold far more than this machine could scan."""
        if filter is None:
            return pad_hits(self.collection.search(x, k, self._search_params, None), k)
        params = dict(self.manifest.params)
        if self.spec.knob in params:
            most = self.spec.nlist if self.spec.knob == "nprobe" else len(self)
            passing = filter.passing(self.labels)
            params[self.spec.knob] = widen_for_filter(self.spec.knob, params[self.spec.knob], passing, most)
        hits = self.collection.search(x, k, self.spec.search_params(params), filter.expression())
        return pad_hits(hits, k)

    @property
    def labels(self) -> np.ndarray:
        """Every bank row's label (read once, for label filters)."""
        if self._labels is None:
            self._labels = self.bank.labels()
        return self._labels

    def close(self) -> None:
        self.conn.close()
        self.bank.close()
