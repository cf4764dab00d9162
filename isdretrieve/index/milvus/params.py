"""Our FAISS factory strings as Milvus index kinds: one mapping, used by every Milvus build.

| factory | Milvus index | build parameters | search knob |
|---|---|---|---|
| ``Flat`` | ``FLAT`` (exact) | - | - |
| ``HNSW{M}`` | ``HNSW`` | M, efConstruction 40 (FAISS's default) | ``ef`` |
| ``HNSW{M},SQ8`` | ``HNSW_SQ`` | M, efConstruction 40, sq_type SQ8 | ``ef`` |
| ``IVF{n},Flat`` | ``IVF_FLAT`` | nlist n | ``nprobe`` |
| ``IVF{n},SQ8`` | ``IVF_SQ8`` | nlist n | ``nprobe`` |
| ``IVF{n}_HNSW{M},SQ8`` | ``IVF_SQ8`` | nlist n (Milvus searches its own centroids) | ``nprobe`` |
| ``IVF{n},PQ{m}`` | ``IVF_PQ`` | nlist n, m, nbits 8 (a cluster has it, milvus-lite does not) | ``nprobe`` |

Anything else (pre-transforms, refinement, other codes) has no Milvus equivalent and is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from isdretrieve.errors import IsdError
from isdretrieve.index.faiss_ops import EF_SEARCH

METRIC = "IP"  # inner product: cosine on the bank's unit rows, as in FAISS
EF_CONSTRUCTION = 40  # FAISS's HNSW default, so both backends build the same graph quality
SUPPORTED = "Flat, HNSW{M}, HNSW{M},SQ8, IVF{n},Flat, IVF{n},SQ8, IVF{n}_HNSW{M},SQ8 or IVF{n},PQ{m}"


@dataclass(frozen=True)
class MilvusIndexSpec:
    """A Milvus index: its type, build parameters, and the search knob with the values tuning tries."""

    index_type: str
    build: dict[str, Any] = field(default_factory=dict)
    knob: str | None = None  # "nprobe", "ef", or None (FLAT: exact)
    nlist: int = 0
    note: str = ""

    @property
    def exact(self) -> bool:
        return self.index_type == "FLAT"

    def index_params(self) -> dict[str, Any]:
        """What ``create_index`` takes for the embedding field."""
        return {"index_type": self.index_type, "metric_type": METRIC, "params": dict(self.build)}

    def search_params(self, params: dict[str, int]) -> dict[str, Any]:
        """What ``search`` takes: the metric and the tuned knob (``{"nprobe": 16}``, ``{"ef": 64}``)."""
        return {"metric_type": METRIC, "params": dict(params)}

    def knob_values(self, k: int) -> list[int]:
        """The knob's values to try, lowest first: nprobe 1, 2, 4 ... nlist; ef 16 ... 2048, at least k."""
        if self.knob == "nprobe":
            return sorted({min(2**i, self.nlist) for i in range(self.nlist.bit_length() + 1)})
        if self.knob == "ef":
            return sorted({max(ef, k) for ef in EF_SEARCH})
        return []


def milvus_index(factory: str) -> MilvusIndexSpec:
    """The Milvus index for one of our factory strings; any other string is an IsdError (one line)."""
    text = factory.replace(" ", "")
    if text == "Flat":
        return MilvusIndexSpec("FLAT")
    if match := re.fullmatch(r"HNSW(\d+)(,SQ8)?", text):
        build: dict[str, Any] = {"M": int(match[1]), "efConstruction": EF_CONSTRUCTION}
        if match[2]:
            return MilvusIndexSpec("HNSW_SQ", {**build, "sq_type": "SQ8"}, "ef")
        return MilvusIndexSpec("HNSW", build, "ef")
    if match := re.fullmatch(r"IVF(\d+)(_HNSW\d+)?,(Flat|SQ8|PQ(\d+))", text):
        nlist, code = int(match[1]), match[3]
        note = (
            "the HNSW coarse quantizer is FAISS's: Milvus searches its own nlist centroids"
            if match[2]
            else ""
        )
        if match[2] and code != "SQ8":
            raise IsdError(f"index {factory!r} has no Milvus equivalent: use {SUPPORTED}")
        if code == "Flat":
            return MilvusIndexSpec("IVF_FLAT", {"nlist": nlist}, "nprobe", nlist)
        if code == "SQ8":
            return MilvusIndexSpec("IVF_SQ8", {"nlist": nlist}, "nprobe", nlist, note)
        build = {"nlist": nlist, "m": int(match[4]), "nbits": 8}
        return MilvusIndexSpec("IVF_PQ", build, "nprobe", nlist)
    raise IsdError(f"index {factory!r} has no Milvus equivalent: use {SUPPORTED}")
