"""SePP: positive lists (partner draws, the random control, negative masks), the partner data path and
SePP-MoCo / SePP-ISD runs on digits with pairs mined from a real digits bank."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import train_until_checkpoint

from isdretrieve.bank.export import export_bank
from isdretrieve.data.open import open_dataset
from isdretrieve.errors import RecipeError
from isdretrieve.files.pairs import MiningParams, Pairs
from isdretrieve.mine.mining import mine_pairs
from isdretrieve.train.batches import BatchSource
from isdretrieve.train.distributed import DistContext
from isdretrieve.train.engine import Trainer
from isdretrieve.train.positives import PositiveLists
from isdretrieve.train.recipe import recipe_from_data

pytestmark = pytest.mark.usefixtures("one_thread")


LISTS = PositiveLists(torch.tensor([0, 2, 2, 5, 6]), torch.tensor([1, 3, 0, 1, 2, 0]))  # 4 images


def test_partner_map_draws_only_listed_members_uniformly():
    counts = np.zeros((4, 4))
    for epoch in range(3000):
        partners = LISTS.partner_map(seed=0, epoch=epoch)
        counts[np.arange(4), partners.numpy()] += 1
    assert counts[1, 1] == 3000  # image 1 has no positives: its own partner
    assert counts[0, [1, 3]].sum() == 3000 and counts[2, [0, 1, 2]].sum() == 3000
    assert counts[3, 0] == 3000
    assert np.allclose(counts[0, [1, 3]] / 3000, 0.5, atol=0.04)
    assert np.allclose(counts[2, [0, 1, 2]] / 3000, 1 / 3, atol=0.04)
    assert torch.equal(LISTS.partner_map(0, 7), LISTS.partner_map(0, 7))  # a resume redraws the same


def test_partner_probability_zero_means_no_partners():
    assert torch.equal(LISTS.partner_map(0, 0, p=0.0), torch.arange(4))


def test_random_control_keeps_list_sizes_and_never_pairs_an_image_with_itself():
    n = 500
    offsets = torch.arange(0, 3 * n + 1, 3)
    lists = PositiveLists(offsets, torch.zeros(3 * n, dtype=torch.long))
    control = lists.randomised(seed=1)
    assert torch.equal(control.counts, lists.counts)
    owners = torch.repeat_interleave(torch.arange(n), 3)
    assert not (control.members == owners).any()
    assert len(torch.unique(control.members)) > 0.9 * n  # spread over the data set


def test_queue_mask_matches_brute_force():
    indices = torch.tensor([0, 1, 2, 3])
    queue = torch.tensor([3, -1, 0, 1, 2, 1, 0])
    mask = LISTS.queue_mask(indices, queue)
    positives = {0: {1, 3}, 1: set(), 2: {0, 1, 2}, 3: {0}}
    expected = torch.tensor([[int(q) in positives[int(i)] for q in queue] for i in indices])
    assert torch.equal(mask, expected)


def test_queue_mask_matches_brute_force_on_long_lists():
    """Lists long enough that ``torch.isin`` would take its sorting path; empty queue slots hold −1."""
    g = torch.Generator().manual_seed(0)
    n = 300
    counts = torch.randint(0, 21, (n,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    lists = PositiveLists(offsets, torch.randint(0, n, (int(offsets[-1]),), generator=g))
    indices = torch.randperm(n, generator=g)[:48]
    queue = torch.randint(-1, n, (1024,), generator=g)
    mask = lists.queue_mask(indices, queue)
    members = [set(lists.members[offsets[i] : offsets[i + 1]].tolist()) for i in range(n)]
    expected = torch.tensor([[q in members[i] for q in queue.tolist()] for i in indices.tolist()])
    assert expected.any() and (queue == -1).any()
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("in_memory", ["yes", "no"])
def test_batches_carry_the_partner_images(in_memory):
    dataset = open_dataset("digits")
    source = BatchSource(
        dataset,
        batch_size=64,
        dist=DistContext(),
        device=torch.device("cpu"),
        seed=0,
        in_memory=in_memory,
        workers=0,
    )
    partners = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    batch = next(iter(source.epoch(0, partners=partners)))
    assert torch.equal(batch.partners, partners[batch.indices])
    expected = torch.stack([dataset[int(j)][0] for j in batch.partners])
    assert torch.equal(batch.partner_images, expected)


def sepp_recipe(pairs_path, base="moco", **method) -> dict:
    base_cfg = {"queue_size": 256} if base == "isd" else {"queue_size": 256, "proj_hidden": 64}
    return {
        "method": {"name": "sepp", "base": base, "pairs": str(pairs_path), base: base_cfg, **method},
        "data": {"train": "digits", "preset": "digits"},
        "optim": {"batch_size": 64, "epochs": 2, "lr": 0.05},
        "engine": {"seed": 3, "log_every": 5},
        "monitor": {"every": 0},
    }


def test_lists_in_dataset_space_follow_the_pairs_file(digits_pairs):
    pairs, _ = digits_pairs
    offsets, members = pairs.in_dataset_space(len(pairs))
    ds = pairs.dataset_indices
    for row in (0, 5, 700):
        i = ds[row]
        assert sorted(members[offsets[i] : offsets[i + 1]].tolist()) == sorted(ds[pairs.positives(row)[0]])


@pytest.mark.parametrize("base", ["moco", "isd"])
def test_sepp_trains_with_its_partners_and_resumes_exactly(digits_pairs, tmp_path, base, monkeypatch):
    pairs, path = digits_pairs
    seen = []
    straight = Trainer(recipe_from_data(sepp_recipe(path, base)), tmp_path / "a", quiet=True)
    forward = type(straight.method).forward

    def spy(self, batch):
        seen.append((batch.indices.clone(), batch.partners.clone()))
        return forward(self, batch)

    monkeypatch.setattr(type(straight.method), "forward", spy)
    straight.fit()
    monkeypatch.setattr(type(straight.method), "forward", forward)
    offsets, members = pairs.in_dataset_space(len(pairs))
    for indices, partners in seen:
        for i, j in zip(indices.tolist(), partners.tolist(), strict=True):
            listed = members[offsets[i] : offsets[i + 1]]
            assert j in listed if len(listed) else j == i
    rate = np.mean([(p != i).float().mean().item() for i, p in seen])
    assert rate == pytest.approx(pairs.coverage, abs=0.05)

    train_until_checkpoint(recipe_from_data(sepp_recipe(path, base)), tmp_path / "b", monkeypatch)
    resumed = Trainer(recipe_from_data(sepp_recipe(path, base)), tmp_path / "b", resume=True, quiet=True)
    resumed.fit()
    a, b = straight.method.state_dict(), resumed.method.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_random_control_and_mined_runs_differ_only_in_partners(digits_pairs, tmp_path):
    _, path = digits_pairs
    mined = Trainer(recipe_from_data(sepp_recipe(path)), tmp_path / "m", quiet=True)
    control = Trainer(recipe_from_data(sepp_recipe(path, partners="random")), tmp_path / "r", quiet=True)
    assert torch.equal(mined.method.positives.counts, control.method.positives.counts)
    assert not torch.equal(mined.method.positives.members, control.method.positives.members)


def test_pairs_of_another_data_set_are_refused(digits_pairs, tmp_path):
    _, path = digits_pairs
    recipe = sepp_recipe(path)
    recipe["data"]["train"] = "digits,split=test"
    with pytest.raises(RecipeError, match="was mined over 1347 images, the training set has 450"):
        Trainer(recipe_from_data(recipe), tmp_path / "x", quiet=True)


def test_missing_pairs_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="method.pairs"):
        Trainer(recipe_from_data(sepp_recipe("")), tmp_path / "x", quiet=True)


def test_pairs_file_round_trip(digits_pairs):
    pairs, path = digits_pairs
    again = Pairs.open(path)
    assert again.params == pairs.params and again.num_pairs == pairs.num_pairs


def test_pairs_of_other_images_of_the_same_count_are_refused(tmp_path, make_encoder):
    from PIL import Image

    for name in ("a", "b"):
        for c in range(2):
            folder = tmp_path / name / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (16, 16), (40 * i, 80 * c, 9)).save(folder / f"{name}{i}.png")
    encoder = make_encoder(tmp_path / "enc.pt")
    bank = export_bank(encoder, f"folder:{tmp_path / 'a'}", tmp_path / "bank.h5", workers=0)
    mine_pairs(bank.path, tmp_path / "pairs.h5", MiningParams(k=1))
    recipe = sepp_recipe(tmp_path / "pairs.h5")
    recipe["data"] = {"train": f"folder:{tmp_path / 'b'}", "preset": "cifar"}
    recipe["optim"]["batch_size"] = 2
    with pytest.raises(RecipeError, match="mined over other images than data.train"):
        Trainer(recipe_from_data(recipe), tmp_path / "run", quiet=True)
