"""HDF5 helpers shared by the bank and pairs files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np


def attr_value(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (bytes decoded, NumPy scalars and arrays unwrapped)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def open_h5(path: Path, mode: str = "r") -> h5py.File:
    """Open for reading without HDF5's file lock (so a running export can be inspected), or for writing."""
    if mode == "r":
        try:
            return h5py.File(path, "r", locking=False)
        except (TypeError, ValueError):  # an HDF5 library without the locking switch
            return h5py.File(path, "r")
    return h5py.File(path, mode)
