"""``isd-train RECIPE.yaml``: train an encoder as a recipe describes."""

from __future__ import annotations

from pathlib import Path

import click

from isdretrieve.cli.common import CONTEXT, DEVICE, Command, emit, json_option, user_errors, verbose_option


@click.command(cls=Command, context_settings=CONTEXT)
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value.")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="Run folder (default runs/RECIPE)."
)
@click.option("--resume", is_flag=True, help="Continue from the run folder's newest checkpoint.")
@click.option("--device", type=DEVICE, help="auto, cpu, cuda or cuda:N (overrides engine.device).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@json_option
@verbose_option
@user_errors
def main(
    recipe: Path,
    overrides: tuple[str, ...],
    out: Path | None,
    resume: bool,
    device: str | None,
    quiet: bool,
    as_json: bool,
):
    """Train a self-supervised encoder (ISD, MoCo-v2, BYOL) from a YAML RECIPE."""
    from isdretrieve.train.engine import Trainer
    from isdretrieve.train.recipe import load_recipe

    if device:
        overrides = (*overrides, f"engine.device={device}")
    trainer = Trainer(
        load_recipe(recipe, overrides), out or Path("runs") / recipe.stem, resume=resume, quiet=quiet
    )
    result = trainer.fit()
    if not trainer.dist.is_main:
        return
    text = None
    if result.knn is not None:
        init = f" (untrained: {result.knn_init.top1:.4f})" if result.knn_init else ""
        m = trainer.recipe.monitor
        text = f"k-NN top-1 (k={m.k}, T={m.temperature}, weighted): {result.knn.top1:.4f}{init}"
    emit(result, as_json, text)


if __name__ == "__main__":
    main()
