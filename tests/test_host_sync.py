"""A training step queues its GPU work without waiting for it: no op in it needs a host sync on CUDA.

A host sync (reading a value back, an output whose size depends on the data, a tensor made from Python
numbers and copied from host memory) makes the host wait until the GPU has run everything queued, so the
host can no longer launch the next step's augmentation while the GPU is still busy with this one's
backward pass. On CPU the check is on the ATen ops a step dispatches; on a GPU (``-m gpu``) CUDA's own
sync detector checks the same steps.
"""

from __future__ import annotations

import traceback
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import isdretrieve.data.augment as augment
from isdretrieve.train.batches import epoch_generator
from isdretrieve.train.engine import Trainer
from isdretrieve.train.recipe import recipe_from_data

aten = torch.ops.aten
# ops that synchronise with the host on CUDA: a value read back, data-dependent output sizes (isin's
# sorting path sizes its unique values), and tensors made from Python data (copied from host memory)
SYNCING = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
    aten.bincount.default,
    aten.isin.Tensor_Tensor,
    aten.lift_fresh.default,
    aten.lift_fresh_copy.default,
}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}

METHODS = {
    "isd": {"name": "isd", "queue_size": 256},
    "moco": {"name": "moco", "queue_size": 256, "proj_hidden": 64},
    "byol": {"name": "byol", "proj_hidden": 64},
    "adasim-byol": {"name": "adasim", "k": 5, "window": 1, "byol": {"proj_hidden": 64}},
    "adasim-dino": {
        "name": "adasim",
        "base": "dino",
        "k": 5,
        "window": 1,
        "dino": {"head_hidden": 32, "bottleneck": 8, "out_dim": 64},
    },
    "sepp-moco": {"name": "sepp", "base": "moco", "moco": {"queue_size": 256, "proj_hidden": 64}},
    "sepp-isd": {"name": "sepp", "base": "isd", "isd": {"queue_size": 256}},
}


def _recipe(method: str, pairs_path, device: str, compile: bool = False) -> dict:
    spec = dict(METHODS[method])
    if spec["name"] == "sepp":
        spec["pairs"] = str(pairs_path)
    return {
        "method": spec,
        "data": {"train": "digits", "preset": "digits", "in_memory": "yes"},
        "model": {"arch": "small_cnn"},
        "optim": {"batch_size": 64, "epochs": 2, "lr": 0.05, "warmup_epochs": 1},
        "engine": {"seed": 0, "device": device, "compile": compile},
        "monitor": {"every": 0},
    }


def _steps(trainer: Trainer, n: int):
    """A generator running ``n`` training steps as the engine does between log steps, one per ``next``."""
    generator = epoch_generator(0, 0, trainer.device, stream=1)
    batches = trainer.batches.epoch(0, 0, trainer.method.partner_map(0))
    for _ in range(n):
        trainer.optimize(trainer._batch(next(batches), generator))
        yield


def run_with_syncs_as_errors(trainer: Trainer, steps: int = 5, warmup: int = 2) -> None:
    """``steps`` training steps on CUDA, every host sync an error after the first ``warmup`` (where
    compilation, cuDNN's autotuning and the optimiser's state happen)."""
    run = _steps(trainer, steps)
    for _ in range(warmup):
        next(run)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in run:
            pass
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


class SyncingOps(TorchDispatchMode):
    """Records each dispatched op that would sync on CUDA, with the project line that called it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[tuple[str, str]] = Counter()

    @property
    def found(self) -> set[tuple[str, str]]:
        return set(self.calls)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        syncs = func in SYNCING
        if func in INDEXING:  # boolean masks are turned into indices with nonzero
            syncs = any(t is not None and t.dtype == torch.bool for t in args[1])
        if syncs:
            ours = [f for f in traceback.extract_stack() if "isdretrieve" in f.filename]
            where = f"{ours[-1].filename.rsplit('isdretrieve', 1)[-1]}:{ours[-1].lineno}" if ours else "?"
            self.calls[(str(func), where)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def masked_jitter(monkeypatch):
    """The colour jitter in its GPU form: masked (on CPU it gathers each op's samples, which syncs)."""
    real_jitter = augment.color_jitter

    def masked(*args, gather=None, **kwargs):
        return real_jitter(*args, gather=False, **kwargs)

    monkeypatch.setattr(augment, "color_jitter", masked)


@pytest.mark.usefixtures("masked_jitter")
@pytest.mark.parametrize("method", list(METHODS))
def test_a_training_step_dispatches_no_op_that_syncs_on_a_gpu(tmp_path, digits_pairs, method):
    trainer = Trainer(recipe_from_data(_recipe(method, digits_pairs[1], "cpu")), tmp_path, quiet=True)
    steps = _steps(trainer, 3)
    next(steps)  # the first step builds lazily (queues, momentum buffers)
    probe = SyncingOps()
    with probe:
        for _ in steps:
            pass
    assert not probe.found, f"ops that would sync a GPU in a {method} step: {sorted(probe.found)}"


@pytest.mark.usefixtures("masked_jitter")
def test_the_engine_loop_syncs_per_epoch_not_per_step(tmp_path, digits_pairs):
    """The whole epoch as ``fit`` runs it (schedule, NaN flag, progress, epoch end, checkpoint): its
    syncing ops are the same for 2 and for 6 steps, so none of them is per step."""
    found = []
    for steps in (2, 6):
        data = _recipe("isd", digits_pairs[1], "cpu")
        data["optim"]["max_steps"] = steps
        data["engine"]["log_every"] = 1000
        trainer = Trainer(recipe_from_data(data), tmp_path / str(steps), quiet=True)
        probe = SyncingOps()
        with probe:
            trainer._train_epoch()
        assert trainer.step == steps
        found.append(probe.calls)
    assert found[0] == found[1], f"per-step syncs: {found[1] - found[0]}"


def _ops_found(fn) -> set[str]:
    probe = SyncingOps()
    with probe:
        fn()
    return {op for op, _ in probe.found}


def test_the_probe_finds_syncing_ops():
    """The probe sees what it looks for: an item(), a boolean mask, a tensor made from a list."""
    x = torch.arange(6.0)
    assert _ops_found(lambda: x.sum().item()) == {"aten._local_scalar_dense.default"}
    assert _ops_found(lambda: x[x > 2].sum()) == {"aten.index.Tensor"}
    assert _ops_found(lambda: torch.tensor([1.0, 2.0]) + x[:2]) == {"aten.lift_fresh.default"}
    assert _ops_found(lambda: x[torch.tensor([0, 2])].sum()) == {"aten.lift_fresh.default"}  # not the index
    assert _ops_found(lambda: (x * 2).argsort()) == set()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method, compile", [("isd", True), ("byol", False), ("sepp-moco", False)])
def test_training_steps_on_cuda_never_wait_for_the_gpu(tmp_path, digits_pairs, method, compile):
    recipe = recipe_from_data(_recipe(method, digits_pairs[1], "cuda", compile))
    run_with_syncs_as_errors(Trainer(recipe, tmp_path, quiet=True))
