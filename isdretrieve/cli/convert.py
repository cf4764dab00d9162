"""``isd-index convert``: any checkpoint we read, written as ``encoder.safetensors`` + ``encoder.json``."""

from __future__ import annotations

from pathlib import Path

import click

from isdretrieve.cli.common import CONTEXT, emit, json_option, user_errors, verbose_option


@click.command(context_settings=CONTEXT)
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for encoder.safetensors and encoder.json (default: the checkpoint's folder).",
)
@click.option("--teacher", is_flag=True, help="Convert the checkpoint's teacher, not the student.")
@json_option
@verbose_option
@user_errors
def convert(checkpoint: Path, out: Path | None, teacher: bool, as_json: bool) -> None:
    """Write CHECKPOINT's backbone (a training checkpoint, encoder.pt, official ISD, MoCo or DINO/AdaSim
    file) as safetensors weights with a JSON config, loadable without unpickling anything."""
    from isdretrieve.models.checkpoints import convert_checkpoint

    out = checkpoint.parent if out is None else out
    weights = convert_checkpoint(checkpoint, out, which="teacher" if teacher else "student")
    config = weights.with_suffix(".json")
    emit(
        {"checkpoint": checkpoint, "weights": weights, "config": config},
        as_json,
        f"{weights} and {config} written from {checkpoint}",
    )
