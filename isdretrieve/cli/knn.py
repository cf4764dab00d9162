"""``isd-knn``: k-NN classification (and optionally a linear probe) over feature banks."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import click

from isdretrieve.cli.common import CONTEXT, POSITIVE, Command, emit, json_option, user_errors, verbose_option
from isdretrieve.evaluate.protocols import PRESETS, WEIGHTINGS

PathType = click.Path(path_type=Path)
FileType = click.Path(dir_okay=False, path_type=Path)
EITHER = "give --train and --test, or --checkpoint with --data"


@click.command(cls=Command, context_settings=CONTEXT)
@click.option("--train", "train_dir", type=PathType, help="Index directory of the memory.")
@click.option("--test", "test_path", type=PathType, help="Index directory or bank.h5 of the queries.")
@click.option(
    "--checkpoint", type=FileType, help="Instead of --train/--test: encode --data with this checkpoint."
)
@click.option(
    "--data", help="Data SPEC for --checkpoint: its train split is the memory, its test split the queries."
)
@click.option(
    "--work-dir", type=PathType, help="Keep the banks built from --checkpoint here (default: temporary)."
)
@click.option("-k", "ks", multiple=True, type=POSITIVE, help="k (repeatable); default from --preset.")
@click.option(
    "--temperature", "-T", type=click.FloatRange(min=0, min_open=True), help="T of the exp weighting."
)
@click.option("--weighting", type=click.Choice(WEIGHTINGS))
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default="dino",
    show_default=True,
    help="dino: k=20 T=0.07 exp; instdisc: k=200 T=0.1 exp; isd: k=1,20 uniform.",
)
@click.option(
    "--linear",
    type=click.Choice(["bank", "images"]),
    is_flag=False,
    flag_value="bank",
    default=None,
    help="Also train the ISD linear probe: on the train bank's features (bank, what --linear alone "
    "means) or the ISD protocol on its images (images: frozen encoder.pt of --train, crop + flip).",
)
@click.option("--per-class", is_flag=True, help="Print per-class top-1.")
@json_option
@verbose_option
@user_errors
def main(
    train_dir: Path | None,
    test_path: Path | None,
    checkpoint: Path | None,
    data: str | None,
    work_dir: Path | None,
    ks: tuple[int, ...],
    temperature: float | None,
    weighting: str | None,
    preset: str,
    linear: str | None,
    per_class: bool,
    as_json: bool,
) -> None:
    """k-NN top-1/top-5 of the TEST bank's rows against the TRAIN index (or of a checkpoint on --data)."""
    from isdretrieve.evaluate.knn_eval import knn_evaluate, open_test_bank
    from isdretrieve.index.open import open_index

    preset_ks, preset_t, preset_w = PRESETS[preset]
    with contextlib.ExitStack() as stack:
        if checkpoint or data:
            if not (checkpoint and data) or train_dir or test_path:
                raise click.UsageError(EITHER)
            from isdretrieve.pipeline import knn_banks_from_checkpoint

            work = work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="isd-knn-")))
            train_dir, test_path = knn_banks_from_checkpoint(checkpoint, data, work)
        elif not (train_dir and test_path):
            raise click.UsageError(EITHER)
        train = stack.enter_context(open_index(train_dir))
        test = stack.enter_context(open_test_bank(test_path))
        report = knn_evaluate(
            train,
            test,
            ks=ks or preset_ks,
            temperature=temperature or preset_t,
            weighting=weighting or preset_w,
            linear=_probe_config(linear),
        )
    emit(report, as_json, lambda: _print_report(report, per_class))


def _probe_config(linear: str | None):
    """The probe ``--linear bank|images`` asks for (torch is imported only then)."""
    if linear is None:
        return None
    if linear == "images":
        from isdretrieve.evaluate.linear_eval import ImageProbeConfig

        return ImageProbeConfig()
    from isdretrieve.evaluate.linear_probe import ProbeConfig

    return ProbeConfig()


def _print_report(report, per_class: bool) -> None:
    self_note = ", self-matches excluded" if report.exclude_self else ""
    where = "" if report.backend == "faiss" else f" in {report.backend}"
    click.echo(f"{report.test_size:,} queries vs {report.train_size:,} ({report.search}{where}{self_note})")
    for r in report.results:
        t = f", T={r.temperature}" if r.weighting == "exp" else ""
        click.echo(f"k={r.k}{t} {r.weighting}: top-1 {r.top1:.4f}  top-5 {r.top5:.4f}")
        if per_class:
            click.echo("  " + "  ".join(f"{name} {acc:.3f}" for name, acc in r.per_class.items()))
    if report.linear is not None:
        p = report.linear
        click.echo(f"linear probe (ISD protocol, {p.protocol}): top-1 {p.top1:.4f}  top-5 {p.top5:.4f}")


if __name__ == "__main__":
    main()
