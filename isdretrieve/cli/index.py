"""``isd-index``: build and inspect indices over feature banks (FAISS, or a Milvus collection)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from isdretrieve.cli.common import (
    CONTEXT,
    DEVICE,
    NON_NEGATIVE,
    POSITIVE,
    SIZE,
    Group,
    emit,
    json_option,
    user_errors,
    verbose_option,
)
from isdretrieve.cli.convert import convert
from isdretrieve.cli.dedup import dedup
from isdretrieve.cli.mine import bank_file, mine
from isdretrieve.cli.neighbours import neighbours
from isdretrieve.cli.serve import serve


@click.group(cls=Group, context_settings=CONTEXT)
def main() -> None:
    """Build and use feature banks and their indices (FAISS, or Milvus collections)."""


def export_options(command):
    """The options that control encoding a data set into a bank (shared by build and export)."""
    options = [
        click.option(
            "--teacher", is_flag=True, help="Encode with the checkpoint's teacher, not the student."
        ),
        click.option(
            "--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True
        ),
        click.option("--batch-size", type=POSITIVE, default=256, show_default=True),
        click.option("--device", type=DEVICE, default="auto", show_default=True),
        click.option(
            "--workers",
            type=NON_NEGATIVE,
            default=2,
            show_default=True,
            help="Image-decoding worker processes.",
        ),
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


def index_options(command):
    """Where the index directory goes and which index it gets (shared by build and attach)."""
    options = [
        click.option(
            "--out",
            required=True,
            type=click.Path(file_okay=False, path_type=Path),
            help="Index directory, e.g. indices/NAME.",
        ),
        click.option(
            "--index",
            "factory",
            default="auto",
            show_default=True,
            help="auto, or a FAISS factory string (Milvus: one it has an index for).",
        ),
        click.option(
            "--recall-target",
            type=click.FloatRange(0, 1, min_open=True),
            default=0.95,
            show_default=True,
            help="recall@10 an approximate index is tuned to.",
        ),
        click.option(
            "--memory-budget",
            type=SIZE,
            help="Index memory budget for auto, e.g. 4G (default: half the RAM).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def milvus_options(required: bool):
    """Where a Milvus collection is: --milvus-uri, --collection, --milvus-token (build and attach)."""
    options = [
        click.option(
            "--milvus-uri",
            required=required,
            help="A milvus-lite file (NAME.db, embedded) or a Milvus server, http(s)://HOST:PORT"
            + ("." if required else " (default with --backend milvus: OUT/milvus.db)."),
        ),
        click.option("--collection", help="The Milvus collection (default: isd_ and the name of OUT)."),
        click.option(
            "--milvus-token",
            "milvus_token",
            metavar="ENV",
            help="The environment variable holding the Milvus token (user:password or an API key).",
        ),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def milvus_target(out: Path, uri: str | None, collection: str | None, token_env: str | None):
    """The MilvusTarget the options name (URI default OUT/milvus.db, collection default isd_NAME)."""
    import re

    from isdretrieve.index.milvus.connect import MilvusTarget

    name = collection or "isd_" + re.sub(r"[^A-Za-z0-9_]", "_", out.resolve().name or "index")
    return MilvusTarget(uri or str(out / "milvus.db"), name, token_env)


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
    "--embeddings",
    type=click.Path(exists=True, path_type=Path),
    help="Embeddings made elsewhere: a folder of npy shards (img_emb/ + metadata/, clip-retrieval's too), "
    "a .npy, a .parquet, or an HDF5 file.",
)
@click.option("--key", help="With --embeddings: the HDF5 dataset or parquet column holding them.")
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="With --embeddings: one int label a row (.npy, or text with one a line).",
)
@index_options
@click.option(
    "--on-disk", is_flag=True, help="Keep an IVF index's lists on disk (auto does when RAM is short)."
)
@click.option(
    "--shard-rows",
    type=click.IntRange(min=1),
    help="On-disk builds: rows added per shard (default: what half the budget holds).",
)
@click.option(
    "--backend",
    type=click.Choice(["faiss", "milvus"]),
    default="faiss",
    show_default=True,
    help="faiss: OUT/index.faiss; milvus: the rows go into a Milvus collection (resumable).",
)
@milvus_options(required=False)
@export_options
@json_option
@verbose_option
@user_errors
def build(
    checkpoint: Path | None,
    data: str | None,
    bank: Path | None,
    embeddings: Path | None,
    key: str | None,
    labels: Path | None,
    out: Path,
    factory: str,
    recall_target: float,
    memory_budget: int | None,
    on_disk: bool,
    shard_rows: int | None,
    backend: str,
    milvus_uri: str | None,
    collection: str | None,
    milvus_token: str | None,
    as_json: bool,
    **export: object,
) -> None:
    """Encode a data set into OUT/bank.h5 and build OUT/index.faiss (resumable: rerun to finish).

    Or index an existing bank (--bank), or embeddings made elsewhere (--embeddings), imported as OUT/bank.h5.
    With --backend milvus the rows go into a Milvus collection instead of OUT/index.faiss.
    """
    from isdretrieve.index.build import build_index
    from isdretrieve.pipeline import build_index_from_checkpoint

    options = export_kwargs(**export)
    where = _backend_kwargs(out, backend, milvus_uri, collection, milvus_token)
    sources = [name for name, given in (("--bank", bank), ("--embeddings", embeddings)) if given]
    if (key or labels) and not embeddings:
        raise click.UsageError("--key and --labels go with --embeddings")
    if sources:
        if len(sources) > 1 or checkpoint or data:
            raise click.UsageError("give one of --bank, --embeddings, or --checkpoint with --data")
        settings = dict(factory=factory, recall_target=recall_target, memory_budget=memory_budget)
        settings.update(on_disk=on_disk, shard_rows=shard_rows, progress=options["progress"])
        if embeddings is not None:
            from isdretrieve.bank.embeddings_in import read_labels
            from isdretrieve.pipeline import build_index_from_embeddings

            label_array = read_labels(labels) if labels else None
            manifest = build_index_from_embeddings(
                embeddings, out, key=key, labels=label_array, **settings, **where
            )
        else:
            manifest = build_index(bank, out, **settings, **where)
    else:
        if not (checkpoint and data):
            raise click.UsageError("give --checkpoint and --data (or --bank, or --embeddings)")
        if on_disk or shard_rows:
            raise click.UsageError("--on-disk and --shard-rows go with --bank or --embeddings")
        manifest = build_index_from_checkpoint(
            checkpoint,
            data,
            out,
            factory=factory,
            recall_target=recall_target,
            memory_budget=memory_budget,
            **where,
            **options,
        )
    _report_built(out, manifest, as_json)


def _backend_kwargs(
    out: Path, backend: str, uri: str | None, collection: str | None, token_env: str | None
) -> dict[str, object]:
    """``backend`` (and ``milvus``, the target) for build_index; Milvus options need --backend milvus."""
    if backend != "milvus":
        if uri or collection or token_env:
            raise click.UsageError("--milvus-uri, --collection and --milvus-token go with --backend milvus")
        return {}
    target = milvus_target(out, uri, collection, token_env)
    target.token()  # a token variable that is not set fails now, before anything is written
    return {"backend": "milvus", "milvus": target}


def _report_built(out: Path, manifest, as_json: bool) -> None:
    """What build and attach print: the index, its size and its measured recall (the manifest with --json)."""
    if manifest.backend == "milvus":
        where = f" in Milvus ({manifest.milvus['index_type']}, collection {manifest.milvus['collection']})"
    else:
        where = " on disk" if manifest.kind == "ondisk" else ""
    text = (
        f"{out}: {manifest.factory}{where} over {manifest.count:,} x {manifest.dim}, "
        f"recall@{manifest.recall_k} {manifest.recall:.4f}, built in {manifest.build_seconds:.1f} s"
    )
    for note in manifest.notes:
        click.echo(f"note: {note}", err=True)
    emit({"index_dir": out, **json.loads(manifest.to_json())}, as_json, text)


@main.command(context_settings=CONTEXT)
@click.option(
    "--bank",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The bank whose rows the collection holds (its parquet export was imported into it).",
)
@index_options
@milvus_options(required=True)
@click.option("--quiet", is_flag=True, help="No progress lines.")
@json_option
@verbose_option
@user_errors
def attach(
    bank: Path,
    out: Path,
    factory: str,
    recall_target: float,
    memory_budget: int | None,
    milvus_uri: str,
    collection: str | None,
    milvus_token: str | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Write the index directory OUT for an existing Milvus collection of BANK's rows.

    For a collection filled elsewhere, e.g. by a Milvus bulk import of 'isd-index export --format parquet':
    its rows are checked against the bank, then it is indexed and tuned like a build.
    """
    from isdretrieve.index.milvus.build import build_milvus_index

    target = milvus_target(out, milvus_uri, collection, milvus_token)
    target.token()  # a token variable that is not set fails now, before anything is written
    manifest = build_milvus_index(
        bank,
        out,
        target,
        attach=True,
        factory=factory,
        recall_target=recall_target,
        memory_budget=memory_budget,
        progress=not quiet,
    )
    _report_built(out, manifest, as_json)


@main.command(context_settings=CONTEXT)
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", help="Data SPEC to encode.")
@click.option(
    "--bank",
    "source_bank",
    type=click.Path(exists=True, path_type=Path),
    help="Convert an existing bank.h5 or index directory instead of encoding.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["h5", "npy", "parquet"]),
    default="h5",
    show_default=True,
    help="h5: a bank.h5; npy: img_emb/*.npy shards with metadata/*.parquet; parquet: one file.",
)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="bank.h5, npy folder or .parquet to write."
)
@click.option(
    "--shard-rows",
    type=POSITIVE,
    default=1 << 20,
    show_default=True,
    help="With --format npy: rows a shard.",
)
@export_options
@json_option
@verbose_option
@user_errors
def export(
    checkpoint: Path | None,
    data: str | None,
    source_bank: Path | None,
    fmt: str,
    out: Path,
    shard_rows: int,
    as_json: bool,
    **options: object,
) -> None:
    """Export a bank (resumable), or convert one (--bank). Under torchrun each process writes its shard."""
    from isdretrieve.bank.embeddings_out import export_embeddings
    from isdretrieve.bank.export import export_bank

    if source_bank is not None:
        if checkpoint or data:
            raise click.UsageError("give either --bank, or --checkpoint with --data")
        path = export_embeddings(bank_file(source_bank), out, fmt, shard_rows=shard_rows)
        click.echo(f"{path}: {fmt} written from {bank_file(source_bank)}")
        return
    if not (checkpoint and data):
        raise click.UsageError("give --checkpoint and --data (or --bank)")
    h5_out = out if fmt == "h5" else out.with_name(f"{out.name}.bank.h5")
    result = export_bank(checkpoint, data, h5_out, **export_kwargs(**options))
    skipped = f", {result.skipped} unreadable images skipped" if result.skipped else ""
    text = f"{result.path}: {result.rows:,} rows, {result.images_per_s:,.0f} images/s{skipped}"
    if fmt != "h5":
        text += f"\n{export_embeddings(h5_out, out, fmt, shard_rows=shard_rows)}: {fmt} written from {h5_out}"
    emit(result, as_json, text)


@main.command(context_settings=CONTEXT)
@click.argument("shards", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="bank.h5 to write."
)
@json_option
@verbose_option
@user_errors
def join(shards: tuple[Path, ...], out: Path, as_json: bool) -> None:
    """Join the shard banks of a torchrun export into one bank."""
    from isdretrieve.bank.join import join_shards
    from isdretrieve.files.bank import FeatureBank

    with FeatureBank.open(join_shards(list(shards), out)) as bank:
        rows = len(bank)
    emit(
        {"path": out, "rows": rows, "shards": len(shards)},
        as_json,
        f"{out}: {rows:,} rows from {len(shards)} shards",
    )


@main.command(context_settings=CONTEXT)
@click.argument("index_dir", type=click.Path(path_type=Path))
@json_option
@verbose_option
@user_errors
def info(index_dir: Path, as_json: bool) -> None:
    """Show an index directory's manifest and bank (reads no index and no model: starts fast)."""
    from isdretrieve.files.manifest import describe_index

    rows = describe_index(index_dir)
    emit(rows, as_json, lambda: _print_rows(str(index_dir), rows))


def _print_rows(title: str, rows: dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in rows.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    Console().print(table)


@main.command(context_settings=CONTEXT)
@click.argument("index_dir", type=click.Path(path_type=Path))
@click.option("-k", type=POSITIVE, default=10, show_default=True)
@click.option(
    "--queries", type=POSITIVE, default=1000, show_default=True, help="Bank rows sampled as queries."
)
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True)
@json_option
@verbose_option
@user_errors
def recall(index_dir: Path, k: int, queries: int, seed: int, as_json: bool) -> None:
    """Re-measure recall@k of the index against exact search (through its backend: FAISS or Milvus)."""
    from isdretrieve.index.open import open_index

    with open_index(index_dir) as index:
        value = index.recall(k=k, queries=queries, seed=seed)
        used, factory, backend = min(queries, len(index)), index.manifest.factory, index.backend
        k_used = min(k, len(index) - 1)  # recall() lowers k to the other rows of a small bank
    result = {"index_dir": index_dir, "k": k_used, "recall": value, "queries": used, "factory": factory}
    result["backend"] = backend
    where = "" if backend == "faiss" else f" in {backend}"
    emit(result, as_json, f"recall@{k_used} = {value:.4f} ({factory}{where}, {used:,} queries)")


main.add_command(mine)
main.add_command(dedup)
main.add_command(convert)
main.add_command(neighbours)
main.add_command(serve)

if __name__ == "__main__":
    main()
