"""The convention every command follows: bad option values end in one ``error:`` line on stderr and exit
code 2 (no traceback), ``--json`` prints one JSON document and nothing else on stdout, and commands that
load no model import neither torch nor FAISS. Each bad case is a row of docs/reliability.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from isdretrieve.cli.index import main as index_cli
from isdretrieve.cli.knn import main as knn_cli
from isdretrieve.cli.train import main as train_cli

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "training" / "digits-isd.yaml")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """Two exact indices over random labelled features (no model): ROOT/train, ROOT/test, and ROOT/b.h5."""
    from isdretrieve.bank.arrays import write_bank
    from isdretrieve.index.build import build_index

    root = tmp_path_factory.mktemp("opts")
    rng = np.random.default_rng(0)
    for name, n in (("train", 300), ("test", 60)):
        labels = rng.integers(0, 3, n)
        feats = np.eye(3, 16, dtype=np.float32)[labels] * 3 + rng.standard_normal((n, 16), dtype=np.float32)
        write_bank(
            root / f"{name}.h5", feats, labels=labels, fingerprint="options-test", classes=["a", "b", "c"]
        )
        build_index(root / f"{name}.h5", root / name, factory="Flat")
    return root


# (command, arguments): every value is wrong in exactly one option; {d} is the fixture's folder
BAD = [
    (index_cli, "build --bank {d}/train.h5 --out {d}/o --batch-size 0"),
    (index_cli, "build --bank {d}/train.h5 --out {d}/o --workers -1"),
    (index_cli, "build --bank {d}/train.h5 --out {d}/o --device gpu"),
    (index_cli, "build --bank {d}/train.h5 --out {d}/o --dtype float64"),
    (index_cli, "build --bank {d}/train.h5 --out {d}/o --on-bad-image ignore"),
    (index_cli, "build --bank {d}/train.h5 --out {d}/o --recall-target 0"),
    (index_cli, "build --bank {d}/train.h5 --out {d}/o --recall-target 1.5"),
    (index_cli, "build --bank {d}/train.h5 --out {d}/o --memory-budget lots"),
    (index_cli, "build --bank {d}/train.h5 --out {d}/o --memory-budget 0"),
    (index_cli, "build --bank {d}/train.h5 --checkpoint {d}/c.pt --out {d}/o"),
    (index_cli, "build --bank {d}/train.h5"),
    (index_cli, "export --checkpoint {d}/c.pt --data digits --out {d}/b.h5 --batch-size 0"),
    (index_cli, "info {d}/nowhere"),
    (index_cli, "recall {d}/train -k 0"),
    (index_cli, "recall {d}/train --queries 0"),
    (index_cli, "recall {d}/train --seed -1"),
    (index_cli, "mine {d}/train --out {d}/p.h5 -k 0"),
    (index_cli, "mine {d}/train --out {d}/p.h5 --threshold 2"),
    (index_cli, "mine {d}/train --out {d}/p.h5 --quantile 1.5"),
    (index_cli, "mine {d}/train --out {d}/p.h5 --threshold 0.5 --quantile 0.5"),
    (index_cli, "mine {d}/train --out {d}/p.h5 --chunk-rows 0"),
    (index_cli, "mine {d}/train --out {d}/p.h5 --device tpu"),
    (index_cli, "neighbours {d}/train --sample 2 --out {d}/r -k 0"),
    (index_cli, "neighbours {d}/train --sample 0 --out {d}/r"),
    (index_cli, "neighbours {d}/train --sample 2 --out {d}/r --per-page 0"),
    (index_cli, "neighbours {d}/train --sample 2 --out {d}/r --seed -1"),
    (index_cli, "neighbours {d}/train --sample 2 --out {d}/r --device tpu"),
    (index_cli, "neighbours {d}/train --out {d}/r"),
    (index_cli, "nonsense"),
    (knn_cli, "--train {d}/train --test {d}/test -k 0"),
    (knn_cli, "--train {d}/train --test {d}/test -T 0"),
    (knn_cli, "--train {d}/train --test {d}/test -T -1"),
    (knn_cli, "--train {d}/train --test {d}/test --weighting majority"),
    (knn_cli, "--train {d}/train --test {d}/test --preset simclr"),
    (knn_cli, "--train {d}/train --test {d}/test -k 1000"),
    (knn_cli, "--train {d}/train"),
    (knn_cli, "--train {d}/train --test {d}/test --json {d}/knn.json"),
    (train_cli, RECIPE + " --device tpu"),
    (train_cli, RECIPE + " --no-such-option"),
    (train_cli, "{d}/missing.yaml"),
]


@pytest.mark.parametrize(
    ("command", "args"), BAD, ids=[args.split(" --")[0][:12] + "|" + args for _, args in BAD]
)
def test_bad_option_is_one_line_and_exit_2(small, command, args):
    result = CliRunner().invoke(command, args.format(d=small).split())
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and result.stdout == ""


def test_usage_error_from_the_console_script_is_one_line(small):
    """The real process (not click's test runner): one stderr line, exit code 2, nothing on stdout."""
    cmd = [sys.executable, "-m", "isdretrieve.cli.index", "build", "--bank", str(small / "train.h5")]
    done = subprocess.run(
        [*cmd, "--out", str(small / "o"), "--batch-size", "0"], capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: Invalid value for '--batch-size': 0 is not in the range x>=1. (see '")


def test_library_rejects_a_bad_batch_size_as_a_user_error(tmp_path):
    """What the CLI checks first, the library checks too, as an IsdError (no ValueError traceback)."""
    from isdretrieve.bank.export import export_bank
    from isdretrieve.errors import InvalidArgument, IsdError

    with pytest.raises(InvalidArgument, match="batch_size must be positive") as caught:
        export_bank(tmp_path / "enc.pt", "digits", tmp_path / "b.h5", batch_size=0)
    assert isinstance(caught.value, IsdError) and isinstance(caught.value, ValueError)


def _json(command, args: list[str]) -> dict:
    result = CliRunner().invoke(command, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # the whole of stdout is one document


def test_json_flag_prints_one_document(small):
    d = str(small)
    info = _json(index_cli, ["info", f"{d}/train"])
    assert info["count"] == info["bank_rows"] == 300 and info["classes"] == 3
    assert _json(index_cli, ["recall", f"{d}/train", "-k", "5", "--queries", "50"])["recall"] == 1.0
    built = _json(index_cli, ["build", "--bank", f"{d}/test.h5", "--out", f"{d}/rebuilt", "--index", "Flat"])
    assert built["factory"] == "Flat" and built["count"] == 60
    knn = _json(knn_cli, ["--train", f"{d}/train", "--test", f"{d}/test", "-k", "5"])
    assert knn["results"][0]["k"] == 5 and knn["results"][0]["top1"] > 0.8
    mined = _json(index_cli, ["mine", f"{d}/train", "--out", f"{d}/pairs.h5", "-k", "3", "--audit"])
    assert mined["rows"] == 300 and 0 < mined["audit"]["chosen"]["precision"] <= 1
    found = _json(index_cli, ["neighbours", f"{d}/train", "--sample", "2", "-k", "3", "--out", f"{d}/report"])
    assert found["queries"] == 2 and len(found["results"][0]["hits"]) == 3
    assert found["missing_images"] > 0  # no images behind random features: the warning went to stderr


def _modules_after(code: str) -> set[str]:
    """Which of torch / faiss / matplotlib a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport sys\nprint(sorted({{'torch', 'faiss', 'matplotlib'}} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    return set(json.loads(done.stdout.strip().splitlines()[-1].replace("'", '"')))


def test_cli_modules_import_neither_torch_nor_faiss():
    assert _modules_after("import isdretrieve.cli.index, isdretrieve.cli.knn, isdretrieve.cli.train") == set()


def test_help_and_info_import_neither_torch_nor_faiss(small):
    info = f"main(['info', {str(small / 'train')!r}], standalone_mode=False)"
    runs = [
        "from isdretrieve.cli.index import main; main(['--help'], standalone_mode=False)",
        "from isdretrieve.cli.knn import main; main(['--help'], standalone_mode=False)",
        "from isdretrieve.cli.train import main; main(['--help'], standalone_mode=False)",
        f"from isdretrieve.cli.index import main; {info}",
    ]
    for code in runs:
        assert _modules_after(code) == set(), code


def test_knn_on_existing_indices_runs_without_torch(small):
    """isd-knn on two built indices needs FAISS, h5py and NumPy only (torch alone costs ~1 s and most of
    the process's memory); the numbers are the same as through the Python API."""
    args = ["--train", str(small / "train"), "--test", str(small / "test"), "-k", "5", "--json"]
    code = f"from isdretrieve.cli.knn import main; main({args!r}, standalone_mode=False)"
    assert _modules_after(code) == {"faiss"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert json.loads(done.stdout)["results"] == _json(knn_cli, args[:-1])["results"]
