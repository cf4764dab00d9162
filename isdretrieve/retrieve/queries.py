"""Queries: what a query is, what it found, and how query SPECs name queries.

A query is a bank row (an ``int``; the row is left out of its own neighbours), an image file, a folder
(every image under it, sorted) or a PIL image. :meth:`isdretrieve.retrieve.retriever.Retriever.neighbours`
turns queries into :class:`NeighbourResult` s; :mod:`isdretrieve.retrieve.report` draws them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from isdretrieve.data.specs import IMAGE_EXTENSIONS
from isdretrieve.errors import DataError, QueryError
from isdretrieve.retrieve.hits import Hit

QueryItem = int | str | Path | Image.Image
_ROWS = re.compile(r"^\s*-?\d+(\s*,\s*-?\d+)*\s*,?\s*$")


@dataclass(frozen=True)
class NeighbourQuery:
    """One query: how it was given, its bank row and dataset index (None for images), label, path."""

    source: str  # "row 17", the image file as given, or "image 3" for an in-memory image
    row: int | None
    index: int | None
    label: int  # -1 when unknown (always for images)
    path: str  # the row's bank path, the image file, or "" for an in-memory image
    image: Image.Image | None = field(default=None, repr=False, compare=False)  # in-memory images only


@dataclass(frozen=True)
class NeighbourResult:
    """A query and its neighbours, best first."""

    query: NeighbourQuery
    hits: tuple[Hit, ...]


def parse_query_spec(spec: str) -> list[QueryItem]:
    """A CLI query SPEC as queries: ``0,17,42`` or ``rows:0,17`` (bank rows), an image file or a folder.

    A SPEC of numbers always means bank rows; write ``./17`` for a file named ``17``.
    """
    if not spec.strip():
        raise QueryError("empty query SPEC: give bank rows like 0,17,42, an image file or a folder")
    text = spec.removeprefix("rows:")
    if text != spec or _ROWS.match(text):
        parts = [p for p in text.replace(" ", "").split(",") if p]
        if not parts or not all(re.fullmatch(r"-?\d+", p) for p in parts):
            raise QueryError(f"bad row list {spec!r}: expected rows like 0,17,42")
        return [int(p) for p in parts]
    return expand_queries([Path(spec)])


def folder_images(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (hidden files and folders skipped), sorted by path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [
            Path(dirpath) / f
            for f in filenames
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        ]
    return sorted(found)


def expand_queries(queries: QueryItem | Sequence[QueryItem]) -> list[QueryItem]:
    """Queries with folders replaced by their images; a missing path or an empty folder is a DataError."""
    items = [queries] if isinstance(queries, (int, str, Path, Image.Image, np.integer)) else list(queries)
    out: list[QueryItem] = []
    for item in items:
        if isinstance(item, (bool, np.bool_)):
            raise QueryError(f"a query must be a bank row, an image path or a PIL image, got {item!r}")
        if isinstance(item, (int, np.integer)):
            out.append(int(item))
        elif isinstance(item, Image.Image):
            out.append(item)
        elif isinstance(item, (str, Path)):
            path = Path(item)
            if path.is_dir():
                images = folder_images(path)
                if not images:
                    raise DataError(f"query folder {path} holds no images")
                out += images
            elif path.is_file():
                out.append(path)
            else:
                raise DataError(f"query image not found: {path}")
        else:
            raise QueryError(f"a query must be a bank row, an image path or a PIL image, got {item!r}")
    if not out:
        raise QueryError("no queries given")
    return out
