"""``isd-index dedup``: groups of near-duplicate images, a keep list, a drop list and a report."""

from __future__ import annotations

from pathlib import Path

import click

from isdretrieve.cli.common import CONTEXT, POSITIVE, emit, json_option, user_errors, verbose_option
from isdretrieve.cli.mine import bank_file, search_options, search_progress


@click.command(context_settings=CONTEXT)
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "--threshold",
    required=True,
    type=click.FloatRange(-1, 1),
    help="Rows with cosine similarity >= S are duplicates.",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write."
)
@click.option("-k", type=POSITIVE, default=10, show_default=True, help="Candidates searched per row.")
@click.option(
    "--keep",
    type=click.Choice(["first", "central"]),
    default="first",
    show_default=True,
    help="The row kept per group: the lowest row, or the one with the most duplicates in the group.",
)
@click.option(
    "--format", "table_format", type=click.Choice(["csv", "parquet"]), default="csv", show_default=True
)
@click.option(
    "--approximate", is_flag=True, help="Search through SOURCE's index (an index directory), not exactly."
)
@click.option(
    "--report-groups",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="Largest groups drawn in OUT/report/index.html (0: no report).",
)
@search_options
@json_option
@verbose_option
@user_errors
def dedup(
    source: Path,
    threshold: float,
    out: Path,
    k: int,
    keep: str,
    table_format: str,
    approximate: bool,
    report_groups: int,
    device: str,
    chunk_rows: int,
    quiet: bool,
    as_json: bool,
) -> None:
    """Find near-duplicate groups in SOURCE (an index directory or a bank.h5) and write OUT: groups, keep
    and drop lists, summary.json and a report (resumable: rerun to finish; a rerun with another
    --threshold reuses the search)."""
    from isdretrieve.mine.dedup import find_duplicates
    from isdretrieve.retrieve.dedup_report import write_dedup_report

    if approximate and not source.is_dir():
        raise click.UsageError("--approximate searches through an index: SOURCE must be an index directory")
    bank_path = bank_file(source)
    with search_progress(not quiet, "searching") as advance:
        result = find_duplicates(
            bank_path,
            out,
            threshold=threshold,
            k=k,
            keep=keep,
            table_format=table_format,
            device=device,
            chunk_rows=chunk_rows,
            progress=advance,
            index=source if approximate else None,
        )
    s = result.summary
    text = (
        f"{out}: {s['groups']:,} groups of near-duplicates ({s['rows_in_groups']:,} rows) among "
        f"{s['rows']:,}; keep {s['kept']:,}, drop {s['dropped']:,} (cosine >= {threshold}, k={s['k']}, "
        f"keep {keep})"
    )
    summary = {"out": out, **s, "files": {name: out / name for name in s["files"]}}
    if report_groups:
        shown = min(report_groups, s["groups"])
        report = write_dedup_report(
            bank_path,
            [result.groups.members(g) for g in range(shown)],
            result.groups.similarity,
            out / "report",
            title=str(source),
            summary=f"{text}; the {shown} largest groups, kept row first",
        )
        summary["report"] = report
        text += f"\nreport: {report}"
    emit(summary, as_json, text)
