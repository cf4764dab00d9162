"""``isd-train`` from the outside: user errors are one line and exit code 2; a run writes its folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from isdretrieve.cli.train import main

TINY = [
    "--set", "optim.epochs=1",
    "--set", "optim.batch_size=64",
    "--set", "method.queue_size=128",
    "--set", "monitor.every=1",
    "--quiet",
]  # fmt: skip
DEMO = str(Path(__file__).resolve().parents[1] / "training" / "digits-isd.yaml")


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_trains_and_reports_knn(tmp_path):
    result = _run(DEMO, "--out", str(tmp_path / "run"), *TINY)
    assert result.exit_code == 0, result.output
    assert "k-NN top-1 (k=20, T=0.07, weighted):" in result.output
    assert (tmp_path / "run" / "encoder.pt").is_file()
    assert (tmp_path / "run" / "recipe.yaml").read_text().count("queue_size: 128") == 1
    _assert_drawn(tmp_path / "run" / "curves.png")


def _assert_drawn(path: Path) -> None:
    """A real chart: a PNG of a sensible size with many distinct pixel values (not a blank canvas)."""
    image = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    assert image.shape[0] > 300 and image.shape[1] > 600, image.shape
    assert image.std() > 10 and len(np.unique(image)) > 50


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "optim.lrr=1"], "error: unknown key 'optim.lrr'"),
        (["--set", "model.arch=vgg"], "error: model.arch: unknown"),
        (["--set", "data.train=folder:/nonexistent/images"], "error: "),
        (["--set", "optim.batch_size=4096"], "error: optim.batch_size 4096 is larger than the data set"),
        (["--set", "engine.device=cuda:7"], "error: "),
        (["--set", "noequals"], "error: bad override 'noequals'"),
    ],
)
def test_user_errors_are_one_line(tmp_path, args, message):
    result = _run(DEMO, "--out", str(tmp_path / "run"), *TINY, *args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.output
    assert "Traceback" not in result.output


def test_missing_recipe_and_resume_guard(tmp_path):
    result = _run(str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2 and "cannot read recipe" in result.output
    out = str(tmp_path / "run")
    assert _run(DEMO, "--out", out, *TINY).exit_code == 0
    again = _run(DEMO, "--out", out, *TINY)
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = _run(DEMO, "--out", out, *TINY, "--resume")  # already finished: exports and reports again
    assert resumed.exit_code == 0, resumed.output
