"""What the service holds: its settings and each index it serves, found by name from a request."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from starlette.exceptions import HTTPException

from isdretrieve.files.pairs import Pairs
from isdretrieve.retrieve.retriever import Retriever
from isdretrieve.serve.batcher import EncodeBatcher

MAX_K = 1000  # neighbours per query; the bank's size bounds it further
MAX_SAMPLE = 500  # random rows per request


@dataclass(frozen=True)
class ServeSettings:
    """Limits and the token. ``max_upload_bytes`` and ``max_pixels`` apply to each uploaded image."""

    token: str | None = None
    max_upload_bytes: int = 8 << 20
    max_pixels: int = 40_000_000
    max_files: int = 16
    max_batch: int = 64

    @property
    def max_body(self) -> int:
        """The largest request body: ``max_files`` images at the cap plus room for the form's fields."""
        return self.max_files * self.max_upload_bytes + (64 << 10)


@dataclass(frozen=True)
class DamagedIndex:
    """An index directory that could not be opened because a file of it is damaged: ``error`` says which.
    It is listed, and every request for it is answered 503 with that line, while the others serve."""

    path: Path
    error: str


@dataclass
class ServedIndex:
    """One index as served: its name, retriever, encoder batcher (None without encoder.pt), pairs files;
    ``damage`` (the error line) when its files are damaged, with no retriever."""

    name: str
    retriever: Retriever
    batcher: EncodeBatcher | None
    pairs_files: dict[str, Path]
    damage: str = ""
    _pairs: dict[str, Pairs] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def pairs(self, name: str) -> Pairs:
        """The pairs file ``name`` of this index, opened once; 404 for a name it does not have."""
        if name not in self.pairs_files:
            raise HTTPException(404, f"index {self.name!r} has no pairs file {name!r}")
        with self._lock:
            if name not in self._pairs:
                self._pairs[name] = Pairs.open(self.pairs_files[name])
            return self._pairs[name]


async def served_index(name: str, request: Request) -> ServedIndex:
    """The index a route's ``{name}`` names (a FastAPI dependency); 404 for an unknown name."""
    served: dict[str, ServedIndex] = request.app.state.served
    if name not in served:
        raise HTTPException(404, f"unknown index {name!r}: serving {', '.join(sorted(served))}")
    if served[name].damage:
        raise HTTPException(503, f"index {name!r} is damaged: {served[name].damage}")
    return served[name]


async def settings_of(request: Request) -> ServeSettings:
    """The service's settings (a FastAPI dependency)."""
    return request.app.state.settings
