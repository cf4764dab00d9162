"""The README's demo: ISD on digits beats the randomly initialised encoder under the same k-NN protocol."""

from pathlib import Path

import pytest

from isdretrieve.train.engine import Trainer
from isdretrieve.train.recipe import load_recipe

DEMO = Path(__file__).resolve().parents[1] / "training" / "digits-isd.yaml"


@pytest.mark.slow
def test_digits_demo_beats_random_init(tmp_path):
    recipe = load_recipe(DEMO, ["monitor.every=100"])  # the k-NN before and after training only
    result = Trainer(recipe, tmp_path, quiet=True).fit()
    assert result.knn.k == 20 and result.knn.temperature == 0.07 and result.knn.test_size == 450
    assert result.knn.top1 > result.knn_init.top1, (result.knn_init, result.knn)


TINY = ("optim.epochs=1", "optim.batch_size=64", "method.queue_size=128", "monitor.every=1")


@pytest.mark.slow
def test_demo_runs_the_whole_path_and_reruns_from_where_it_is(tmp_path):
    """``make demo``'s sequence on a tiny budget: every artefact, both k-NN figures measured, rerunnable."""
    import json

    from click.testing import CliRunner

    from isdretrieve.cli.demo import main, run_demo

    lines: list[str] = []
    first = run_demo(tmp_path / "demo", TINY, quiet=True, say=lines.append)
    assert [line.split("] ")[1].split(" ")[0] for line in lines] == [
        "trained",
        "indices:",
        "k-NN",
        "neighbours",
    ]
    for path in (first.report, first.train_index / "index.faiss", first.test_index / "manifest.json"):
        assert path.is_file(), path
    assert (tmp_path / "demo" / "run" / "curves.png").is_file()
    # the index path and the training monitor measure the same protocol on the same encoders
    assert first.knn_untrained == pytest.approx(first.monitor_untrained, abs=1.5 / 450)
    assert first.knn_trained == pytest.approx(first.monitor_trained, abs=1.5 / 450)
    assert 0.5 < first.knn_untrained < 1 and 0.5 < first.knn_trained <= 1

    again = CliRunner().invoke(
        main, ["--out", str(tmp_path / "demo"), *sum((["--set", s] for s in TINY), [])]
    )
    assert again.exit_code == 0, again.output
    assert f"isd-index serve {first.train_index} {first.test_index}" in again.stdout
    assert f"report:  {first.report}" in again.stdout and "points of k-NN top-1" in again.stdout
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert summary["knn_trained"] == first.knn_trained and summary["epochs"] == 1  # resumed, not retrained
    assert len(list((tmp_path / "demo" / "run" / "checkpoints").glob("*.pt"))) == 1
