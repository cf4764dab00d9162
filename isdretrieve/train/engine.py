"""The training engine: devices, precision, distribution, the loop, checkpoints and logging.

It knows nothing method-specific: a method takes a ``Batch`` of views and returns a ``StepOutput``.
"""

from __future__ import annotations

import contextlib
import inspect
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function

from isdretrieve.data.augment import VIEW_NAMES, augment_views, size_groups, view_config
from isdretrieve.data.datasets import items_sha256
from isdretrieve.data.open import open_dataset
from isdretrieve.data.specs import parse_spec
from isdretrieve.encoder import FrozenEncoder
from isdretrieve.errors import CheckpointError, Interrupted, RecipeError, TrainingDiverged
from isdretrieve.files.encoder_header import EncoderHeader
from isdretrieve.models.backbones import build_backbone, is_timm, is_vit
from isdretrieve.models.checkpoints import export_encoder, export_safetensors, load_init
from isdretrieve.models.timm_backbone import timm_patch
from isdretrieve.train import distributed
from isdretrieve.train.batches import BatchSource, StepBatch, epoch_generator
from isdretrieve.train.checkpointing import list_checkpoints, load_latest_checkpoint, save_checkpoint
from isdretrieve.train.curves import write_training_curves
from isdretrieve.train.methods.base import Batch, DataContext, Method
from isdretrieve.train.methods.build import build_method
from isdretrieve.train.monitor import KnnMonitor, KnnResult
from isdretrieve.train.optim import build_optimizer, clip_gradients, drop_gradients, set_hyperparameters
from isdretrieve.train.recipe import Recipe, local_crops
from isdretrieve.train.run_log import RunLog
from isdretrieve.train.schedule import learning_rate, weight_decay
from isdretrieve.util.typed_config import to_dict


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    epochs: int  # completed epochs
    steps: int
    checkpoint: Path | None
    encoder: Path | None
    knn_init: KnnResult | None  # the monitor on the untrained encoder
    knn: KnnResult | None  # the monitor's latest result


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError(f"engine.device: '{name}' requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise RecipeError(f"engine.device: unknown device '{name}'") from None


class Trainer:
    """Build everything a recipe describes, then ``fit()``; ``resume`` continues from OUT/checkpoints."""

    def __init__(self, recipe: Recipe, out_dir: str | Path, *, resume: bool = False, quiet: bool = False):
        self.recipe, self.out_dir = recipe, Path(out_dir)
        eng = recipe.engine
        device = resolve_device(eng.device)
        self.dist = distributed.init_from_env(device.type)
        if device.type == "cuda":
            device = torch.device("cuda", self.dist.local_rank if self.dist.enabled else device.index or 0)
            torch.cuda.set_device(device)
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
        self.device = device
        use_bf16 = eng.precision == "bf16" or (eng.precision == "auto" and device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.channels_last = eng.channels_last if eng.channels_last is not None else device.type == "cuda"
        # compiling fuses the masked colour ops of a view (hundreds of small kernels on a GPU); on a CPU
        # the eager gathered path, which runs each op only where it applies, was as fast or faster
        self.compile_views = eng.compile and device.type == "cuda"

        self.log = RunLog(self.out_dir, enabled=self.dist.is_main, quiet=quiet)
        self.dataset = open_dataset(recipe.data.train)
        self.views = {s: recipe.augment.apply(view_config(s, recipe.data.preset), s) for s in VIEW_NAMES}

        torch.manual_seed(eng.seed)
        backbone = self._build_backbone()
        if recipe.model.init and not (resume and list_checkpoints(self.out_dir)):
            self._init_backbone(backbone)
        items = items_sha256(self.dataset, 0, len(self.dataset))
        context = DataContext(len(self.dataset), self.dataset.labels.cpu(), eng.seed, items)
        self.method: Method = build_method(recipe.method, backbone, context).to(device)
        self._check_view_sizes()
        if self.channels_last:
            self.method.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(recipe.optim, self.method)
        self.epoch, self.step, self.finished = 0, 0, False
        self.epoch_step, self.aug_state = 0, None  # set by a mid-epoch (signal) checkpoint on resume
        self.stop_signal: int | None = None
        self.knn_init: KnnResult | None = None
        self.knn: KnnResult | None = None
        self.checkpoint: Path | None = None
        self._prepare_output(resume)

        self.model: nn.Module = self.method
        if self.dist.enabled:
            if eng.sync_bn and device.type == "cuda":
                nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
            self.method.all_gather = distributed.all_gather_cat
            device_ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(self.method, device_ids=device_ids, **_NO_BUFFER_SYNC)
        if eng.compile:
            for module in (self.method.student, self.method.teacher):
                module.compile()

        o = recipe.optim
        self.batches = BatchSource(
            self.dataset,
            batch_size=o.batch_size,
            dist=self.dist,
            device=device,
            seed=eng.seed,
            in_memory=recipe.data.in_memory,
            workers=recipe.data.workers,
            views=[self.views[s] for s in self.method.views],
            partner_views=[self.views[s] for s in self.method.partner_views],
            shuffle_buffer=recipe.data.shuffle_buffer,
        )
        full = o.epochs * self.batches.steps_per_epoch
        self.total_steps = min(full, o.max_steps) if o.max_steps is not None else full
        self.monitor = self._build_monitor() if recipe.monitor.every > 0 and self.dist.is_main else None

    # -- construction helpers -------------------------------------------------------------------
    def _build_backbone(self) -> nn.Module:
        m = self.recipe.model
        try:
            return build_backbone(
                m.arch,
                cifar_stem=m.cifar_stem,
                image_size=self.views["weak"].size,
                patch_size=m.patch,
                depth=m.depth,
                dynamic_size=local_crops(self.recipe.method) > 0,
                vit_init=m.vit_init,
                drop_path=m.drop_path,
                pos_interpolation=m.pos_interpolation,
            )
        except ValueError as exc:
            raise RecipeError(f"model.arch: {exc}") from None

    def _check_view_sizes(self) -> None:
        """Views of another size than the preset's (DINO's local crops) must go through the backbone: a
        ViT's patch must divide them, a fixed-size timm model takes none. Tried once, on zeros, in eval
        mode (no state or random stream changes)."""
        names = (*self.method.views, *self.method.partner_views)
        sizes = sorted({self.views[s].size for s in names} - {self.views["weak"].size})
        backbone, arch = self.method.feature_backbone, self.recipe.model.arch
        training = backbone.training
        backbone.eval()
        try:
            for size in sizes:
                with torch.no_grad():
                    backbone(torch.zeros(2, 3, size, size, device=self.device))
        except Exception as exc:  # whatever the model raises for a size it cannot take
            raise RecipeError(
                f"model.arch: {arch} cannot take the {size}x{size} views the method asks for (DINO's "
                f"local crops: augment.local_size, method.dino.local_crops): {_one_line(exc)}"
            ) from None
        finally:
            backbone.train(training)

    def _init_backbone(self, backbone: nn.Module) -> None:
        """``model.init``: the file's ``init_from`` backbone into the student; the methods' teachers are
        copies of it made after this."""
        m = self.recipe.model
        try:
            load_init(backbone, m.arch, m.init, which=m.init_from)
        except CheckpointError as exc:
            raise CheckpointError(f"model.init: {exc}") from None
        self.log.info(f"initialised the {m.arch} backbone from {m.init} ({m.init_from})")

    def _build_monitor(self) -> KnnMonitor:
        m, spec = self.recipe.monitor, parse_spec(self.recipe.data.train)
        if spec.kind == "wds" and not (m.train and m.test):
            raise RecipeError(
                "monitor.train and monitor.test: name the k-NN data for wds: training data "
                "(or set monitor.every: 0)"
            )
        train = open_dataset(m.train) if m.train else open_dataset(spec.with_split("train"))
        test = open_dataset(m.test) if m.test else open_dataset(spec.with_split("test"))
        return KnnMonitor(
            train,
            test,
            k=m.k,
            temperature=m.temperature,
            device=self.device,
            max_train=m.max_train,
            max_test=m.max_test,
            seed=self.recipe.engine.seed,
        )

    def encoder_header(self) -> EncoderHeader:
        view, backbone = self.views["weak"], self.method.feature_backbone
        arch = self.recipe.model.arch
        patch = int(backbone.patch_size) if is_vit(arch) else timm_patch(backbone) if is_timm(arch) else 0
        return EncoderHeader(
            arch=self.recipe.model.arch,
            cifar_stem=self.recipe.model.cifar_stem,
            feature_dim=self.method.feature_backbone.feature_dim,
            image_size=view.size,
            mean=tuple(view.mean),
            std=tuple(view.std),
            source=f"{self.out_dir.name}:student",
            patch_size=patch,
        )

    def _prepare_output(self, resume: bool) -> None:
        found = load_latest_checkpoint(self.out_dir)
        if found and not resume:
            raise RecipeError(
                f"{self.out_dir} already holds checkpoints: pass --resume to continue or choose another --out"
            )
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "recipe.yaml").write_text(_yaml(to_dict(self.recipe)))
        if found:
            self._load_state(*found)

    def _load_state(self, path: Path, state: dict[str, Any]) -> None:
        saved = state.get("recipe", {})
        for key, now in (("method.name", self.recipe.method.name), ("model.arch", self.recipe.model.arch)):
            section, name = key.split(".")
            was = saved.get(section, {}).get(name, now)
            if was != now:
                raise CheckpointError(
                    f"cannot resume from {path}: it was trained with {key}={was}, this recipe has {now}"
                )
        try:
            self.method.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(
                f"cannot resume from {path}: it does not fit this recipe ({_one_line(exc)})"
            ) from None
        self.epoch, self.step, self.finished = state["epoch"], state["step"], state.get("finished", False)
        self.epoch_step, self.aug_state = state.get("epoch_step", 0), state.get("aug_rng")
        self.knn_init = KnnResult(**state["knn_init"]) if state.get("knn_init") else None
        self.knn = KnnResult(**state["knn"]) if state.get("knn") else None
        self.checkpoint = path
        self.log.info(f"resumed from {path} (epoch {self.epoch}, step {self.step})")

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to the recipe's budget, checkpointing as configured; returns where things ended up."""
        with self._stop_on_signals():
            if self.monitor is not None and self.knn_init is None:
                self.knn_init = self._evaluate()
                self.log.write({"epoch": 0, "step": self.step, **_prefixed("knn_", self.knn_init)})
                self.log.info(f"k-NN before training: top-1 {self.knn_init.top1:.4f}")
            try:
                while not self.finished:
                    self._train_epoch()
                return self._finish()
            finally:
                self.log.close()

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """While training, SIGTERM/SIGINT only set a flag: the loop ends its step, checkpoints and stops."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            self.stop_signal = signum

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _should_stop(self, at_log_step: bool) -> bool:
        if not self.dist.enabled:
            return self.stop_signal is not None
        if not at_log_step:  # every rank must agree: only ask at the steps that already synchronise
            return False
        flag = torch.tensor(float(self.stop_signal is not None), device=self.device)
        return bool(distributed.all_reduce_mean(flag) > 0)

    def _train_epoch(self) -> None:
        recipe, epoch, start = self.recipe, self.epoch, self.epoch_step
        steps = min(self.batches.steps_per_epoch, self.total_steps - (self.step - start))
        self.log.start_epoch(epoch, recipe.optim.epochs, steps)
        aug_gen = epoch_generator(recipe.engine.seed, epoch, self.device, stream=1 + self.dist.rank)
        if self.aug_state is not None:  # resuming mid-epoch: continue the epoch's augmentation stream
            aug_gen.set_state(self.aug_state)
            self.log.advance(start)
        self.epoch_step, self.aug_state = 0, None
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        t0, seen = time.perf_counter(), 0
        partners = self.method.partner_map(epoch)
        for i, data in enumerate(self.batches.epoch(epoch, start, partners), start=start):
            if i >= steps:
                break
            lr = learning_rate(recipe.optim, self.step, self.batches.steps_per_epoch, self.total_steps)
            wd = weight_decay(recipe.optim, self.step, self.total_steps)
            set_hyperparameters(self.optimizer, lr, wd)
            batch = self._batch(data, aug_gen)
            out, grad_norm = self.optimize(batch, want_grad_norm=(i + 1) % recipe.engine.log_every == 0)
            nonfinite |= ~torch.isfinite(out.loss.detach())
            self.step += 1
            seen += data.images.shape[0] * self.dist.world_size
            if grad_norm is not None:
                self._check_finite(nonfinite)
                rate = seen / (time.perf_counter() - t0)
                self._log_step(out, lr, wd, grad_norm, rate)
                self.log.advance(0, f"loss {out.loss.item():.4f}  {rate:,.0f} img/s")
            self.log.advance(1)
            if self._should_stop(grad_norm is not None) and i + 1 < steps:
                self._check_finite(nonfinite)
                self._save(epoch_step=i + 1, aug_rng=aug_gen.get_state())
                self.log.end_epoch()
                raise Interrupted(self.stop_signal or signal.SIGTERM, self.checkpoint)
        self._check_finite(nonfinite)
        self.log.end_epoch()
        diagnostics = self.method.end_epoch(epoch)
        self.epoch += 1
        elapsed = time.perf_counter() - t0
        self.finished = self.epoch >= recipe.optim.epochs or self.step >= self.total_steps
        record: dict[str, Any] = {"epoch": self.epoch, "step": self.step, "epoch_seconds": round(elapsed, 3)}
        record["images_per_s"] = round(seen / max(elapsed, 1e-9), 1)
        record.update(diagnostics)
        every = recipe.monitor.every
        if self.monitor is not None and (self.epoch % every == 0 or self.finished):
            self.knn = self._evaluate()
            record.update(_prefixed("knn_", self.knn))
        self.log.write(record)
        if "knn_top1" in record:
            self._write_curves()
        knn = f", k-NN top-1 {self.knn.top1:.4f}" if "knn_top1" in record else ""
        self.log.info(f"epoch {self.epoch}: {record['images_per_s']:,.0f} img/s, {elapsed:.1f} s{knn}")
        stop = self._should_stop(at_log_step=True)
        if self.epoch % recipe.engine.checkpoint_every == 0 or self.finished or stop:
            self._save()
        if stop and not self.finished:
            raise Interrupted(self.stop_signal or signal.SIGTERM, self.checkpoint)

    def optimize(self, batch: Batch, want_grad_norm: bool = False) -> tuple[Any, float | None]:
        """One optimisation step on ``batch``: forward (method), backward, the method's frozen
        parameters' gradients dropped, clipping, the optimiser's step, then the method's ``after_step``
        (DINO's teacher update). ``grad_norm`` (when wanted) is the total gradient norm before clipping.

        The phases are labelled ``step/forward``, ``step/backward`` and ``step/optimizer`` for
        ``torch.profiler`` (benchmarks/profile_step.py); unprofiled, a label costs a few microseconds.
        """
        autocast = torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        )
        with record_function("step/forward"), autocast:
            out = self.model(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with record_function("step/backward"):
            out.loss.backward()
        o = self.recipe.optim
        with record_function("step/optimizer"):
            drop_gradients(self.method.frozen_parameters(self.epoch))
            params = [
                p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None
            ]
            norm = clip_gradients(params, o.clip_grad, o.clip_grad_mode, want_norm=want_grad_norm)
            self.optimizer.step()
            self.method.after_step(batch)
        return out, None if norm is None else norm.item()

    def _batch(self, data: StepBatch, generator: torch.Generator) -> Batch:
        """Augment a step's images (and partners' images) into the views the method asks for, in the
        method's view order (the random stream's order too), whatever their sizes."""
        with record_function("step/augment"):
            wanted = self.method.views
            if data.crops is not None:  # the loader workers took each view's crop from the originals
                views = self._cropped_views(data.crops, wanted, generator)
            else:
                views = [self._view(data.images, s, generator) for s in wanted]
            progress = self.step / max(self.total_steps, 1)
            batch = Batch(views, data.indices, data.labels, progress=progress, epoch=self.epoch)
            wanted = self.method.partner_views
            if data.partner_crops is not None:
                batch.partner_views = self._cropped_views(data.partner_crops, wanted, generator)
                batch.partners = data.partners
            elif data.partner_images is not None:
                batch.partner_views = [self._view(data.partner_images, s, generator) for s in wanted]
                batch.partners = data.partners
        return batch

    def _cropped_views(
        self, crops: tuple[torch.Tensor, ...], names: tuple[str, ...], generator: torch.Generator
    ) -> list[torch.Tensor]:
        """The views named ``names`` from the workers' crops, grouped by size as ``size_groups`` groups
        them (``crops[g][:, k]`` is view ``groups[g][k]``)."""
        where = {}
        for group, positions in enumerate(size_groups([self.views[s] for s in names])):
            where.update({view: (group, k) for k, view in enumerate(positions)})
        return [
            self._view(crops[where[v][0]][:, where[v][1]], s, generator, True) for v, s in enumerate(names)
        ]

    def _view(
        self, images: torch.Tensor, strength: str, generator: torch.Generator, cropped: bool = False
    ) -> torch.Tensor:
        view = augment_views(
            images, self.views[strength], generator, compiled=self.compile_views, cropped=cropped
        )
        return view.contiguous(memory_format=torch.channels_last) if self.channels_last else view

    def _check_finite(self, nonfinite: torch.Tensor) -> None:
        if bool(distributed.all_reduce_mean(nonfinite.float()) > 0):
            where = (
                f"last good checkpoint: {self.checkpoint}" if self.checkpoint else "no checkpoint was written"
            )
            raise TrainingDiverged(
                f"loss became NaN/inf in epoch {self.epoch + 1} (by step {self.step}); stopping, {where}"
            )

    def _log_step(self, out: Any, lr: float, wd: float, grad_norm: float, rate: float) -> None:
        logs = {"loss": out.loss.detach(), **out.logs}
        values = {
            k: distributed.all_reduce_mean(v.detach().float()).item() if isinstance(v, torch.Tensor) else v
            for k, v in logs.items()
        }
        self.log.write(
            {
                "epoch": self.epoch,
                "step": self.step,
                "lr": lr,
                **({"weight_decay": wd} if self.recipe.optim.weight_decay_end is not None else {}),
                "grad_norm": grad_norm,
                "images_per_s": rate,
                **values,
            }
        )

    def _evaluate(self) -> KnnResult:
        precision = "bf16" if self.autocast_dtype is not None else "fp32"
        encoder = FrozenEncoder(
            self.method.feature_backbone,
            self.encoder_header(),
            device=self.device,
            precision=precision,
            batch_size=512,
        )
        return self.monitor.evaluate(encoder)

    def _save(self, epoch_step: int = 0, aug_rng: torch.Tensor | None = None) -> None:
        if self.dist.is_main:
            state = {
                "method": self.recipe.method.name,
                "recipe": to_dict(self.recipe),
                "epoch": self.epoch,
                "step": self.step,
                "finished": self.finished,
                "encoder": self.encoder_header().to_dict(),
                "model": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "knn_init": to_dict(self.knn_init) if self.knn_init else None,
                "knn": to_dict(self.knn) if self.knn else None,
            }
            if epoch_step:  # a mid-epoch (signal) checkpoint: where to pick the epoch up again
                state.update(epoch_step=epoch_step, aug_rng=aug_rng.cpu())
            self.checkpoint = save_checkpoint(
                self.out_dir, state, self.epoch, self.recipe.engine.keep_checkpoints, epoch_step
            )
        distributed.barrier()

    def _write_curves(self) -> None:
        """Redraw OUT/curves.png from metrics.jsonl (main process; at each monitor and at the end)."""
        if self.dist.is_main:
            write_training_curves(self.out_dir, title=f"{self.out_dir} ({self.recipe.method.name})")

    def _finish(self) -> TrainResult:
        encoder = None
        if self.dist.is_main:
            encoder = self.out_dir / "encoder.pt"
            export_encoder(self.method.feature_backbone, self.encoder_header(), encoder)
            export_safetensors(
                self.method.feature_backbone, self.encoder_header(), encoder.with_suffix(".safetensors")
            )
            self._write_curves()
            self.log.info(f"done: {self.step} steps, {self.epoch} epochs; encoder written to {encoder}")
        distributed.barrier()
        return TrainResult(
            self.out_dir, self.epoch, self.step, self.checkpoint, encoder, self.knn_init, self.knn
        )


# Buffers (queue, BN statistics) are kept identical or rank-local by design; skip DDP's per-forward sync.
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """The gist of a (possibly many-line) error: torch's state_dict errors list every key on new lines."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    text = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _prefixed(prefix: str, result: KnnResult) -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in to_dict(result).items()}


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
