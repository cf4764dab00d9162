"""``isd-knn``: k-NN classification over feature banks."""

from __future__ import annotations

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """k-NN evaluation over feature banks (coming with the index issue)."""
    raise click.UsageError("isd-knn needs feature banks, which arrive with the index issue")
