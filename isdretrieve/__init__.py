"""isdretrieve: train ISD-family self-supervised encoders and search their feature banks."""

from isdretrieve.errors import IsdError

__version__ = "0.1.0"
__all__ = ["IsdError", "__version__"]
