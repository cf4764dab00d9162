"""``isd-index mine``: semantic positives of every bank row, with an optional label audit."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from isdretrieve.cli.common import CONTEXT, DEVICE, POSITIVE, emit, json_option, user_errors, verbose_option


def bank_file(source: Path) -> Path:
    """An index directory's bank.h5, or the bank file itself."""
    return source / "bank.h5" if source.is_dir() else source


def search_options(command):
    """``--device``, ``--chunk-rows`` and ``--quiet``: how a chunked top-k search over a bank runs."""
    options = [
        click.option("--device", type=DEVICE, default="auto", show_default=True),
        click.option(
            "--chunk-rows",
            type=POSITIVE,
            default=16384,
            show_default=True,
            help="Query rows searched at a time.",
        ),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command(context_settings=CONTEXT)
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="pairs.h5 to write."
)
@click.option("-k", type=POSITIVE, default=5, show_default=True, help="Candidates per row (self excluded).")
@click.option(
    "--threshold", type=click.FloatRange(-1, 1), help="Keep candidates with cosine similarity >= S."
)
@click.option(
    "--quantile",
    type=click.FloatRange(0, 1),
    help="Keep candidates above this quantile of all candidate similarities.",
)
@click.option("--mutual", is_flag=True, help="Keep j for i only if i is also among j's candidates.")
@click.option("--audit", is_flag=True, help="Measure precision/coverage against the bank's labels.")
@click.option(
    "--approximate",
    is_flag=True,
    help="Search through SOURCE's index (an index directory), not exactly; its recall is measured.",
)
@search_options
@json_option
@verbose_option
@user_errors
def mine(
    source: Path,
    out: Path,
    k: int,
    threshold: float | None,
    quantile: float | None,
    mutual: bool,
    audit: bool,
    approximate: bool,
    device: str,
    chunk_rows: int,
    quiet: bool,
    as_json: bool,
) -> None:
    """Mine positives from SOURCE (an index directory or a bank.h5) into OUT (resumable: rerun to finish).

    Labels are never used to choose pairs; --audit only measures them, writing OUT's name with
    .audit.json and .audit.png next to it.
    """
    from isdretrieve.files.bank import FeatureBank
    from isdretrieve.files.pairs import MiningParams
    from isdretrieve.mine.mining import mine_pairs

    params = MiningParams(k=k, threshold=threshold, quantile=quantile, mutual=mutual)
    bank_path = bank_file(source)
    if approximate and not source.is_dir():
        raise click.UsageError("--approximate searches through an index: SOURCE must be an index directory")
    index = source if approximate else None
    with search_progress(not quiet) as advance:
        pairs = mine_pairs(
            bank_path, out, params, device=device, chunk_rows=chunk_rows, progress=advance, index=index
        )
    search = f", approximate search recall@{pairs.params.k} {pairs.search_recall:.4f}" if approximate else ""
    summary = (
        f"{out}: {pairs.num_pairs:,} pairs over {len(pairs):,} rows (coverage {pairs.coverage:.4f}, "
        f"threshold {pairs.threshold:.4f}, k={pairs.params.k}{', mutual' if mutual else ''}{search})"
    )
    result = {
        "pairs": out,
        "rows": len(pairs),
        "num_pairs": pairs.num_pairs,
        "coverage": pairs.coverage,
        "threshold": pairs.threshold,
        "k": pairs.params.k,
        "mutual": mutual,
        "search_recall": pairs.search_recall if approximate else None,
    }
    report = None
    if audit:
        from isdretrieve.mine.audit import audit_pairs, write_audit

        with FeatureBank.open(bank_path) as bank:
            report = audit_pairs(pairs, bank.labels(), bank.classes)
        stem = out.with_suffix("")
        json_path, png_path = Path(f"{stem}.audit.json"), Path(f"{stem}.audit.png")
        write_audit(report, json_path, png_path)
        result["audit"] = {"json": json_path, "png": png_path, **report.to_dict()}

    def show() -> None:
        click.echo(summary)
        if report is not None:
            _print_audit(report)
            click.echo(f"audit written to {json_path} and {png_path}")

    emit(result, as_json, show)


@contextlib.contextmanager
def search_progress(enabled: bool, label: str = "mining") -> Iterator[Callable[[int, int], None] | None]:
    """A rich bar over the rows searched so far; yields its ``update(done, total)``."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _print_audit(report) -> None:
    from rich.console import Console
    from rich.table import Table

    c = report.chosen
    title = f"audit: precision {c.precision:.4f}, coverage {c.coverage:.4f}"
    if report.search and report.search["kind"] != "exact":
        title += f", search recall {report.search['recall']:.4f}"
    table = Table(title=title)
    for column in ("class", "rows", "coverage", "precision"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in report.per_class:
        table.add_row(row.name, f"{row.rows:,}", f"{row.coverage:.4f}", f"{row.precision:.4f}")
    Console().print(table)
