"""Fault injection: SIGKILL, SIGTERM/SIGINT, truncated checkpoints and a full disk lose nothing.

Training runs are the tiny digits recipe below (21 steps); killed children are real ``isd-train``
processes (a wrapper arms ``Trainer.optimize``), resumed runs and the reference run are in-process.
See docs/reliability.md for the table of cases.
"""

from __future__ import annotations

import errno
import io
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import KILLED_EXPORT, bank_contents

from isdretrieve.bank.export import export_bank
from isdretrieve.cli.index import main as index_main
from isdretrieve.cli.train import main as train_main
from isdretrieve.errors import BankError, Interrupted, IsdError
from isdretrieve.files.bank import FeatureBank
from isdretrieve.files.encoder_header import IMAGENET_MEAN, IMAGENET_STD, EncoderHeader
from isdretrieve.files.pairs import MiningParams, Pairs
from isdretrieve.index.build import build_index
from isdretrieve.index.search import SearchIndex
from isdretrieve.mine.mining import mine_pairs
from isdretrieve.models.backbones import build_backbone
from isdretrieve.models.checkpoints import export_encoder, safe_load
from isdretrieve.train.checkpointing import list_checkpoints
from isdretrieve.train.engine import Trainer
from isdretrieve.train.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPE = """\
method: {name: isd, queue_size: 256}
data: {train: "digits,split=test", preset: digits}
model: {arch: small_cnn}
optim: {batch_size: 64, epochs: 3, lr: 0.05, warmup_epochs: 1}
engine: {seed: 5, log_every: 1}
monitor: {every: 0}
"""
PER_EPOCH, STEPS = 7, 21  # 450 digits // 64 = 7 steps per epoch, 3 epochs

# A real ``isd-train`` process that dies (SIGKILL) or signals itself (SIGTERM/SIGINT) before step N+1.
_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from isdretrieve.cli.train import main
    from isdretrieve.train.engine import Trainer

    torch.set_num_threads(1)
    after, sig = int(os.environ["FAULT_AFTER"]), getattr(signal, os.environ["FAULT_SIGNAL"])
    real, calls = Trainer.optimize, [0]

    def optimize(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == after + 1:
            os.kill(os.getpid(), sig)  # SIGKILL: dies here; SIGTERM/SIGINT: the handler sets a flag
        return real(self, *args, **kwargs)

    Trainer.optimize = optimize
    main(sys.argv[1:])
    """
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="module")
def reference(recipe_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    """The uninterrupted run every interrupted one must equal, bit for bit."""
    torch.set_num_threads(1)
    trainer = Trainer(load_recipe(recipe_file), tmp_path_factory.mktemp("reference"), quiet=True)
    trainer.fit()
    assert trainer.step == STEPS
    return trainer


def _child(recipe_file: Path, out: Path, after: int, sig: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FAULT_AFTER": str(after), "FAULT_SIGNAL": sig}
    args = [sys.executable, "-c", _CHILD, str(recipe_file), "--out", str(out), "--quiet"]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _resume_to_end(recipe_file: Path, out: Path) -> Trainer:
    trainer = Trainer(load_recipe(recipe_file), out, resume=True, quiet=True)
    trainer.fit()
    return trainer


def _assert_same_training_state(a: Trainer, b: Trainer) -> None:
    sa, sb = a.method.state_dict(), b.method.state_dict()
    assert sa.keys() == sb.keys() and any(k.startswith("memory.") for k in sa)
    for key in sa:  # weights, BN statistics, and the queue (memory.embeddings/indices/ptr)
        assert torch.equal(sa[key], sb[key]), key
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        assert torch.equal(oa["state"][i]["momentum_buffer"], ob["state"][i]["momentum_buffer"])
    assert (a.epoch, a.step) == (b.epoch, b.step)


# ------------------------------------------------------------------------------------------ SIGKILL
@pytest.mark.parametrize("seed", [1, 0, 5])  # kills after steps 5, 13, 20: epochs 1, 2, 3
def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(
    seed: int, recipe_file: Path, reference: Trainer, tmp_path: Path
) -> None:
    after = random.Random(seed).randrange(1, STEPS)  # steps completed before the kill
    child = _child(recipe_file, tmp_path / "run", after, "SIGKILL")
    assert child.returncode == -signal.SIGKILL, child.stderr
    epochs_done = after // PER_EPOCH
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == [
        f"epoch-{e:04d}.pt" for e in range(max(1, epochs_done - 1), epochs_done + 1) if e > 0
    ]
    resumed = _resume_to_end(recipe_file, tmp_path / "run")
    _assert_same_training_state(reference, resumed)


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one(
    recipe_file: Path, reference: Trainer, tmp_path: Path
) -> None:
    """Killed inside the checkpoint's rename: a temp file is left over, never a half checkpoint."""
    child_code = _CHILD.replace(
        "Trainer.optimize = optimize",
        textwrap.dedent(
            """
            real_replace = os.replace
            def replace(src, dst, *a, **k):
                if str(dst).endswith("epoch-0002.pt"):
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_replace(src, dst, *a, **k)
            os.replace = replace
            """
        ),
    )
    env = {**os.environ, "FAULT_AFTER": "1000", "FAULT_SIGNAL": "SIGKILL"}
    out = tmp_path / "run"
    args = [sys.executable, "-c", child_code, str(recipe_file), "--out", str(out), "--quiet"]
    child = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert [p.name for p in list_checkpoints(out)] == ["epoch-0001.pt"]
    assert any(p.name.startswith(".epoch-0002.pt.tmp-") for p in (out / "checkpoints").iterdir())
    _assert_same_training_state(reference, _resume_to_end(recipe_file, out))


# ------------------------------------------------------------------------------------ SIGTERM/INT
def test_sigterm_mid_epoch_saves_a_checkpoint_and_exits_143(
    recipe_file: Path, reference: Trainer, tmp_path: Path
) -> None:
    child = _child(recipe_file, tmp_path / "run", 10, "SIGTERM")  # step 11 = epoch 2, step 4
    assert child.returncode == 143, child.stderr
    lines = child.stderr.strip().splitlines()
    assert lines[-1].startswith("interrupted by SIGTERM: checkpoint saved to "), child.stderr
    assert lines[-1].endswith("epoch-0001-step-0004.pt; continue with --resume")
    assert "Traceback" not in child.stderr
    state = safe_load(tmp_path / "run" / "checkpoints" / "epoch-0001-step-0004.pt")
    assert (state["epoch"], state["step"], state["epoch_step"]) == (1, 11, 4)
    _assert_same_training_state(reference, _resume_to_end(recipe_file, tmp_path / "run"))


def test_sigint_in_process_mid_epoch_then_resume_is_exact(
    recipe_file: Path, reference: Trainer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, calls = Trainer.optimize, [0]

    def optimize(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 17:  # epoch 3, step 3
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kwargs)

    previous = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "optimize", optimize)
        with pytest.raises(Interrupted) as info:
            Trainer(load_recipe(recipe_file), tmp_path, quiet=True).fit()
    assert info.value.exit_code == 130 and info.value.checkpoint.name == "epoch-0002-step-0003.pt"
    assert signal.getsignal(signal.SIGINT) is previous  # the handler is only installed while training
    resumed = Trainer(load_recipe(recipe_file), tmp_path, resume=True, quiet=True)
    assert (resumed.epoch, resumed.step, resumed.epoch_step) == (2, 17, 3)
    resumed.fit()
    _assert_same_training_state(reference, resumed)


# ---------------------------------------------------------------------------- truncated checkpoint
def test_truncated_newest_checkpoint_is_skipped_with_a_warning(
    recipe_file: Path, reference: Trainer, tmp_path: Path
) -> None:
    child = _child(recipe_file, tmp_path / "run", 16, "SIGKILL")
    assert child.returncode == -signal.SIGKILL, child.stderr
    newest = tmp_path / "run" / "checkpoints" / "epoch-0002.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint.*epoch-0002.pt"):
        resumed = Trainer(load_recipe(recipe_file), tmp_path / "run", resume=True, quiet=True)
    assert (resumed.epoch, resumed.step) == (1, 7)
    resumed.fit()
    _assert_same_training_state(reference, resumed)


# ---------------------------------------------------------------------------------------- disk full
def _enospc_after_half(real_save):
    """A ``torch.save`` that writes half its bytes and then fails like a full disk (no file name)."""

    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return save


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(
    recipe_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = torch.save
    full = _enospc_after_half(real_save)
    saves = [0]

    def save(obj, f, *args, **kwargs):
        saves[0] += 1
        return (full if saves[0] == 2 else real_save)(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    result = CliRunner().invoke(train_main, [str(recipe_file), "--out", str(out), "--quiet"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == [f"error: {os.strerror(errno.ENOSPC)}: {out / 'checkpoints' / 'epoch-0002.pt'}"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001.pt"]  # no temp left
    assert safe_load(out / "checkpoints" / "epoch-0001.pt")["epoch"] == 1


# ------------------------------------------------------------------------------ banks and indices
@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("enc") / "enc.pt"
    torch.manual_seed(0)
    header = EncoderHeader("small_cnn", False, 256, 16, IMAGENET_MEAN, IMAGENET_STD)
    export_encoder(build_backbone("small_cnn"), header, path)
    return path


SPEC = "digits,split=test"  # 450 images: 9 batches of 50


@pytest.fixture(scope="module")
def straight_bank(encoder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bank") / "bank.h5"
    return export_bank(encoder, SPEC, out, batch_size=50, workers=0).path


@pytest.mark.parametrize("seed", [0, 1])
def test_bank_export_killed_at_a_random_batch_then_rerun_is_identical(
    seed: int, encoder: Path, straight_bank: Path, tmp_path: Path
) -> None:
    batches = random.Random(seed).randrange(0, 9)
    out = tmp_path / "bank.h5"
    args = [sys.executable, "-c", KILLED_EXPORT, str(encoder), SPEC, str(out), str(batches), "0"]
    child = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    with pytest.raises(BankError, match="incomplete"):  # never reads as complete before it is
        FeatureBank.open(out)
    result = export_bank(encoder, SPEC, out, batch_size=50, workers=0)
    assert result.resumed_from == 50 * batches and result.rows == 450
    assert bank_contents(out) == bank_contents(straight_bank)


def test_disk_full_during_a_bank_write_leaves_an_incomplete_bank_that_resumes(
    encoder: Path, straight_bank: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import h5py

    real_setitem, writes = h5py.Dataset.__setitem__, [0]

    def setitem(self, key, value):
        if self.name == "/features":
            writes[0] += 1
            if writes[0] == 4:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_setitem(self, key, value)

    out = tmp_path / "bank.h5"
    args = ["export", "--checkpoint", str(encoder), "--data", SPEC, "--out", str(out), "--quiet"]
    with monkeypatch.context() as patch:
        patch.setattr(h5py.Dataset, "__setitem__", setitem)
        result = CliRunner().invoke(index_main, [*args, "--batch-size", "50", "--workers", "0"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {os.strerror(errno.ENOSPC)}: {out}"]
    with pytest.raises(BankError, match=r"incomplete \(150 of 450 rows\)"):
        FeatureBank.open(out)
    assert export_bank(encoder, SPEC, out, batch_size=50, workers=0).resumed_from == 150
    assert bank_contents(out) == bank_contents(straight_bank)


_INDEX_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import isdretrieve.index.build as index

    def die(*args, **kwargs):  # at write_manifest: index.faiss and bank.h5 in place, the manifest not yet
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(index, sys.argv[3], die)
    index.build_index(sys.argv[1], sys.argv[2], factory="IVF8,Flat", queries=100)
    """
)


@pytest.mark.parametrize("where", ["_add", "write_manifest"])
def test_index_build_killed_is_never_opened_and_rerun_completes(
    where: str, straight_bank: Path, tmp_path: Path
) -> None:
    out = tmp_path / "idx"
    build_index(straight_bank, out, factory="Flat")  # an older finished index in the same folder
    args = [sys.executable, "-c", _INDEX_CHILD, str(straight_bank), str(out), where]
    child = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    if where == "write_manifest":  # the rebuild had started: the old manifest is gone, the new not written
        with pytest.raises(IsdError, match="not a finished index directory: manifest.json is missing"):
            SearchIndex.open(out)
    else:  # killed before touching the folder: the old index is still whole and opens
        with SearchIndex.open(out) as index:
            assert index.manifest.factory == "Flat"
    manifest = build_index(straight_bank, out, factory="IVF8,Flat", queries=100)
    reference = build_index(straight_bank, tmp_path / "ref", factory="IVF8,Flat", queries=100)
    assert manifest.params == reference.params and manifest.recall == reference.recall
    with SearchIndex.open(out) as a, SearchIndex.open(tmp_path / "ref") as b:
        queries = a.bank.features(0, 20)
        da, ia = a.search(queries, 5)
        db, ib = b.search(queries, 5)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(da, db)


_MINE_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import isdretrieve.mine.mining as mining
    from isdretrieve.files.pairs import MiningParams

    real, calls = mining.drop_self_matches, [0]

    def die_after(*args):
        calls[0] += 1
        if calls[0] > int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)

    mining.drop_self_matches = die_after
    mining.mine_pairs(sys.argv[1], sys.argv[2], MiningParams(k=4, mutual=True), chunk_rows=50)
    """
)


def _pairs_arrays(path: Path) -> tuple:
    pairs = Pairs.open(path)
    return tuple(
        getattr(pairs, name).tobytes()
        for name in ("offsets", "rows", "similarities", "candidate_rows", "candidate_similarities")
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_mining_killed_at_a_random_chunk_then_rerun_is_identical(
    seed: int, straight_bank: Path, tmp_path: Path
) -> None:
    chunks = random.Random(seed).randrange(0, 9)  # 450 rows in chunks of 50
    params = MiningParams(k=4, mutual=True)
    reference = tmp_path / "ref.h5"
    mine_pairs(straight_bank, reference, params, chunk_rows=50)
    out = tmp_path / "pairs.h5"
    args = [sys.executable, "-c", _MINE_CHILD, str(straight_bank), str(out), str(chunks)]
    child = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert not out.exists()  # pairs.h5 appears only complete (atomic rename)
    with pytest.raises(BankError, match="not found"):
        Pairs.open(out)
    done = []
    mine_pairs(straight_bank, out, params, chunk_rows=50, progress=lambda rows, n: done.append(rows))
    assert done[0] == 50 * (chunks + 1)  # resumed after the chunks that were on disk
    assert _pairs_arrays(out) == _pairs_arrays(reference)


def test_disk_full_while_mining_is_one_line_and_the_rerun_resumes(
    straight_bank: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import h5py

    real_setitem, writes = h5py.Dataset.__setitem__, [0]

    def setitem(self, key, value):
        if self.name == "/rows":
            writes[0] += 1
            if writes[0] == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_setitem(self, key, value)

    out = tmp_path / "pairs.h5"
    args = ["mine", str(straight_bank), "--out", str(out), "-k", "4", "--chunk-rows", "50", "--quiet"]
    with monkeypatch.context() as patch:
        patch.setattr(h5py.Dataset, "__setitem__", setitem)
        result = CliRunner().invoke(index_main, args)
    assert result.exit_code == 2
    partial = out.with_name("pairs.h5.partial")
    assert result.output.strip().splitlines() == [f"error: {os.strerror(errno.ENOSPC)}: {partial}"]
    assert not out.exists()
    resumed = CliRunner().invoke(index_main, args)
    assert resumed.exit_code == 0, resumed.output
    mine_pairs(straight_bank, tmp_path / "ref.h5", MiningParams(k=4), chunk_rows=50)
    assert _pairs_arrays(out) == _pairs_arrays(tmp_path / "ref.h5")
