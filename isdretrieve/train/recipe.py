"""Training recipes: a typed dataclass tree loaded from YAML (``isd-train RECIPE.yaml --set key=value``).

Every number has its range in its type (``Annotated[int, Range(ge=1)]``, the aliases below), checked with
a one-line error naming the key when the recipe is read or a :class:`Recipe` is built, before any work
starts; every float must be finite.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal

from isdretrieve.data.augment import ViewConfig
from isdretrieve.errors import RecipeError
from isdretrieve.models.vit import VIT_WIDTHS
from isdretrieve.util.typed_config import Range, apply_override, check_ranges, from_dict, load_yaml

ShuffleBN = bool | Literal["auto"]  # "auto": what the method's official code does
Count = Annotated[int, Range(ge=1)]  # sizes, steps, epochs: 1 or more
Optional0 = Annotated[int, Range(ge=0)]  # 0 turns the feature off (or keeps all)
Seed = Annotated[int, Range(ge=0, le=2**63 - 1)]
Positive = Annotated[float, Range(gt=0)]  # temperatures, learning rates
NonNegative = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, le=1)]  # probabilities, EMA momenta
Beta = Annotated[float, Range(ge=0, lt=1)]  # SGD momentum, Adam's betas, the drop-path rate
Scale = Annotated[float, Range(gt=0, le=1)]  # crop scales (fractions of the image area)
Ratio = Annotated[float, Range(gt=0)]


@dataclass(frozen=True)
class IsdVariant:
    """Every setting that tells ISD-base from ISD-MLP (official code, README runs; ``lr`` at batch 256)."""

    projection: bool
    tau_teacher: float
    tau_student: float
    momentum: float
    teacher_view: Literal["strong", "weak"]
    student_view: Literal["strong", "weak"]
    lr: float


ISD_VARIANTS = {
    "base": IsdVariant(False, 0.02, 0.02, 0.999, "strong", "strong", 0.01),  # train_isd.py, R18
    "mlp": IsdVariant(True, 0.01, 0.1, 0.99, "weak", "strong", 0.05),  # train_isd_plus.py, R50
}


@dataclass(frozen=True)
class IsdConfig:
    """ISD: similarity distillation over a queue. ``variant`` (base | mlp) fills every setting left out
    from that variant's official values (:data:`ISD_VARIANTS`, including ``optim.lr`` when the recipe
    has none); explicit keys override. Without a variant the settings default to ISD-base's, and
    ``projection: true`` is refused: it would train ISD-MLP's heads with ISD-base's τ, views and m.

    ``shuffle_bn`` (official ISD: on): the teacher's batch is permuted across ranks (DDP) or, on one
    device, every BatchNorm normalises ``shuffle_groups`` groups of the batch separately
    (``train/shuffle_bn.py``)."""

    name: Literal["isd"] = "isd"
    variant: Literal["base", "mlp"] | None = None
    projection: bool | None = None
    tau_teacher: Positive | None = None
    tau_student: Positive | None = None
    momentum: Fraction | None = None
    queue_size: Count = 16384
    teacher_view: Literal["strong", "weak"] | None = None
    student_view: Literal["strong", "weak"] | None = None
    shuffle_bn: ShuffleBN = "auto"
    shuffle_groups: Count = 4  # the official runs split batch 256 over 4 GPUs

    def __post_init__(self) -> None:
        if self.variant is None and self.projection:
            raise ValueError(
                "projection: true without a variant would mix ISD-MLP's heads with ISD-base's τ, views "
                "and momentum: set variant: mlp (explicit keys still override its values)"
            )
        preset = ISD_VARIANTS[self.variant or "base"]
        for key in ("projection", "tau_teacher", "tau_student", "momentum", "teacher_view", "student_view"):
            if getattr(self, key) is None:
                object.__setattr__(self, key, getattr(preset, key))

    @property
    def preset_lr(self) -> float | None:
        """The variant's learning rate (batch 256), used when ``optim.lr`` is left out."""
        return ISD_VARIANTS[self.variant].lr if self.variant else None

    @property
    def shuffles(self) -> bool:
        return True if self.shuffle_bn == "auto" else self.shuffle_bn


@dataclass(frozen=True)
class MocoConfig:
    """MoCo-v2: InfoNCE against a queue of momentum-encoder keys.

    ``head: official`` is the official ``--mlp`` head, Linear(D→D)–ReLU–Linear(D→128) without BN;
    ``head: bn`` is Linear–BN–ReLU–Linear with a 2048-wide hidden layer (this project's head before
    release 0.1.0). ``proj_hidden`` left out: D (official) or 2048 (bn). ``shuffle_bn`` (official MoCo: on)
    as in :class:`IsdConfig`, for the key encoder's forward."""

    name: Literal["moco"] = "moco"
    head: Literal["official", "bn"] = "official"
    tau: Positive = 0.2
    momentum: Fraction = 0.99
    queue_size: Count = 16384
    proj_hidden: Count | None = None
    proj_dim: Count = 128
    shuffle_bn: ShuffleBN = "auto"
    shuffle_groups: Count = 8  # the official runs split batch 256 over 8 GPUs

    def hidden_dim(self, feature_dim: int) -> int:
        if self.proj_hidden is not None:
            return self.proj_hidden
        return feature_dim if self.head == "official" else 2048

    @property
    def shuffles(self) -> bool:
        return True if self.shuffle_bn == "auto" else self.shuffle_bn


@dataclass(frozen=True)
class ByolConfig:
    """BYOL: predict the EMA target's projection; the loss is the paper's L + L̃ (the sum of both views'
    normalised MSE), the target momentum ramps to 1. No shuffle-BN: the official code has none."""

    name: Literal["byol"] = "byol"
    momentum: Fraction = 0.99
    proj_hidden: Count = 4096
    proj_dim: Count = 256


@dataclass(frozen=True)
class SeppConfig:
    """SePP (Alkhalefi et al., TMLR 2024), as we design it (the paper's settings are not public): a
    semantic positive mined offline (``pairs``, from ``isd-index mine``) joins each image's own views.

    ``base: moco``: a view of the partner is a second positive of a multi-positive InfoNCE. ``base: isd``:
    the partner's teacher embedding joins the anchors. ``partners: random`` is the control: the same
    list sizes, filled with random images.
    """

    name: Literal["sepp"] = "sepp"
    base: Literal["moco", "isd"] = "moco"
    pairs: str = ""
    partners: Literal["mined", "random"] = "mined"
    partner_p: Fraction = 1.0  # chance that an image with positives gets one in an epoch
    mask_positives: bool = True  # drop a query's mined positives from its queue negatives (moco)
    moco: MocoConfig = field(default_factory=MocoConfig)
    isd: IsdConfig = field(default_factory=IsdConfig)


@dataclass(frozen=True)
class DinoConfig:
    """DINO as AdaSim's base: head MLP (GELU) → bottleneck → L2 norm → weight-normalised linear to
    ``out_dim``; teacher logits centred (EMA of the batch mean) and sharpened; the last layer gets no
    update in the first ``freeze_last_layer`` epochs (its gradient is dropped). Defaults: official code.

    ``views: dino`` (default) takes DINO's asymmetric global views T1 / T2 (``dino_global1`` /
    ``dino_global2``), ``views: strong`` the preset's strong view twice (this project's DINO before
    multi-crop). ``local_crops`` adds that many ``dino_local`` views (multi-crop; DINO's own runs use 8,
    AdaSim's code 0): the student sees them, the teacher only the two global views. The views'
    scales and the local side are the ``augment`` section's (``global_scale``, ``local_scale``,
    ``local_size``).

    The head as DINO's ``DINOHead``: ``head_layers`` Linear layers (``nlayers``), BatchNorm after each
    hidden one with ``head_bn`` (``use_bn_in_head``), ``norm_last_layer`` (false: the last layer's gain
    is learnt). The teacher temperature rises linearly per epoch from ``warmup_tau_teacher`` to
    ``tau_teacher`` over ``warmup_tau_teacher_epochs`` epochs, then stays (DINO's
    ``teacher_temp_schedule``; null start = ``tau_teacher``, no warm-up). ``teacher_update``:
    ``after_step`` (DINO's and AdaSim's order: the EMA right after the optimiser's step, with that
    step's momentum) or ``next_step`` (this project's order in release 0.1.0: at the start of the next
    step, with the next step's momentum; the final teacher misses the last update)."""

    momentum: Fraction = 0.996
    head_hidden: Count = 2048
    bottleneck: Count = 256
    out_dim: Count = 65536
    tau_student: Positive = 0.1
    tau_teacher: Positive = 0.04
    center_momentum: Fraction = 0.9
    freeze_last_layer: Optional0 = 1  # epochs in which the head's last layer is not updated
    views: Literal["dino", "strong"] = "dino"
    local_crops: Optional0 = 0
    head_layers: Count = 3
    head_bn: bool = False
    norm_last_layer: bool = True
    warmup_tau_teacher: Positive | None = None  # None: tau_teacher (no warm-up)
    warmup_tau_teacher_epochs: Optional0 = 0
    teacher_update: Literal["after_step", "next_step"] = "after_step"

    def __post_init__(self) -> None:
        if self.warmup_tau_teacher is None:
            object.__setattr__(self, "warmup_tau_teacher", self.tau_teacher)


@dataclass(frozen=True)
class AdasimConfig:
    """AdaSim (Lebailly et al., ICCV 2023): each image is paired with a partner image sampled from its
    neighbours' window-averaged similarity (``k`` candidates, ``window`` epochs, temperature ``tau``),
    only when the image retrieves itself first. ``mode: naive`` pairs every image with its nearest
    other neighbour; ``mode: plain`` is the plain base method (not "off": YAML reads that as false).
    Defaults: the official code's."""

    name: Literal["adasim"] = "adasim"
    base: Literal["byol", "dino"] = "byol"
    mode: Literal["adaptive", "naive", "plain"] = "adaptive"
    k: Count = 10
    window: Count = 50  # epochs averaged; bootstrapping starts after this many epochs
    tau: Positive = 0.001
    search_chunk: Count = 65536  # memory rows per similarity matmul
    byol: ByolConfig = field(default_factory=ByolConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)


MethodConfig = IsdConfig | MocoConfig | ByolConfig | SeppConfig | AdasimConfig
METHOD_CONFIGS: dict[str, type] = {
    "isd": IsdConfig,
    "moco": MocoConfig,
    "byol": ByolConfig,
    "sepp": SeppConfig,
    "adasim": AdasimConfig,
}


@dataclass(frozen=True)
class DataConfig:
    train: str = "digits"
    preset: Literal["digits", "cifar", "imagenet"] = "digits"
    in_memory: Literal["auto", "yes", "no"] = "auto"
    workers: Optional0 = 4
    shuffle_buffer: Count = 4096  # wds: samples the shard stream's shuffle buffer holds


@dataclass(frozen=True)
class AugmentConfig:
    """Overrides of the preset's views; None keeps the preset's value. ``crop_scale`` sets the strong and
    weak views' crop scale; colour, grayscale and blur probabilities apply to strong views only (weak
    views are crop + flip, DINO's keep their own asymmetric ones). DINO's views: ``global_scale`` (0.4,
    1), ``local_scale`` (0.05, 0.4) and the local crops' side ``local_size`` (96 / 16 / 8 px at the
    imagenet / cifar / digits presets). ``flip_p`` applies to every view."""

    crop_scale: tuple[Scale, Scale] | None = None
    flip_p: Fraction | None = None
    jitter_p: Fraction | None = None
    gray_p: Fraction | None = None
    blur_p: Fraction | None = None
    global_scale: tuple[Scale, Scale] | None = None
    local_scale: tuple[Scale, Scale] | None = None
    local_size: Count | None = None

    def __post_init__(self) -> None:
        for key in ("crop_scale", "global_scale", "local_scale"):
            low, high = getattr(self, key) or (0, 1)
            if low > high:
                raise RecipeError(f"augment.{key}: the low end must not exceed the high, got [{low}, {high}]")

    def apply(self, view: ViewConfig, strength: str) -> ViewConfig:
        changes: dict = {"flip_p": self.flip_p}
        if strength in ("strong", "weak"):
            changes["scale"] = self.crop_scale
        if strength == "strong":
            changes.update(jitter_p=self.jitter_p, gray_p=self.gray_p, blur_p=self.blur_p)
        if strength in ("dino_global1", "dino_global2"):
            changes["scale"] = self.global_scale
        if strength == "dino_local":
            changes.update(scale=self.local_scale, size=self.local_size)
        try:
            return replace(view, **{k: v for k, v in changes.items() if v is not None})
        except ValueError as exc:
            raise RecipeError(f"augment: {exc}") from None


@dataclass(frozen=True)
class ModelConfig:
    """The backbone: ``arch`` one of resnet18, resnet50, small_cnn, vit_tiny, vit_small, vit_base or
    timm:NAME, built for the data preset's image size. ``patch`` (ViTs: None = 16 from 64 px up, else 4;
    timm patch models: None = the model's own) and ``depth`` (ViT blocks, None = 12) shape ViTs.
    ``init``: a weights file to start from (torchvision or timm state dict, encoder.pt, our training
    checkpoint, official ISD / MoCo / DINO / AdaSim file), its ``init_from`` backbone loaded strictly at
    a fresh start (never on --resume); "" = random init.

    Our ViTs only (``models/vit.py``): ``vit_init`` (``dino``: DINO's trunc-normal 0.02 initialisation;
    ``torchvision``: torchvision's), ``drop_path`` (DINO's stochastic depth rate; null: 0.1 for a ViT
    under DINO, as DINO's and AdaSim's code, else 0; the other methods take none) and
    ``pos_interpolation`` (``dino``: DINO's (grid + 0.1) / G scale factor for local crops; ``resize``:
    resized to the grid)."""

    arch: str = "small_cnn"
    cifar_stem: bool = False
    patch: Count | None = None
    depth: Count | None = None
    init: str = ""
    init_from: Literal["student", "teacher"] = "student"
    vit_init: Literal["dino", "torchvision"] = "dino"
    drop_path: Beta | None = None
    pos_interpolation: Literal["dino", "resize"] = "dino"


@dataclass(frozen=True)
class OptimConfig:
    """The optimiser (``train/optim.py``) and its per-step schedules (``train/schedule.py``).

    The defaults are the official ISD / MoCo code's: SGD, one weight decay on every parameter, no
    clipping. DINO's (and AdaSim's) official values: ``optimizer: adamw``, ``min_lr: 1e-6``,
    ``weight_decay: 0.04`` → ``weight_decay_end: 0.4``, ``no_decay_bias_and_norm: true``,
    ``clip_grad: 3.0`` (``per_param``), 10 warm-up epochs, lr 5e-4 × batch / 256.

    ``warmup_from``: the linear warm-up's first step. ``zero``: DINO's ``linspace(0, lr, W)``, lr · s /
    (W − 1) at step s; ``first_step``: lr · (s + 1) / W (this project's; ISD, MoCo, BYOL). Left out:
    ``zero`` for DINO (AdaSim on DINO), ``first_step`` for the other methods."""

    batch_size: Count = 256
    epochs: Count = 100
    max_steps: Count | None = None  # stop after this many steps in total (a budget), None = all epochs
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: Positive | None = None  # None: the method variant's preset (ISD variant), else 0.05
    momentum: Beta = 0.9  # sgd
    betas: tuple[Beta, Beta] = (0.9, 0.999)  # adamw
    weight_decay: NonNegative = 1e-4
    weight_decay_end: NonNegative | None = None  # None: constant; else a cosine to this over the run
    no_decay_bias_and_norm: bool = False  # no decay on a parameter named *.bias or 1-D (DINO's rule)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    min_lr: NonNegative = 0.0  # where the cosine schedule ends
    milestones: tuple[Count, ...] = ()  # epochs, for the step schedule
    gamma: Positive = 0.2
    warmup_epochs: NonNegative = 0.0
    warmup_from: Literal["zero", "first_step"] | None = None  # null: zero for DINO, else first_step
    clip_grad: Positive | None = None  # None: off; else the largest gradient L2 norm
    clip_grad_mode: Literal["per_param", "global"] = "per_param"  # each parameter's own norm (DINO's)

    def __post_init__(self) -> None:
        if self.min_lr > 0 and self.schedule != "cosine":
            raise RecipeError(
                f"optim.min_lr: only the cosine schedule ends at min_lr, schedule is {self.schedule}"
            )


@dataclass(frozen=True)
class EngineConfig:
    seed: Seed = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool | None = None  # None: on for CUDA
    compile: bool = False  # torch.compile the student and teacher (and on CUDA the views' colour ops)
    sync_bn: bool = False
    log_every: Count = 20  # steps between log lines
    checkpoint_every: Count = 1  # epochs between checkpoints
    keep_checkpoints: Optional0 = 2  # the newest checkpoints kept; 0 keeps them all


@dataclass(frozen=True)
class MonitorConfig:
    """Online weighted k-NN of the student backbone on a held-out split every ``every`` epochs."""

    every: Optional0 = 1  # 0 turns it off
    train: str | None = None  # SPEC of the k-NN memory; default: data.train with split=train
    test: str | None = None  # SPEC of the queries; default: data.train with split=test
    k: Count = 20
    temperature: Positive = 0.07
    max_train: Count | None = None  # use at most this many memory images (a fixed random subset)
    max_test: Count | None = None  # and at most this many queries


@dataclass(frozen=True)
class Recipe:
    method: MethodConfig = field(default_factory=IsdConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def __post_init__(self) -> None:
        check_ranges(self)  # a recipe built in Python; from YAML every value was checked as it was read
        if self.optim.lr is None:
            lr = preset_lr(self.method)
            object.__setattr__(self, "optim", replace(self.optim, lr=DEFAULT_LR if lr is None else lr))
        self._resolve_dino_defaults()
        if self.optim.min_lr > self.optim.lr:
            raise RecipeError(
                f"optim.min_lr: must not exceed optim.lr ({self.optim.lr}), got {self.optim.min_lr}"
            )

    def _resolve_dino_defaults(self) -> None:
        """Fill ``optim.warmup_from`` and ``model.drop_path`` left out with DINO's values under DINO
        (this project's elsewhere), and refuse stochastic depth outside DINO."""
        dino = dino_based(self.method)
        if self.optim.warmup_from is None:
            start = "zero" if dino else "first_step"
            object.__setattr__(self, "optim", replace(self.optim, warmup_from=start))
        vit = self.model.arch in VIT_WIDTHS
        if self.model.drop_path is None:
            rate = DINO_DROP_PATH if dino and vit else 0.0
            object.__setattr__(self, "model", replace(self.model, drop_path=rate))
        if self.model.drop_path > 0 and not (dino and vit):
            raise RecipeError(
                "model.drop_path: stochastic depth is DINO's, for our ViTs (vit_tiny, vit_small, vit_base) "
                f"under method adasim with base dino; this recipe has {self.model.arch} and "
                f"{self.method.name}: set it to 0"
            )


DEFAULT_LR = 0.05
DINO_DROP_PATH = 0.1  # DINO's and AdaSim's --drop_path_rate


def dino_based(method: MethodConfig) -> bool:
    """Whether a method trains with DINO's objective (AdaSim on DINO)."""
    return isinstance(method, AdasimConfig) and method.base == "dino"


def local_crops(method: MethodConfig) -> int:
    """How many DINO local crops a method takes (views smaller than the preset's size); 0 for all but
    AdaSim on DINO."""
    return method.dino.local_crops if dino_based(method) else 0


def preset_lr(method: MethodConfig) -> float | None:
    """The learning rate a method's named variant implies, if any (SePP: its base's)."""
    if isinstance(method, SeppConfig):
        method = method.isd if method.base == "isd" else method.moco
    return method.preset_lr if isinstance(method, IsdConfig) else None


def recipe_from_data(data: dict) -> Recipe:
    """Build a ``Recipe`` from plain data; the method section's ``name`` picks its dataclass."""
    data = dict(data or {})
    method = data.get("method", {"name": "isd"})
    if isinstance(method, str):
        method = {"name": method}
    if not isinstance(method, dict) or method.get("name") not in METHOD_CONFIGS:
        name = method.get("name") if isinstance(method, dict) else method
        raise RecipeError(f"method.name: expected one of {', '.join(METHOD_CONFIGS)}, got {name!r}")
    data["method"] = from_dict(METHOD_CONFIGS[method["name"]], method, "method")
    return from_dict(Recipe, data)


def load_recipe(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """Read a YAML recipe and apply ``key=value`` overrides."""
    data = load_yaml(path) or {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path}: expected a mapping at the top level")
    for assignment in overrides:
        apply_override(data, assignment)
    return recipe_from_data(data)
