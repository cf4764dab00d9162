"""``isd-index``: feature banks and FAISS indices (build, info, neighbours, mine, recall)."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Build and use feature banks and FAISS indices (coming with the index issue)."""
