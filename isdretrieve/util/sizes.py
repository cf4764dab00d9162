"""Sizes written by people: ``512MB``, ``4G``, ``1.5GiB``."""

from __future__ import annotations

import re

from isdretrieve.errors import InvalidArgument

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'512MB', '4G', '1.5GiB', '1000000' -> bytes (powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise InvalidArgument(f"bad size '{text}': expected e.g. 512MB or 4G")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2).lower() or "_"))
