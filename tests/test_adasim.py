"""AdaSim: the neighbour memory, the partner selection rule, the method on the engine, and DDP."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import train_until_checkpoint
from test_ddp import _free_port
from test_engine import _states_equal, tiny

from isdretrieve.errors import Interrupted, RecipeError
from isdretrieve.models.backbones import build_backbone
from isdretrieve.train.engine import Trainer
from isdretrieve.train.methods.adasim import AdaSim
from isdretrieve.train.methods.base import Batch, DataContext
from isdretrieve.train.methods.build import build_method
from isdretrieve.train.neighbour_memory import (
    NeighbourHistory,
    NeighbourLists,
    nearest_other,
    select_partners,
    topk_neighbours,
    window_average,
)
from isdretrieve.train.objectives import dino_cross_entropy
from isdretrieve.train.recipe import AdasimConfig, ByolConfig, DinoConfig, Recipe, recipe_from_data

# ------------------------------------------------------------------------------ the selection rule


def _select(own, cands, scores, k, tau, n=1, seed=0):
    """Apply the rule to ``n`` copies of each row (scores given per candidate, no window)."""
    own = torch.tensor(own).repeat(n)
    cands, scores = torch.tensor(cands).repeat(n, 1), torch.tensor(scores).repeat(n, 1)
    uniform = torch.rand(own.shape[0], k, generator=torch.Generator().manual_seed(seed))
    return select_partners(own, cands, scores, k, tau, uniform)


def test_gate_keeps_the_image_itself_when_it_does_not_rank_first():
    # image 0: a neighbour (7) scores above itself → no bootstrapping, whatever τ
    partners, gate = _select([0], [[7, 0, 3]], [[0.95, 0.9, 0.8]], k=3, tau=1e6, n=500)
    assert not gate.any() and (partners == 0).all()
    # itself absent from its window (never retrieved itself) → no bootstrapping either
    partners, gate = _select([0], [[7, 3]], [[0.95, 0.8]], k=2, tau=1e6, n=50)
    assert not gate.any() and (partners == 0).all()


def test_tiny_tau_keeps_the_image_itself_the_plain_base_method():
    partners, gate = _select([0], [[0, 4, 5, 6]], [[0.9, 0.8999, 0.89, 0.5]], k=4, tau=1e-6, n=2000)
    assert gate.all() and (partners == 0).all()


def test_huge_tau_is_uniform_over_the_top_k_including_self():
    cands = [[0, 4, 5, 6, 8, 9]]
    scores = [[0.9, 0.2, 0.85, 0.1, -0.5, 0.3]]  # top-4: 0 (self), 5, 9, 4
    partners, gate = _select([0], cands, scores, k=4, tau=1e6, n=8000)
    assert gate.all()
    freq = torch.bincount(partners, minlength=10).float() / partners.numel()
    assert freq[[6, 8]].sum() == 0  # outside the top-k: never
    for j in (0, 4, 5, 9):  # 1/4 each; σ = 0.0048
        assert abs(freq[j].item() - 0.25) < 0.025, (j, freq[j])


def test_moderate_tau_matches_the_softmax_by_hand():
    # p(neighbour) = e^{(0.899−0.9)/0.001} / (1 + e^{−1}) = 1/(1+e) = 0.2689
    partners, _ = _select([0], [[0, 3]], [[0.9, 0.899]], k=2, tau=0.001, n=20000, seed=1)
    assert abs((partners == 3).float().mean().item() - 0.2689) < 0.015


def test_window_average_counts_absent_epochs_as_zero():
    # W=2, k=2: epoch A lists [0: .9, 1: .5], epoch B lists [0: .7, 2: .6]; row 1 has one empty slot
    idx = torch.tensor([[0, 1, 0, 2], [1, -1, 1, 0]])
    sims = torch.tensor([[0.9, 0.5, 0.7, 0.6], [0.8, 0.0, 0.6, 0.4]])
    cands, scores = window_average(idx, sims, window=2)
    got = [
        {int(c): round(float(s), 6) for c, s in zip(cands[r], scores[r], strict=True) if s > float("-inf")}
        for r in range(2)
    ]
    assert got == [{0: 0.8, 1: 0.25, 2: 0.3}, {1: 0.7, 0: 0.2}]


def test_naive_partner_is_the_nearest_other_neighbour():
    lists = torch.tensor([[0, 5, 6], [4, 1, 2], [2, -1, -1], [-1, -1, -1]])
    assert nearest_other(torch.arange(4), lists).tolist() == [5, 4, 2, 3]


# ------------------------------------------------------------------------- memory, lists, history


def test_history_is_a_ring_of_the_last_window_epochs():
    lists, history = NeighbourLists(3, k=2), NeighbourHistory(3, window=2, k=2)
    assert history.latest().eq(-1).all() and not history.full
    for epoch in range(3):
        lists.write(torch.arange(3), torch.full((3, 2), 10 * epoch), torch.full((3, 2), epoch / 4))
        history.push(lists)
    assert history.full and int(history.count) == 3
    assert history.indices[0, :, 0].tolist() == [20, 10]  # epoch 2 overwrote epoch 0 (slot 0)
    assert history.latest()[:, 0].tolist() == [20, 20, 20]
    idx, sims = history.flat(slice(0, 2))
    assert idx.shape == sims.shape == (2, 4) and idx.dtype == torch.int32 and sims.dtype == torch.float16


def test_search_skips_unwritten_rows_and_matches_a_full_sort_in_chunks():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    queries = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    valid = torch.ones(50, dtype=torch.bool)
    valid[::3] = False
    idx, sims = topk_neighbours(queries, bank, k=5, valid=valid, chunk=7)
    ref = (queries @ bank.T).masked_fill(~valid, float("-inf")).topk(5, dim=1)
    assert torch.equal(idx, ref.indices) and torch.allclose(sims, ref.values)
    idx, sims = topk_neighbours(queries, bank, k=5, valid=torch.arange(50) < 2, chunk=7)
    assert (idx[:, 2:] == -1).all() and (sims[:, 2:] == 0).all() and (idx[:, :2] >= 0).all()


def _adasim(num_images: int = 12, **cfg) -> AdaSim:
    cfg = AdasimConfig(k=3, window=1, byol=ByolConfig(proj_hidden=32, proj_dim=16), **cfg)
    labels = torch.arange(num_images) % 3
    torch.manual_seed(0)
    return build_method(cfg, build_backbone("small_cnn"), DataContext(num_images, labels, seed=0))


def test_neighbours_are_found_before_the_write_self_included():
    method = _adasim()
    g = torch.Generator().manual_seed(0)
    first, second = (F.normalize(torch.randn(4, 256, generator=g), dim=1) for _ in range(2))
    rows = torch.tensor([2, 5, 7, 9])
    method.remember(first, rows)
    assert (method.lists.indices[rows] == -1).all()  # the memory was empty before this write
    method.remember(second, rows)
    # the second batch's lists were computed against the first batch's rows, then overwritten them
    expected = (second @ first.T).topk(3, dim=1)
    assert torch.equal(method.lists.indices[rows].long(), rows[expected.indices])
    torch.testing.assert_close(method.lists.sims[rows].float(), expected.values, atol=1e-3, rtol=0)
    assert torch.allclose(method.memory.embeddings[rows], second)
    assert method.memory.written.sum() == 4


def test_memory_holds_the_teachers_embedding_of_the_images_own_view(one_thread):
    method = _adasim()
    g = torch.Generator().manual_seed(1)
    own, partner = torch.rand(4, 3, 16, 16, generator=g), torch.rand(4, 3, 16, 16, generator=g)
    indices = torch.tensor([0, 3, 6, 11])
    out = method(Batch([own], indices, indices, 0.0, [partner], torch.tensor([0, 1, 6, 2])))
    assert torch.isfinite(out.loss) and out.logs["bootstrap_rate"].item() == 0.5
    with torch.no_grad():
        own_emb = F.normalize(method.teacher.backbone(own), dim=1)
        partner_emb = F.normalize(method.teacher.backbone(partner), dim=1)
    stored = method.memory.embeddings[indices]
    torch.testing.assert_close(stored, own_emb, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(stored, partner_emb, atol=1e-3)
    assert method.memory.written.nonzero().flatten().tolist() == indices.tolist()


def test_pair_methods_call_the_teacher_itself_for_both_views(one_thread):
    """BYOL and DINO (so AdaSim too) run both views through the teacher's own call, which is what
    ``engine.compile`` compiles: neither view falls back to the eager submodules."""
    dino = DinoConfig(head_hidden=32, bottleneck=8, out_dim=64)
    x, rows = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3)), torch.arange(4)
    for method in (_adasim(), _adasim(base="dino", dino=dino)):
        calls = []
        method.teacher.register_forward_hook(lambda module, args, out, calls=calls: calls.append(1))
        method(Batch([x], rows, rows, 0.0, [x.flip(3)], rows))
        assert len(calls) == 2


def test_dino_base_cross_entropy_and_centre(one_thread):
    student, teacher, center = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2)
    p_t = torch.softmax(torch.tensor([1.0, 0.0]) / 0.5, 0)
    log_p_s = torch.log_softmax(torch.tensor([2.0, 0.0]) / 0.1, 0)
    assert torch.isclose(dino_cross_entropy(student, teacher, center, 0.1, 0.5), -(p_t * log_p_s).sum())
    method = _adasim(base="dino", dino=DinoConfig(head_hidden=32, bottleneck=8, out_dim=64))
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    out = method(Batch([x], torch.arange(4), torch.arange(4), 0.0, [x.flip(3)], torch.arange(4)))
    out.loss.backward()
    assert torch.isfinite(out.loss) and "teacher_entropy" in out.logs
    with torch.no_grad():  # the centre moved a tenth of the way to the teacher's batch-mean logits
        mean = torch.cat([method.teacher(x), method.teacher(x.flip(3))]).mean(dim=0, keepdim=True)
    torch.testing.assert_close(method.base.center, 0.1 * mean, atol=1e-6, rtol=1e-4)


def test_dino_views_and_the_switch_to_strong_views():
    """DINO's views by default: T1 of the image, T2 of its partner, local crops of the image itself."""
    dino = dict(head_hidden=32, bottleneck=8, out_dim=64)
    method = _adasim(base="dino", dino=DinoConfig(**dino))
    assert (method.views, method.partner_views) == (("dino_global1",), ("dino_global2",))
    assert method.base.views == ("dino_global1", "dino_global2")
    method = _adasim(base="dino", dino=DinoConfig(**dino, local_crops=3))
    assert method.views == ("dino_global1", "dino_local", "dino_local", "dino_local")
    assert method.partner_views == ("dino_global2",)
    method = _adasim(base="dino", dino=DinoConfig(**dino, views="strong"))
    assert (method.views, method.partner_views) == (("strong",), ("strong",))
    assert (_adasim().views, _adasim().partner_views) == (("strong",), ("strong",))  # BYOL: as before
    with pytest.raises(RecipeError, match=r"method\.dino\.local_crops: must not be negative"):
        Recipe(method=AdasimConfig(base="dino", dino=DinoConfig(local_crops=-1)))


def test_local_crops_go_through_the_student_once_per_size_and_never_the_teacher(one_thread):
    dino = DinoConfig(head_hidden=32, bottleneck=8, out_dim=64, local_crops=2)
    method = _adasim(base="dino", dino=dino)
    g = torch.Generator().manual_seed(4)
    own, partner = torch.rand(4, 3, 16, 16, generator=g), torch.rand(4, 3, 16, 16, generator=g)
    local = [torch.rand(4, 3, 8, 8, generator=g) for _ in range(2)]
    student, teacher = [], []
    method.student.register_forward_hook(lambda m, args, out: student.append(tuple(args[0].shape)))
    method.teacher.register_forward_hook(lambda m, args, out: teacher.append(tuple(args[0].shape)))
    indices = torch.tensor([1, 4, 6, 9])
    out = method(Batch([own, *local], indices, indices, 0.0, [partner], indices))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert student == [(8, 3, 16, 16), (8, 3, 8, 8)]  # the globals together, then the locals together
    assert teacher == [(4, 3, 16, 16), (4, 3, 16, 16)]  # the two global views only
    with torch.no_grad():  # the memory: the teacher's backbone feature of the image's own T1 view
        own_view = F.normalize(method.teacher.backbone(own), dim=1)
        torch.testing.assert_close(method.memory.embeddings[indices], own_view, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------- on the engine


def _recipe(**method) -> dict:
    data = tiny("byol")
    data["method"] = {"name": "adasim", "k": 5, "window": 1, "byol": {"proj_hidden": 64}, **method}
    return data


def test_mode_plain_is_byol(tmp_path, one_thread):
    off = _recipe(mode="plain")
    off["optim"]["max_steps"] = 4
    byol = Trainer(recipe_from_data(tiny("byol", optim={"max_steps": 4})), tmp_path / "byol", quiet=True)
    byol.fit()
    off = Trainer(recipe_from_data(off), tmp_path / "off", quiet=True)
    off.fit()
    a, b = byol.method.state_dict(), off.method.base.state_dict()
    assert _states_equal(a, b)


def test_adaptive_run_logs_diagnostics_and_resumes_exactly(tmp_path, monkeypatch, one_thread):
    # window 1: epoch 0 is the warm-up, epoch 1's lists (self now in memory) drive epoch 2's partners;
    # τ = 1 so that some images bootstrap on digits
    recipe = recipe_from_data(_recipe(tau=1.0))
    straight = Trainer(recipe, tmp_path / "a", quiet=True)
    straight.fit()
    epochs = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if "epoch_seconds" in r]
    assert len(epochs) == 3
    for r in epochs:
        assert {"bootstrap_rate", "self_retrieval", "nn_label_precision", "feature_std"} <= r.keys()
        assert 0 < r["nn_label_precision"] <= 1 and 0 < r["feature_std"] < 1
    assert epochs[0]["self_retrieval"] == 0  # epoch 0 searched a memory that did not hold itself yet
    assert epochs[1]["self_retrieval"] > 0
    assert [r["bootstrap_rate"] > 0 for r in epochs] == [False, False, True]
    assert "self_first_in_window" in epochs[2]

    # resume from the straight run's epoch-2 checkpoint, stop 3 steps into epoch 2 (a mid-epoch
    # checkpoint) and resume again: each start recomputes epoch 2's partner map from the saved window
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "checkpoints" / "epoch-0002.pt", tmp_path / "b" / "checkpoints")
    real = Trainer.optimize

    def optimize(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if self.step == 44:  # the third step of epoch 2
            self.stop_signal = signal.SIGINT
        return out

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "optimize", optimize)
        with pytest.raises(Interrupted):
            Trainer(recipe, tmp_path / "b", resume=True, quiet=True).fit()
    resumed = Trainer(recipe, tmp_path / "b", resume=True, quiet=True)
    assert (resumed.epoch, resumed.step, resumed.epoch_step) == (2, 45, 3)
    resumed.fit()
    assert _states_equal(straight.method.state_dict(), resumed.method.state_dict())


def _dino_recipe(**dino) -> dict:
    """Plain DINO on the 450 digits test images (7 steps of 64 an epoch), a one-block ViT."""
    data = tiny("byol", optim={"epochs": 2}, model={"arch": "vit_tiny", "depth": 1, "patch": 4})
    data["data"]["train"] = "digits,split=test"
    head = {"out_dim": 64, "head_hidden": 32, "bottleneck": 16}
    data["method"] = {"name": "adasim", "base": "dino", "mode": "plain", "dino": {**head, **dino}}
    return data


@pytest.mark.slow
def test_plain_dino_with_local_crops_trains_and_resumes_exactly(tmp_path, monkeypatch, one_thread):
    """Plain DINO (AdaSim's ``mode: plain``), a one-block ViT, 2 global views at 16 px and 2 local crops
    at 8 px: it trains, and a run stopped after its epoch-1 checkpoint ends where the straight one does."""
    recipe = recipe_from_data(_dino_recipe(local_crops=2))
    straight = Trainer(recipe, tmp_path / "a", quiet=True)
    assert [straight.views[s].size for s in straight.method.views] == [16, 8, 8]
    straight.fit()
    losses = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in losses if "loss" in r]
    assert len(losses) >= 2 and all(math.isfinite(x) for x in losses)

    train_until_checkpoint(recipe, tmp_path / "b", monkeypatch)
    resumed = Trainer(recipe, tmp_path / "b", resume=True, quiet=True)
    assert (resumed.epoch, resumed.step) == (1, 7)
    resumed.fit()
    assert resumed.step == straight.step == 14
    assert _states_equal(straight.method.state_dict(), resumed.method.state_dict())


def test_local_crops_a_backbone_cannot_take_are_one_line_errors(tmp_path):
    vit = {"arch": "vit_tiny", "depth": 1, "patch": 4}
    for model, augment, message in (
        (vit, {"local_size": 6}, "vit_tiny cannot take the 6x6 views"),  # patch 4 does not divide 6
        ({"arch": "timm:test_vit_relpos", "patch": 4}, {}, "timm:test_vit_relpos cannot take the 8x8 views"),
    ):
        data = _dino_recipe(local_crops=1)
        data["model"], data["augment"] = model, augment
        with pytest.raises(RecipeError, match=message) as info:
            Trainer(recipe_from_data(data), tmp_path / message[:8], quiet=True)
        assert "\n" not in str(info.value) and "method.dino.local_crops" in str(info.value)


# ---------------------------------------------------------------------------------------- DDP

STEPS, LOCAL = 3, 8


def _ddp_recipe():
    return recipe_from_data(
        {
            "method": {"name": "adasim", "k": 4, "window": 1, "tau": 1.0, "byol": {"proj_hidden": 32}},
            "data": {"train": "digits", "preset": "digits"},
            "optim": {"batch_size": 2 * LOCAL, "epochs": 1, "lr": 0.1},
            "monitor": {"every": 0},
        }
    )


def _ddp_run(trainer: Trainer, rank: int, world: int) -> dict:
    """STEPS steps on the same 2·LOCAL images (distinct per step), each rank taking its half; BN in
    eval mode so that every embedding depends on its own image only."""
    trainer.method.eval()
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        own, partner = (torch.rand(2 * LOCAL, 3, 16, 16, generator=g) for _ in range(2))
        rows = slice(None) if world == 1 else slice(rank * LOCAL, (rank + 1) * LOCAL)
        indices = torch.arange(2 * LOCAL)[rows]
        trainer.optimize(Batch([own[rows]], indices, indices, 0.0, [partner[rows]], indices))
    trainer.method.end_epoch(0)
    state = {k: v.clone() for k, v in trainer.method.state_dict().items()}
    return {**state, "partners": trainer.method.partner_map(1)}


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    trainer = Trainer(_ddp_recipe(), f"{out}/rank{rank}", quiet=True)
    torch.save(_ddp_run(trainer, rank, world), f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_process_memory_equals_single_process(tmp_path, one_thread):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = _ddp_run(Trainer(_ddp_recipe(), tmp_path / "single", quiet=True), 0, 1)

    memory = [k for k in single if k.startswith(("memory.", "lists.", "history."))] + ["partners"]
    for key in memory:  # every rank holds the same memory: it writes the gathered global batch
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert ranks[0]["memory.written"].sum() == 2 * LOCAL
    assert (ranks[0]["lists.indices"][: 2 * LOCAL, 0] >= 0).all()  # steps 2-3 found earlier rows
    for key in ("memory.written", "lists.indices", "history.indices", "history.count", "partners"):
        assert torch.equal(ranks[0][key], single[key]), key
    for key in ("memory.embeddings", "lists.sims", "history.sims"):
        torch.testing.assert_close(ranks[0][key].float(), single[key].float(), atol=1e-3, rtol=1e-3)
    for key, value in single.items():  # and the weights took the same (rank-averaged) steps
        if key.startswith("base.") and "num_batches" not in key:
            torch.testing.assert_close(ranks[0][key], value, atol=2e-5, rtol=1e-4, msg=key)
