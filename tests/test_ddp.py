"""DDP on 2 CPU processes (gloo): every rank enqueues the global batch, so after N steps the queue (and
the weights) equal those of one process given the same global batches.

Per-rank BatchNorm sees only its half of the batch, so the halves are given identical images (BN
statistics of [x; x] equal those of x) but distinct dataset indices, which pins the rank order.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

from isdretrieve.train.engine import Trainer
from isdretrieve.train.methods.base import Batch
from isdretrieve.train.recipe import recipe_from_data

STEPS, LOCAL = 3, 16


def _recipe(batch_size: int):
    return recipe_from_data(
        {
            "method": {"name": "isd", "queue_size": 64, "shuffle_bn": False},
            "data": {"train": "digits", "preset": "digits"},
            "optim": {"batch_size": batch_size, "epochs": 1, "lr": 0.1},
            "monitor": {"every": 0},
        }
    )


def _views(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return [torch.randn(LOCAL, 3, 16, 16, generator=g) for _ in range(2)]


def _run(trainer: Trainer, rank: int, world: int) -> dict:
    for step in range(STEPS):
        views = _views(step)
        if world == 1:  # the global batch: both ranks' halves
            views = [torch.cat([v, v]) for v in views]
            indices = torch.arange(2 * LOCAL) + 100 * step
        else:
            indices = torch.arange(rank * LOCAL, (rank + 1) * LOCAL) + 100 * step
        trainer.optimize(Batch(views, indices, torch.zeros_like(indices), progress=0.0))
    return {k: v.clone() for k, v in trainer.method.state_dict().items()}


def _worker(rank: int, world: int, port: int, out: str, ckpt_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    trainer = Trainer(_recipe(2 * LOCAL), f"{ckpt_dir}/rank{rank}", quiet=True)
    torch.save(_run(trainer, rank, world), f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_queue_and_weights_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = _run(Trainer(_recipe(2 * LOCAL), tmp_path / "single", quiet=True), 0, 1)

    # both ranks hold the same queue, written in rank order with the global batch
    assert torch.equal(ranks[0]["memory.indices"], ranks[1]["memory.indices"])
    assert torch.equal(ranks[0]["memory.embeddings"], ranks[1]["memory.embeddings"])
    assert torch.equal(ranks[0]["memory.indices"], single["memory.indices"])
    # 3 pushes of 32 into 64 rows: step 2 wrapped onto rows 0-31, step 1 sits in rows 32-63
    assert ranks[0]["memory.indices"].tolist() == list(range(200, 232)) + list(range(100, 132))
    assert ranks[0]["memory.ptr"].item() == STEPS * 2 * LOCAL % 64
    torch.testing.assert_close(
        ranks[0]["memory.embeddings"], single["memory.embeddings"], atol=2e-5, rtol=1e-4
    )
    for key, value in single.items():  # gradients were averaged across ranks (BN running stats differ:
        # the unbiased variance of [x; x] is not that of x)
        if key.startswith(("student.", "predictor.", "teacher.")) and "running_" not in key:
            torch.testing.assert_close(ranks[0][key], value, atol=2e-5, rtol=1e-4, msg=key)


def _shuffle_worker(rank: int, world: int, port: int, out: str) -> None:
    from isdretrieve.train.distributed import all_gather_cat
    from isdretrieve.train.shuffle_bn import shuffled_forward

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo")
    x = _shuffle_batch()[rank * LOCAL : (rank + 1) * LOCAL]
    linear, bn = _shuffle_nets()
    results = {
        "linear": shuffled_forward(linear, x, seed=5, progress=0.3, gather=all_gather_cat),
        "bn": shuffled_forward(bn, x, seed=5, progress=0.3, gather=all_gather_cat),
        "bn_plain": bn(x).detach(),
    }
    torch.save(results, f"{out}/shuffle{rank}.pt")
    torch.distributed.destroy_process_group()


def _shuffle_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(2 * LOCAL, 6, generator=g) * torch.linspace(0.5, 3, 2 * LOCAL)[:, None]


def _shuffle_nets() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    return torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(6)


def test_shuffle_bn_across_ranks_is_an_exact_inverse_with_per_rank_statistics(tmp_path):
    from isdretrieve.train.shuffle_bn import shuffle_permutation

    mp.spawn(_shuffle_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"shuffle{r}.pt") for r in range(2)]
    x = _shuffle_batch()
    linear, bn = _shuffle_nets()
    # a per-sample network: shuffle then unshuffle returns every rank's own rows exactly
    for r in range(2):
        torch.testing.assert_close(ranks[r]["linear"], linear(x[r * LOCAL : (r + 1) * LOCAL]).detach())
    # BN: each rank normalised its slice of the permuted global batch; the keys come back unshuffled
    perm = shuffle_permutation(2 * LOCAL, 5, 0.3, torch.device("cpu"))
    shuffled = torch.cat([bn(x[perm[r * LOCAL : (r + 1) * LOCAL]]).detach() for r in range(2)])
    expected = shuffled[torch.argsort(perm)]
    for r in range(2):
        torch.testing.assert_close(ranks[r]["bn"], expected[r * LOCAL : (r + 1) * LOCAL])
        assert not torch.allclose(ranks[r]["bn"], ranks[r]["bn_plain"], atol=1e-3)  # other statistics
