"""The CUDA paths against the CPU ones: augmentation, bank export, mining, and training with the GPU
defaults (bf16 autocast, channels_last, torch.compile, GPU-resident data). Skipped without CUDA; run them
on a GPU machine with ``bash benchmarks/device_session.sh tests``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from isdretrieve.bank.export import export_bank
from isdretrieve.data.augment import (
    augment_views,
    color_jitter,
    eval_view,
    gaussian_blur,
    resized_crop,
    sample_crop_boxes,
    view_config,
)
from isdretrieve.files.bank import FeatureBank
from isdretrieve.files.pairs import MiningParams
from isdretrieve.mine.mining import mine_pairs
from isdretrieve.models.checkpoints import load_backbone
from isdretrieve.train.engine import Trainer
from isdretrieve.train.recipe import recipe_from_data

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_augmentation_ops_on_cuda_equal_cpu():
    """Given the same random parameters, every view op gives the CPU result on the GPU."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand((16, 3, 40, 40), generator=g)
    boxes = sample_crop_boxes(16, 40, 40, (0.2, 1.0), (3 / 4, 4 / 3), g)
    flip = torch.rand(16, generator=g) < 0.5
    factors = 0.6 + 0.8 * torch.rand((16, 4), generator=g)
    factors[:, 3] -= 1.0
    order = torch.rand((16, 4), generator=g).argsort(dim=1)
    apply = torch.rand(16, generator=g) < 0.8
    sigma = 0.1 + 1.9 * torch.rand(16, generator=g)

    def chain(device: str) -> torch.Tensor:
        x = resized_crop(images.to(device), boxes.to(device), 32, flip.to(device))
        x = color_jitter(x, factors.to(device), order.to(device), apply.to(device), (0.4, 0.4, 0.4, 0.1))
        return gaussian_blur(x, sigma.to(device), 3)

    torch.testing.assert_close(chain("cuda").cpu(), chain("cpu"), atol=2e-5, rtol=0)
    # and a whole view made on the GPU, from a CUDA generator, is a valid normalised image batch
    gen = torch.Generator(device="cuda").manual_seed(0)
    view = augment_views((images * 255).to(torch.uint8).cuda(), view_config("strong", "cifar"), gen)
    assert view.device.type == "cuda" and view.shape == (16, 3, 32, 32) and torch.isfinite(view).all()
    # and its colour ops compiled (engine.compile on CUDA) give the eager view up to float rounding
    gen.manual_seed(0)
    fused = augment_views(
        (images * 255).to(torch.uint8).cuda(), view_config("strong", "cifar"), gen, compiled=True
    )
    torch.testing.assert_close(fused, view, rtol=0, atol=1e-4)


def test_export_on_cuda_matches_cpu(tmp_path, make_encoder):
    """bf16 + channels_last export: the same rows, features within bf16 rounding of the fp32 CPU ones."""
    encoder = make_encoder(tmp_path / "enc.pt")
    cpu = export_bank(encoder, "digits", tmp_path / "cpu.h5", batch_size=256, device="cpu", workers=0)
    cuda = export_bank(encoder, "digits", tmp_path / "cuda.h5", batch_size=256, device="cuda", workers=0)
    with FeatureBank.open(cpu.path) as a, FeatureBank.open(cuda.path) as b:
        np.testing.assert_array_equal(a.indices(), b.indices())
        cosine = (a.features() * b.features()).sum(axis=1)
        assert cosine.min() > 0.995, cosine.min()
        assert a.fingerprint == b.fingerprint


def test_mining_on_cuda_equals_cpu(tmp_path, make_encoder):
    encoder = make_encoder(tmp_path / "enc.pt")
    bank = export_bank(encoder, "digits", tmp_path / "bank.h5", batch_size=256, device="cpu", workers=0)
    params = MiningParams(k=5, quantile=0.5, mutual=True)
    cpu = mine_pairs(bank.path, tmp_path / "cpu.h5", params, device="cpu")
    cuda = mine_pairs(bank.path, tmp_path / "cuda.h5", params, device="cuda")
    np.testing.assert_allclose(cuda.candidate_similarities, cpu.candidate_similarities, atol=1e-5)
    assert (cuda.candidate_rows == cpu.candidate_rows).mean() > 0.99  # near-ties may swap
    assert cuda.threshold == pytest.approx(cpu.threshold, abs=1e-5)


def test_training_with_the_gpu_defaults(tmp_path):
    """ISD on digits with what CUDA turns on: bf16 autocast, channels_last, compile, data on the GPU.
    Losses stay finite, graphs are captured, and the exported encoder gives the GPU's features on CPU."""
    from torch._dynamo.utils import counters

    recipe = {
        "method": {"name": "isd", "queue_size": 256},
        "data": {"train": "digits", "preset": "digits", "in_memory": "yes"},
        "model": {"arch": "small_cnn"},
        "optim": {"batch_size": 64, "epochs": 2, "lr": 0.05, "warmup_epochs": 1},
        "engine": {"seed": 0, "log_every": 5, "compile": True},
        "monitor": {"every": 1, "k": 20},
    }
    torch._dynamo.reset()
    counters.clear()
    trainer = Trainer(recipe_from_data(recipe), tmp_path, quiet=True)
    assert trainer.device.type == "cuda" and trainer.autocast_dtype == torch.bfloat16
    assert trainer.channels_last and trainer.batches.images.device.type == "cuda"
    result = trainer.fit()  # raises TrainingDiverged on a NaN/inf loss
    assert counters["stats"]["unique_graphs"] >= 2
    assert '"loss"' in (tmp_path / "metrics.jsonl").read_text()
    assert result.knn is not None and result.knn.top1 > 0.5  # the GPU k-NN monitor ran (chance: 0.1)

    backbone, _ = load_backbone(result.encoder)
    images = trainer.batches.images[:64]
    with torch.no_grad():  # fp32 on both; cuDNN may use TF32, hence the tolerance
        on_cpu = F.normalize(backbone.eval()(eval_view(images.cpu(), "digits")), dim=1)
        on_gpu = F.normalize(trainer.method.feature_backbone.eval()(eval_view(images, "digits")), dim=1)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=5e-3, rtol=0)
    torch._dynamo.reset()
