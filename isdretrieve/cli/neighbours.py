"""``isd-index neighbours``: the nearest neighbours of queries as a terminal table and a PNG/HTML report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from isdretrieve.cli.common import (
    CONTEXT,
    NON_NEGATIVE,
    POSITIVE,
    emit,
    json_option,
    user_errors,
    verbose_option,
)

if TYPE_CHECKING:
    from rich.table import Table

    from isdretrieve.retrieve.queries import NeighbourResult

TABLE_QUERIES = 20  # queries shown in the terminal; the report has all of them
TABLE_HITS = 5  # neighbours shown per query in the terminal


@click.command(context_settings=CONTEXT)
@click.argument("index_dir", type=click.Path(path_type=Path))
@click.option(
    "--query",
    "specs",
    multiple=True,
    metavar="SPEC",
    help="Bank rows (0,17,42 or rows:0,17), an image file, or a folder of images; repeatable.",
)
@click.option("--sample", type=POSITIVE, help="Use N bank rows drawn at random as the queries.")
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True, help="Seed of --sample.")
@click.option("-k", type=POSITIVE, default=10, show_default=True, help="Neighbours per query.")
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Report folder (index.html, PNG pages)."
)
@click.option("--per-page", type=POSITIVE, default=8, show_default=True, help="Queries per PNG page.")
@click.option(
    "--map",
    "map_rows",
    type=click.IntRange(min=0),
    default=0,
    help="Add map.png: a 2-D map of N bank rows coloured by class (0: none).",
)
@click.option(
    "--map-method",
    type=click.Choice(["auto", "umap", "tsne"]),
    default="auto",
    show_default=True,
    help="auto: UMAP when umap-learn is installed, else PCA + t-SNE.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Device that embeds image queries.",
)
@json_option
@verbose_option
@user_errors
def neighbours(
    index_dir: Path,
    specs: tuple[str, ...],
    sample: int | None,
    seed: int,
    k: int,
    out: Path,
    per_page: int,
    map_rows: int,
    map_method: str,
    device: str,
    as_json: bool,
) -> None:
    """Show the k nearest bank rows of each query and write a PNG/HTML report to OUT.

    Bank-row queries leave the row itself out; neighbours of another class than the query are marked.
    """
    import torch
    from rich.console import Console

    from isdretrieve.errors import QueryError
    from isdretrieve.retrieve.queries import parse_query_spec
    from isdretrieve.retrieve.report import neighbours_report
    from isdretrieve.retrieve.retriever import Retriever

    if bool(specs) == (sample is not None):
        raise click.UsageError("give --query SPEC (repeatable) or --sample N")
    if device == "cuda" and not torch.cuda.is_available():
        raise QueryError("--device cuda: no CUDA device is available")
    with Retriever.open(index_dir, device=device) as retriever:
        queries = (
            retriever.sample_rows(sample, seed)
            if sample is not None
            else [q for spec in specs for q in parse_query_spec(spec)]
        )
        results, report = neighbours_report(
            retriever, queries, out, k=k, per_page=per_page, map_rows=map_rows, map_method=map_method
        )
        classes = retriever.classes
    wrong = sum(h.label_differs is True for r in results for h in r.hits)
    known = sum(h.label_differs is not None for r in results for h in r.hits)
    pages = len(report.pages)
    result = {
        "report": report.index_html,
        "pages": report.pages,
        "queries": len(results),
        "k": k,
        "labelled_neighbours": known,
        "other_class_neighbours": wrong,
        "missing_images": report.missing,
        "map": report.directory / "map.png" if map_rows else None,
        "results": [
            {
                "query": r.query.source,
                "label": r.query.label,
                "hits": [{"row": h.row, "score": h.score, "label": h.label, "path": h.path} for h in r.hits],
            }
            for r in results
        ],
    }
    if report.missing:  # a warning: stderr, with or without --json
        why = f" ({report.problem})" if report.problem else ""
        Console(stderr=True).print(
            f"warning: {report.missing} images not found, drawn as placeholders{why}",
            style="yellow",
            markup=False,
        )

    def show() -> None:
        Console().print(_table(results, classes, k))
        if known:
            click.echo(f"{wrong} of {known} labelled neighbours ({wrong / known:.1%}) are of another class")
        plural = "s" * (pages != 1)
        click.echo(f"report: {report.index_html} ({len(results)} queries, {pages} PNG page{plural})")

    emit(result, as_json, show)


def _table(results: Sequence[NeighbourResult], classes: Sequence[str], k: int) -> Table:
    """A rich table: each query and its first neighbours; neighbours of another class in red."""
    from rich.table import Table
    from rich.text import Text

    from isdretrieve.retrieve.hits import class_name

    shown = results[:TABLE_QUERIES]
    more = f" (first {len(shown)} of {len(results)} queries)" if len(results) > len(shown) else ""
    table = Table(title=f"nearest neighbours, k = {k}{more}")
    table.add_column("query", overflow="fold")
    table.add_column("class")
    for j in range(min(k, TABLE_HITS)):
        table.add_column(f"#{j + 1}")
    for result in shown:
        cells = [Text(result.query.source), Text(class_name(result.query.label, classes))]
        for hit in result.hits[:TABLE_HITS]:
            style = "bold red" if hit.label_differs else ""
            cells.append(Text(f"{hit.score:.3f} {class_name(hit.label, classes)}", style=style))
        table.add_row(*cells)
    return table
