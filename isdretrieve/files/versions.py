"""The versions of the packages that made a file, read from their metadata (nothing is imported)."""

from __future__ import annotations

from importlib import metadata

from isdretrieve.version import __version__

DISTRIBUTIONS = {"faiss": ("faiss-cpu", "faiss-gpu", "faiss")}  # one import name, several wheels


def package_versions(*packages: str) -> dict[str, str]:
    """``{"isdretrieve": ..., package: version, ...}`` by import name; one not installed is left out."""
    found = {"isdretrieve": __version__}
    for name in packages:
        for distribution in DISTRIBUTIONS.get(name, (name,)):
            try:
                found[name] = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
    return found
