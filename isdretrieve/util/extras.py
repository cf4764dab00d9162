"""Optional dependencies, imported where they are used, with the extra to install when they are missing."""

from __future__ import annotations

from typing import Any

from isdretrieve.errors import EmbeddingsError


def pyarrow_module() -> Any:
    """pyarrow (with its parquet module), or an EmbeddingsError naming the extra to install."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (loads pyarrow.parquet as an attribute of pyarrow)
    except ImportError:
        raise EmbeddingsError("parquet needs pyarrow: pip install 'isdretrieve[parquet]'") from None
    return pyarrow
