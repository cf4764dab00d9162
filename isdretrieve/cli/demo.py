"""The whole path on the embedded digits data, as ``make demo`` runs it: train ISD, build the train and
test indices, k-NN of the trained and of the untrained encoder, a neighbours report, and what to run next.

    python -m isdretrieve.cli.demo [--out runs/demo] [--set optim.epochs=20]...

Rerunnable: training resumes from its newest checkpoint (a finished run only re-exports its encoder),
banks that are complete are reused, and the small exact indices are rebuilt in a moment.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import click

from isdretrieve.cli.common import CONTEXT, Command, user_errors, verbose_option

RECIPE = Path(__file__).resolve().parents[2] / "training" / "digits-isd.yaml"
K, TEMPERATURE, WEIGHTING = 20, 0.07, "exp"  # the README's digits protocol
REPORT_QUERIES, REPORT_K = 16, 8


@dataclass(frozen=True)
class DemoResult:
    out: Path
    train_index: Path
    test_index: Path
    report: Path
    protocol: str
    knn_trained: float  # top-1 through the indices (isd-knn's path)
    knn_untrained: float  # the same, with the recipe's initial (untrained) encoder
    monitor_trained: float | None  # the training monitor's figures, same protocol (a cross-check)
    monitor_untrained: float | None
    epochs: int
    seconds: dict[str, float]

    @property
    def serve_command(self) -> str:
        return f"isd-index serve {self.train_index} {self.test_index}"

    def gain_sentence(self) -> str:
        gain = self.knn_trained - self.knn_untrained
        verdict = "gained" if gain > 0 else "did not gain" if gain == 0 else "lost"
        return (
            f"Training {verdict} {abs(gain) * 100:.1f} points of k-NN top-1 over the untrained encoder "
            f"({self.knn_untrained:.4f} -> {self.knn_trained:.4f}; {self.protocol}). Digits are easy: a "
            f"random small CNN already separates them well, so the room left for training is small."
        )


def _untrained_encoder(recipe, trained_encoder: Path, out: Path) -> Path:
    """The encoder as training started (same seed, same initialisation), exported next to the run."""
    import torch

    from isdretrieve.models.backbones import build_backbone
    from isdretrieve.models.checkpoints import export_encoder, load_backbone

    _, header = load_backbone(trained_encoder)
    torch.manual_seed(recipe.engine.seed)  # what Trainer does right before it builds the backbone
    backbone = build_backbone(recipe.model.arch, cifar_stem=recipe.model.cifar_stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    export_encoder(backbone, dataclasses.replace(header, source="untrained:seed"), out)
    return out


def _knn_top1(train_dir: Path, test_dir: Path) -> float:
    from isdretrieve.evaluate.knn_eval import knn_evaluate, open_test_bank
    from isdretrieve.index.search import SearchIndex

    with SearchIndex.open(train_dir) as train, open_test_bank(test_dir) as test:
        report = knn_evaluate(train, test, ks=(K,), temperature=TEMPERATURE, weighting=WEIGHTING)
    return report.results[0].top1


def _indices(encoder: Path, where: Path) -> tuple[Path, Path]:
    from isdretrieve.pipeline import build_index_from_checkpoint

    for split in ("train", "test"):
        build_index_from_checkpoint(
            encoder, f"digits,split={split}", where / split, factory="Flat", workers=0
        )
    return where / "train", where / "test"


def run_demo(
    out: str | Path = "runs/demo", overrides: tuple[str, ...] = (), *, quiet: bool = False, say=print
) -> DemoResult:
    """Run (or resume) every step into ``out``; ``say`` gets one line per finished step."""
    from isdretrieve.retrieve.report import neighbours_report
    from isdretrieve.retrieve.retriever import Retriever
    from isdretrieve.train.engine import Trainer
    from isdretrieve.train.recipe import load_recipe

    out, seconds = Path(out), {}
    started = t0 = time.perf_counter()

    def step(name: str, message: str) -> None:
        nonlocal t0
        seconds[name] = round(time.perf_counter() - t0, 1)
        say(f"[{seconds[name]:5.1f} s] {message}")
        t0 = time.perf_counter()

    recipe = load_recipe(RECIPE, list(overrides))
    trained = Trainer(recipe, out / "run", resume=True, quiet=quiet).fit()
    step(
        "train", f"trained {trained.epochs} epochs: {trained.encoder} (curves: {out / 'run' / 'curves.png'})"
    )

    train_dir, test_dir = _indices(trained.encoder, out / "indices")
    step("indices", f"indices: {train_dir}, {test_dir}")

    knn_trained = _knn_top1(train_dir, test_dir)
    untrained = _untrained_encoder(recipe, trained.encoder, out / "untrained" / "encoder.pt")
    knn_untrained = _knn_top1(*_indices(untrained, out / "untrained" / "indices"))
    step("knn", f"k-NN top-1: trained {knn_trained:.4f}, untrained {knn_untrained:.4f}")

    with Retriever.open(test_dir, device="cpu") as retriever:
        queries = retriever.sample_rows(REPORT_QUERIES, seed=0)
        _, report = neighbours_report(retriever, queries, out / "report", k=REPORT_K)
    step("report", f"neighbours report: {report.index_html}")
    seconds["total"] = round(time.perf_counter() - started, 1)

    result = DemoResult(
        out=out,
        train_index=train_dir,
        test_index=test_dir,
        report=report.index_html,
        protocol=f"weighted k-NN, k={K}, T={TEMPERATURE}, digits test split (450) vs train split (1,347)",
        knn_trained=knn_trained,
        knn_untrained=knn_untrained,
        monitor_trained=trained.knn.top1 if trained.knn else None,
        monitor_untrained=trained.knn_init.top1 if trained.knn_init else None,
        epochs=trained.epochs,
        seconds=seconds,
    )
    summary = {**dataclasses.asdict(result), "serve": result.serve_command, "gain": result.gain_sentence()}
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return result


@click.command(cls=Command, context_settings=CONTEXT)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@verbose_option
@user_errors
def main(out: Path, overrides: tuple[str, ...], quiet: bool) -> None:
    """Train ISD on digits, index it, evaluate it against the untrained encoder, and write a report."""
    result = run_demo(out, overrides, quiet=quiet, say=lambda line: click.echo(line, err=True))
    click.echo(f"\nreport:  {result.report}")
    click.echo(f"serve:   {result.serve_command}   (then open http://127.0.0.1:8000)")
    click.echo(f"summary: {result.out / 'demo.json'} ({result.seconds['total']:.0f} s in all)")
    click.echo(result.gain_sentence())


if __name__ == "__main__":
    main()
