"""Atomic file writes: write a temp file next to the target, fsync it, then rename it over the target.

A crash or a full disk at any moment leaves either the previous file or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's) data to disk; silently skipped where the file system cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def names_file(path: str | Path) -> Iterator[None]:
    """Re-raise an OSError that names no file (a failed write: disk full) as one that names ``path``."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


def temp_path(path: Path) -> Path:
    """The temporary name a file is written under before it replaces ``path`` (beside it, hidden)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def commit(tmp: Path, path: Path) -> None:
    """Make the finished temp file ``tmp`` the file ``path``: fsync it, rename it over, fsync the folder."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with names_file(path):  # a failed write (disk full) names no file: name the one being written
            yield tmp
            commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def link_or_copy(source: Path, target: Path) -> None:
    """Make ``target`` the file at ``source``: a hard link where possible, else a copy, put in place
    atomically (nothing is done when they are already the same file).

    A link is safe for a bank: a complete bank is never written in place (exports only resume
    incomplete ones)."""
    if target.exists() and os.path.samefile(source, target):
        return
    with atomic_path(target) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
