"""A bank's Milvus collection: its schema, the bank's identity in its properties, its vector index, and
the one search call.

Fields: ``row`` (INT64, the primary key: the bank's row number, which every backend returns),
``embedding`` (FLOAT_VECTOR [D], searched by inner product), ``label`` (INT64, -1 unlabelled; the label
filter), ``index`` (INT64, the dataset index) and ``path`` (VARCHAR). These are also the columns of
``isd-index export --format parquet``, so that file is what a Milvus bulk import reads. Properties
(strings): ``isdretrieve.fingerprint``, ``.data_spec``, ``.count``, ``.dim``, ``.classes`` (JSON), and
while rows are inserted ``.rows_done`` and ``.block_rows`` (:mod:`~isdretrieve.index.milvus.fill`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from isdretrieve.errors import BankError, IsdError
from isdretrieve.files.bank import FeatureBank
from isdretrieve.index.milvus.connect import Connection, pymilvus_module
from isdretrieve.index.milvus.params import MilvusIndexSpec

ROW, EMBEDDING, LABEL, INDEX, PATH = "row", "embedding", "label", "index", "path"
PREFIX = "isdretrieve."
FINGERPRINT, DATA_SPEC, COUNT, DIM, CLASSES = (
    PREFIX + name for name in ("fingerprint", "data_spec", "count", "dim", "classes")
)
ROWS_DONE, BLOCK_ROWS = PREFIX + "rows_done", PREFIX + "block_rows"
PATH_MAX = 65_535  # Milvus's longest VARCHAR
MAX_K = 16_384  # Milvus's largest topk and number of queries a search
QUERY_BATCH = 1024  # queries sent in one search call


def bank_schema(dim: int, path_bytes: int) -> Any:
    """The collection schema for a bank of ``dim``-wide rows whose longest path has ``path_bytes``."""
    pymilvus = pymilvus_module()
    FieldSchema, DataType = pymilvus.FieldSchema, pymilvus.DataType
    if path_bytes > PATH_MAX:
        raise BankError(f"a bank path of {path_bytes:,} bytes is longer than Milvus keeps ({PATH_MAX:,})")
    fields = [
        FieldSchema(ROW, DataType.INT64, is_primary=True, auto_id=False, description="bank row"),
        FieldSchema(EMBEDDING, DataType.FLOAT_VECTOR, dim=dim, description="unit feature row"),
        FieldSchema(LABEL, DataType.INT64, description="class label, -1 unlabelled"),
        FieldSchema(INDEX, DataType.INT64, description="dataset index"),
        FieldSchema(PATH, DataType.VARCHAR, max_length=min(PATH_MAX, max(256, 2 * path_bytes))),
    ]
    return pymilvus.CollectionSchema(fields, description="isdretrieve feature bank")


def bank_properties(bank: FeatureBank) -> dict[str, str]:
    """The bank's identity as collection properties."""
    return {
        FINGERPRINT: bank.fingerprint,
        DATA_SPEC: bank.data_spec,
        COUNT: str(len(bank)),
        DIM: str(bank.dim),
        CLASSES: json.dumps(bank.classes),
    }


class BankCollection:
    """One bank's collection, reached through an open :class:`Connection`."""

    def __init__(self, conn: Connection, collection: Any) -> None:
        self.conn, self._collection = conn, collection

    @property
    def name(self) -> str:
        return self.conn.target.collection

    @classmethod
    def find(cls, conn: Connection) -> BankCollection | None:
        """The target's collection, or None where the Milvus has none of that name."""
        pymilvus = pymilvus_module()
        with conn.errors("looking up the collection"):
            if not pymilvus.utility.has_collection(conn.target.collection, using=conn.alias):
                return None
            return cls(conn, pymilvus.Collection(conn.target.collection, using=conn.alias))

    @classmethod
    def open(cls, conn: Connection) -> BankCollection:
        """The target's collection; an IsdError where it does not exist."""
        found = cls.find(conn)
        if found is None:
            raise IsdError(f"Milvus at {conn.target.safe_uri} has no collection {conn.target.collection!r}")
        return found

    @classmethod
    def create(cls, conn: Connection, bank: FeatureBank, extra: dict[str, str]) -> BankCollection:
        """A new collection for ``bank`` with its identity (and ``extra``) as properties."""
        pymilvus = pymilvus_module()
        longest = max((len(p.encode()) for p in bank.paths()), default=0)
        schema = bank_schema(bank.dim, longest)
        with conn.errors("creating the collection"):
            collection = pymilvus.Collection(
                conn.target.collection,
                schema,
                using=conn.alias,
                consistency_level="Strong",
                properties={**bank_properties(bank), **extra},
            )
        return cls(conn, collection)

    def properties(self) -> dict[str, str]:
        with self.conn.errors("describing the collection"):
            found = self._collection.describe().get("properties") or {}
        return {str(key): str(value) for key, value in dict(found).items()}

    def set_properties(self, values: dict[str, str]) -> None:
        with self.conn.errors("setting collection properties"):
            self._collection.set_properties(values)

    def check_fields(self, dim: int) -> None:
        """IsdError unless it has ``row`` (INT64 primary key), ``embedding`` [dim] and ``label`` (INT64)."""
        DataType = pymilvus_module().DataType
        fields = {f.name: f for f in self._collection.schema.fields}
        row, vector, label = fields.get(ROW), fields.get(EMBEDDING), fields.get(LABEL)
        ok = row is not None and row.is_primary and row.dtype == DataType.INT64
        ok = ok and vector is not None and vector.dtype == DataType.FLOAT_VECTOR
        ok = ok and int((vector.params or {}).get("dim", -1)) == dim
        ok = ok and label is not None and label.dtype == DataType.INT64
        if not ok:
            raise IsdError(
                f"collection {self.name!r} does not have the bank's fields: {ROW} (INT64 primary key), "
                f"{EMBEDDING} (FLOAT_VECTOR of {dim}) and {LABEL} (INT64)"
            )

    def check_holds(self, bank: FeatureBank) -> None:
        """IsdError unless the collection's properties name ``bank``: the fingerprint (its encoder), the
        data SPEC, the number of rows and their dimension."""
        found = self.properties()
        if FINGERPRINT not in found:
            raise IsdError(
                f"collection {self.name!r} was not made from an isdretrieve bank: choose another "
                "--collection, or attach it with isd-index attach"
            )
        wanted = bank_properties(bank)
        keys = (FINGERPRINT, DATA_SPEC, COUNT, DIM)
        if any(found.get(key, "") != wanted[key] for key in keys):
            theirs = ", ".join(found.get(key, "?") or "-" for key in keys)
            ours = ", ".join(wanted[key] or "-" for key in keys)
            raise BankError(
                f"collection {self.name!r} holds another bank (fingerprint, data, rows, dim: {theirs}; "
                f"this bank: {ours}): choose another --collection, or drop that one"
            )

    def insert(self, columns: list[Any], replace: bool) -> int:
        """Insert (or, with ``replace``, upsert) one block of columns; returns the rows Milvus confirmed."""
        with self.conn.errors("inserting rows"):
            if replace:
                return int(self._collection.upsert(columns).upsert_count)
            return int(self._collection.insert(columns).insert_count)

    def flush(self) -> None:
        with self.conn.errors("flushing"):
            self._collection.flush()

    def count(self) -> int:
        """The rows the collection holds (it must be loaded)."""
        with self.conn.errors("counting rows"):
            found = self._collection.query(expr="", output_fields=["count(*)"])
        return int(found[0]["count(*)"])

    def rows(self, rows: np.ndarray) -> dict[int, tuple[np.ndarray, int]]:
        """The stored embedding and label of each of ``rows`` (the collection must be loaded)."""
        expr = f"{ROW} in [{', '.join(str(int(r)) for r in rows)}]"
        with self.conn.errors("reading rows"):
            found = self._collection.query(expr=expr, output_fields=[ROW, EMBEDDING, LABEL])
        return {int(f[ROW]): (np.asarray(f[EMBEDDING], np.float32), int(f[LABEL])) for f in found}

    def ensure_index(self, spec: MilvusIndexSpec) -> None:
        """Give the embedding field ``spec``'s index (replacing another one) and load the collection."""
        wanted = spec.index_params()
        with self.conn.errors(f"building the {spec.index_type} index"):
            current = [i for i in self._collection.indexes if i.field_name == EMBEDDING]
            if current and _same_index(current[0].params, wanted):
                self._collection.load()
                return
            self._collection.release()
            for index in current:
                self._collection.drop_index(index_name=index.index_name)
            self._collection.create_index(EMBEDDING, wanted)
            if not any(i.field_name == LABEL for i in self._collection.indexes):
                self._collection.create_index(LABEL, {"index_type": "INVERTED"})
            self._collection.load()

    def load(self) -> None:
        with self.conn.errors("loading the collection"):
            self._collection.load()

    def search(
        self, x: np.ndarray, k: int, params: dict[str, Any], expr: str | None
    ) -> list[list[tuple[int, float]]]:
        """(row, score) lists of the top-k of each query, in batches of QUERY_BATCH queries."""
        if k > MAX_K:
            raise IsdError(f"Milvus returns at most {MAX_K:,} neighbours a query, asked for {k:,}")
        found: list[list[tuple[int, float]]] = []
        with self.conn.errors("searching"):
            for start in range(0, len(x), QUERY_BATCH):
                result = self._collection.search(
                    x[start : start + QUERY_BATCH], EMBEDDING, params, limit=k, expr=expr or None
                )
                found += [list(zip(hits.ids, hits.distances, strict=True)) for hits in result]
        return found

    def drop(self) -> None:
        with self.conn.errors("dropping the collection"):
            self._collection.drop()


def _same_index(current: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether an existing index's parameters are those wanted (types and build parameters compared)."""
    params = current.get("params") or {
        k: v for k, v in current.items() if k not in ("index_type", "metric_type")
    }
    if isinstance(params, str):
        params = json.loads(params)
    same_type = str(current.get("index_type")) == wanted["index_type"]
    same_metric = str(current.get("metric_type")) == wanted["metric_type"]
    return (
        same_type
        and same_metric
        and {k: str(v) for k, v in params.items()} == {k: str(v) for k, v in wanted["params"].items()}
    )
