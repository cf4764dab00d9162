"""``isd-index``: build and inspect FAISS indices over feature banks."""

from __future__ import annotations

import json
from pathlib import Path

import click

from isdretrieve.cli.common import user_errors, verbose_option
from isdretrieve.cli.mine import mine
from isdretrieve.cli.neighbours import neighbours

CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.group(context_settings=CONTEXT)
def main() -> None:
    """Build and use feature banks and FAISS indices."""


def export_options(command):
    """The options that control encoding a data set into a bank (shared by build and export)."""
    options = [
        click.option(
            "--teacher", is_flag=True, help="Encode with the checkpoint's teacher, not the student."
        ),
        click.option(
            "--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True
        ),
        click.option("--batch-size", default=256, show_default=True),
        click.option("--device", default="auto", show_default=True),
        click.option("--workers", default=2, show_default=True, help="Image-decoding worker processes."),
        click.option(
            "--on-bad-image", type=click.Choice(["error", "skip"]), default="error", show_default=True
        ),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def export_kwargs(teacher: bool, quiet: bool, **options: object) -> dict[str, object]:
    """CLI export options as keyword arguments of ``export_bank``."""
    return {"which": "teacher" if teacher else "student", "progress": not quiet, **options}


@main.command(context_settings=CONTEXT)
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Training checkpoint, encoder.pt, official ISD, MoCo or DINO/AdaSim file.",
)
@click.option("--data", help="Data SPEC to encode (with --checkpoint), e.g. cifar10:ROOT,split=train.")
@click.option(
    "--bank",
    type=click.Path(dir_okay=False, path_type=Path),
    help="An existing bank.h5 instead of --checkpoint/--data.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Index directory, e.g. indices/NAME.",
)
@click.option(
    "--index", "factory", default="auto", show_default=True, help="auto, or any FAISS factory string."
)
@click.option(
    "--recall-target", default=0.95, show_default=True, help="recall@10 an approximate index is tuned to."
)
@click.option("--memory-budget", help="Index memory budget for auto, e.g. 4G (default: half the RAM).")
@export_options
@verbose_option
@user_errors
def build(
    checkpoint: Path | None,
    data: str | None,
    bank: Path | None,
    out: Path,
    factory: str,
    recall_target: float,
    memory_budget: str | None,
    **export: object,
) -> None:
    """Encode a data set into OUT/bank.h5 and build OUT/index.faiss (resumable: rerun to finish)."""
    from isdretrieve.index import build_index
    from isdretrieve.pipeline import build_index_from_checkpoint, parse_size

    budget = parse_size(memory_budget) if memory_budget else None
    options = export_kwargs(**export)
    if bank is not None:
        if checkpoint or data:
            raise click.UsageError("give either --bank, or --checkpoint with --data")
        manifest = build_index(
            bank,
            out,
            factory=factory,
            recall_target=recall_target,
            memory_budget=budget,
            progress=options["progress"],
        )
    else:
        if not (checkpoint and data):
            raise click.UsageError("give --checkpoint and --data (or --bank)")
        manifest = build_index_from_checkpoint(
            checkpoint,
            data,
            out,
            factory=factory,
            recall_target=recall_target,
            memory_budget=budget,
            **options,
        )
    click.echo(
        f"{out}: {manifest.factory} over {manifest.count:,} x {manifest.dim}, "
        f"recall@{manifest.recall_k} {manifest.recall:.4f}, built in {manifest.build_seconds:.1f} s"
    )


@main.command(context_settings=CONTEXT)
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", required=True, help="Data SPEC to encode.")
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="bank.h5 to write."
)
@export_options
@verbose_option
@user_errors
def export(checkpoint: Path, data: str, out: Path, **options: object) -> None:
    """Export a bank only (resumable). Under torchrun each process writes its shard; join them after."""
    from isdretrieve.bank import export_bank

    result = export_bank(checkpoint, data, out, **export_kwargs(**options))
    skipped = f", {result.skipped} unreadable images skipped" if result.skipped else ""
    click.echo(f"{result.path}: {result.rows:,} rows, {result.images_per_s:,.0f} images/s{skipped}")


@main.command(context_settings=CONTEXT)
@click.argument("shards", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="bank.h5 to write."
)
@verbose_option
@user_errors
def join(shards: tuple[Path, ...], out: Path) -> None:
    """Join the shard banks of a torchrun export into one bank."""
    from isdretrieve.bank import FeatureBank, join_shards

    with FeatureBank.open(join_shards(list(shards), out)) as bank:
        click.echo(f"{out}: {len(bank):,} rows from {len(shards)} shards")


@main.command(context_settings=CONTEXT)
@click.argument("index_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@verbose_option
@user_errors
def info(index_dir: Path, as_json: bool) -> None:
    """Show an index directory's manifest and bank."""
    from rich.console import Console
    from rich.table import Table

    from isdretrieve.index import SearchIndex

    with SearchIndex.open(index_dir) as index:
        bank = index.bank
        rows = json.loads(index.manifest.to_json())
        rows.update(bank_rows=len(bank), data_spec=bank.data_spec, transform=bank.transform)
        rows.update(classes=len(bank.classes), skipped_images=bank.skipped)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=str(index_dir), show_header=False)
    for key, value in rows.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    Console().print(table)


@main.command(context_settings=CONTEXT)
@click.argument("index_dir", type=click.Path(path_type=Path))
@click.option("-k", default=10, show_default=True)
@click.option("--queries", default=1000, show_default=True, help="Bank rows sampled as queries.")
@click.option("--seed", default=0, show_default=True)
@verbose_option
@user_errors
def recall(index_dir: Path, k: int, queries: int, seed: int) -> None:
    """Re-measure recall@k of the index against exact search."""
    from isdretrieve.index import SearchIndex

    with SearchIndex.open(index_dir) as index:
        value = index.recall(k=k, queries=queries, seed=seed)
        click.echo(
            f"recall@{k} = {value:.4f} ({index.manifest.factory}, {min(queries, len(index)):,} queries)"
        )


main.add_command(mine)
main.add_command(neighbours)

if __name__ == "__main__":
    main()
