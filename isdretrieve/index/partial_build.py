"""The saved progress of an on-disk index build (``ondisk.partial/``), each file pinned when it lands.

``build.json`` holds the settings the build was started with, the training row count, and for every
file written so far (the trained index, each finished shard) its size and CRC-32. A rerun with the same
settings reuses a file only when both still match; a file that is missing from the record, truncated,
grown or changed is discarded with a warning and made again (the trained index retrained, a shard
refilled), so a damaged file is never handed to FAISS. CRC-32 (``zlib.crc32``, several GB/s) is computed
from the page cache right after the file is written, and again only when a rerun reuses the file.
"""

from __future__ import annotations

import json
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Any

from isdretrieve.files.atomic import atomic_path

PARTIAL_DIR = "ondisk.partial"
STATE_FILE = "build.json"
READ_BYTES = 16 << 20


def file_crc32(path: Path) -> int:
    """CRC-32 of a file's bytes, read 16 MiB at a time."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(READ_BYTES):
            crc = zlib.crc32(chunk, crc)
    return crc


class PartialBuild:
    """``ondisk.partial/`` of a build with given settings (one made with other settings is removed)."""

    def __init__(self, out_dir: Path, settings: dict[str, Any]) -> None:
        self.folder = out_dir / PARTIAL_DIR
        self.state: dict[str, Any] = {"settings": settings, "files": {}}
        if self.folder.exists():
            found = self._read()
            if found.get("settings") == settings and isinstance(found.get("files"), dict):
                self.state = found
            else:
                shutil.rmtree(self.folder)
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            self._write()

    def _read(self) -> dict[str, Any]:
        try:
            found = json.loads((self.folder / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def _write(self) -> None:
        with atomic_path(self.folder / STATE_FILE) as tmp:
            tmp.write_text(json.dumps(self.state, indent=2) + "\n")

    def path(self, name: str) -> Path:
        return self.folder / name

    def intact(self, name: str) -> bool:
        """Whether ``name`` was recorded and still has its size and CRC-32; a damaged one is removed."""
        path, record = self.path(name), self.state["files"].get(name)
        if not path.is_file():
            return False
        same_size = isinstance(record, dict) and path.stat().st_size == record.get("bytes")
        if same_size and file_crc32(path) == record.get("crc32"):
            return True
        message = f"discarding {path}: not the file the build wrote (damaged?); making it again"
        warnings.warn(message, stacklevel=3)
        path.unlink()
        self.state["files"].pop(name, None)
        return False

    def discard_files(self) -> None:
        """Remove every recorded file (the trained index is made again: shards filled from the old one
        would not match it)."""
        for name in list(self.state["files"]):
            self.path(name).unlink(missing_ok=True)
        self.state["files"] = {}
        self._write()

    def record(self, name: str, **values: Any) -> None:
        """Pin the file ``name`` just written (its size and CRC-32), with other ``values`` of the state."""
        path = self.path(name)
        self.state["files"][name] = {"bytes": path.stat().st_size, "crc32": file_crc32(path)}
        self.state.update(values)
        self._write()

    def remove(self) -> None:
        shutil.rmtree(self.folder)
