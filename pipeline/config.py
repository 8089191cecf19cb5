"""Typed configuration: ``params.yaml`` plus ``--set a.b=c`` overrides.

``load_config(path, overrides)`` returns a validated ``Config``. Override values are parsed as
YAML (``--set model.tasks=[semantic,depth]``, ``--set train.lr=0.01``). Every problem is one
``ConfigError`` line naming the key and what is allowed. Task names are checked against the
registry by ``check_tasks`` (the config module itself knows no task).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import ConfigError


def auto_num_workers(cpus: int | None = None) -> int:
    """``data.num_workers: auto``: ``min(4, cpus - 1)``, at least 0, where ``cpus`` (default: the
    cores this process may run on, ``os.sched_getaffinity``, else ``os.cpu_count()``) leaves one
    core to the training process."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    return max(0, min(4, cpus - 1))


def validated_options(model: type[BaseModel], raw: dict[str, Any] | None, *, key: str,
                      owner: str) -> BaseModel:
    """``raw`` validated by a plugin's options ``model``; a bad key or value is one
    ``ConfigError`` line: ``<key>.<field>: <problem>; <owner>: <the model's fields>``."""
    try:
        return model.model_validate(raw or {})
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        allowed = ", ".join(model.model_fields) or "none"
        raise ConfigError(f"{key}.{loc}: {err['msg']}; {owner}: {allowed}") from None


READS: set[str] | None = None
"""With ``DENSEPIPE_RECORD_CONFIG_READS`` set when this module is imported: every config key a
process reads (``section.key``), so a test can check that ``dvc.yaml`` lists what each stage reads
(``tests/test_dvc.py``). None otherwise (nothing recorded, nothing slowed)."""
if os.environ.get("DENSEPIPE_RECORD_CONFIG_READS"):
    READS = set()


@contextlib.contextmanager
def unrecorded_reads() -> Iterator[None]:
    """Reads inside the block are not recorded in ``READS``: validation that looks at every
    section (``stages.check_config``) reads keys a stage does not use."""
    global READS
    saved, READS = READS, None
    try:
        yield
    finally:
        READS = saved


class Section(BaseModel):
    """A config section: unknown keys are errors, values are type-checked strictly."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    _path: str = PrivateAttr("")

    if READS is not None:
        def __getattribute__(self, name: str) -> Any:
            value = super().__getattribute__(name)
            if READS is not None and not name.startswith("_") and name in type(
                    self).model_fields and not isinstance(value, Section):
                private = super().__getattribute__("__pydantic_private__") or {}
                path = private.get("_path", "")
                READS.add(f"{path}.{name}" if path else name)  # type: ignore[union-attr]
            return value

    def _set_paths(self, path: str) -> None:
        self._path = path
        for name in type(self).model_fields:
            value = self.__dict__.get(name)
            if isinstance(value, Section):
                value._set_paths(f"{path}.{name}" if path else name)


class SyntheticConfig(Section):
    num_train: int = Field(320, ge=1)
    """Training images (integer, at least 1) ``prepare`` renders into ``data.root`` when
    ``data.source`` is ``synthetic``; each carries the labels of every built-in task."""
    num_val: int = Field(64, ge=1)
    """Validation images (integer, at least 1) ``prepare`` renders: the ``val`` split that
    training's periodic evaluation and ``evaluate`` score."""
    image_size: int = Field(128, ge=32, le=4096)
    """Side in pixels of the rendered images, which are square (32 to 4096). The network's input
    size is ``data.image_size`` (the training crop), not this."""
    seed: int = 0
    """Seed of the synthetic world (integer): the same seed, counts and size render the same
    dataset, so ``prepare`` skips a render that is already there; another seed renders another
    world."""
    workers: int = Field(2, ge=1)
    """Processes rendering the synthetic dataset in parallel (at least 1); only the speed of
    ``prepare`` depends on it."""


class SourceConfig(Section):
    """One dataset of several trained into one model (``data.sources``; UberNet, Kokkinos 2017)."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    """Short name (letters, digits, ``_``, ``-``): the suffix of its metrics
    (``semantic/mIoU@<name>``) and of its evaluation folder."""
    source: str = "folder"
    """Its dataset format, as ``data.source`` (``densepipe formats`` lists them)."""
    root: str
    """Its folder, as ``data.root``."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Its format's options, as ``data.options``."""
    weight: float = Field(1.0, gt=0)
    """Sampling weight (above 0): each training batch comes from one source, drawn with
    probability weight / sum of the weights."""
    tasks: list[str] | None = None
    """Tasks trained from it (their labels are read; others are not, so those tasks take no loss
    from its batches); ``null``: every enabled task whose labels it has."""
    train_split: str | None = None
    """Its training split; ``null``: ``data.train_split``."""
    val_split: str | None = None
    """Its evaluation split; ``null``: ``data.val_split``."""
    class_map: dict[str, str | None] | str | None = None
    """Its semantic classes mapped onto the model's (the first source's card): ``{its class name:
    model class name, or null to ignore}`` inline, or the path of a YAML/JSON file holding that
    mapping; classes it does not name are ignored (255). ``null``: its classes must be the
    model's."""


class DataConfig(Section):
    @model_validator(mode="after")
    def _unique_source_names(self) -> DataConfig:
        names = [s.__dict__["name"] for s in self.__dict__["sources"]]  # no recorded read (dvc params)
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"data.sources: name {twice[0]!r} is used twice; names must be unique")
        return self


    root: str = "data/synthetic"
    """Dataset folder (a path; relative to the working folder). ``source: synthetic``: ``prepare``
    renders the synthetic dataset here (only into a new or empty folder, or over its own
    earlier render); any other ``source``: the dataset as published, read in place."""
    source: str = "synthetic"
    """The dataset format (``pipeline.data.formats``; ``densepipe formats`` lists them).
    ``synthetic``: ``prepare`` renders the synthetic world into ``root``; ``folder``: ``root``
    already holds a densepipe layout or a COCO 2017 folder, ``prepare`` only checks it; ``coco``,
    ``cityscapes``, ``ade20k``, ``voc``, ``nyuv2``: the published layouts, read unchanged."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Options of the format named by ``source`` (validated by its ``Options`` model)."""
    synthetic: SyntheticConfig = SyntheticConfig()
    sources: list[SourceConfig] = Field(default_factory=list)
    """Several datasets trained into one model (UberNet); empty (default): the one dataset of
    ``source``, ``root`` and ``options``. The first source's dataset card (classes, keypoints) is
    the model's; every source labelling a class-based task (semantic, instance, panoptic,
    keypoints) must name the same classes. Batches come from one source at a time (``weight``),
    each task takes loss where a batch has its labels, and evaluation reports every metric per
    source (``<task>/<metric>@<name>``). docs/own-data.md."""
    train_split: str = "train"
    """Name of the split trained on, as the format names its splits (detectron2's
    ``DATASETS.TRAIN``)."""
    val_split: str = "val"
    """Name of the split evaluated on: by training every ``train.eval_every`` steps (which picks
    ``best.pt``), by ``evaluate`` and in the drawings (detectron2's ``DATASETS.TEST``)."""
    image_size: int = Field(128, ge=32)
    """Training crop size (square) and evaluation resize target."""
    test_size: int | None = Field(None, ge=0)
    """Evaluation, ``predict`` and serving input size (the test-size rule, docs/own-data.md): the
    image is resized so its shorter side is ``test_size`` (aspect kept; see ``test_max_size``),
    padded at the bottom and right to a multiple of the backbone's stride, and every prediction is
    pasted back at the image's original resolution, where the metrics are computed (as detectron2
    and MMSegmentation do). ``None``: ``image_size``; ``0``: the original size (padding only)."""
    test_max_size: int | None = Field(None, ge=32)
    """Cap on the longer side after the test resize (detectron2's ``MAX_SIZE_TEST``); None: none."""
    augment: bool = True
    """Training augmentation (boolean): a random zoom by a factor drawn from ``scale_range`` and a
    random ``image_size`` square crop, a horizontal flip with probability 0.5 (keypoints swap
    left and right, the x of normals is negated) and colour jitter (brightness, contrast,
    saturation factors in [0.8, 1.2]). ``false``: none of it, each training image is read at
    its size on disk. Evaluation never augments."""
    scale_range: tuple[float, float] = (0.75, 1.25)
    """Zoom range of the training augmentation (``RandomScaleCrop``; depth divided by the zoom).
    ``[1, 1]``: flips and colour jitter only, every training view at the camera's own focal
    length, as evaluation sees it."""
    num_workers: int = Field(2, ge=0)
    """Loader processes reading samples (0: read in the training process). ``auto``: chosen from
    the CPUs this process may use (``auto_num_workers``: one per core less one for the training
    process, at most 4; 0 on 1 core), resolved when the config is loaded so every consumer sees
    an integer."""

    @field_validator("num_workers", mode="before")
    @classmethod
    def _auto_workers(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "auto":
            return auto_num_workers()
        if isinstance(v, str):
            raise ValueError("expected a number of processes (0 or more) or 'auto'")
        return v

    @field_validator("scale_range")
    @classmethod
    def _ordered_positive(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError("expected [low, high] with 0 < low <= high")
        return v


class ModelConfig(Section):
    backbone: str = "resnet18"
    """Backbone under the FPN (detectron2's ``MODEL.BACKBONE``): ``resnet18``, ``resnet34``,
    ``resnet50``, ``mobilenet_v3_large``, ``vgg11_bn``, ``vgg16_bn``, one a plugin registers
    (``pipeline.nn.backbones.register_backbone``), or ``timm:<model name>`` for any timm model
    with ``features_only`` (the ``timm`` extra). Randomly initialised unless ``pretrained`` or
    ``weights`` is set."""
    weights: str | None = None
    """Local path to backbone weights; ``None`` = random initialisation. Never downloaded."""
    pretrained: str | None = None
    """Backbone weights by name (docs/training.md, "Pretrained backbones"): ``imagenet`` (the
    backbone's default ImageNet weights), a torchvision weights name of that backbone
    (``ResNet50_Weights.IMAGENET1K_V2``) or, for ``timm:<model>`` backbones, a timm pretrained tag
    (``fb_in22k_ft_in1k``). Read from torchvision's / timm's cache; ``None`` = random init.
    Exclusive with ``weights``."""
    download: bool = False
    """Let densepipe download ``pretrained`` weights missing from the cache (also
    ``DENSEPIPE_ALLOW_DOWNLOAD=1``); otherwise a missing file is an error naming URL and path."""
    freeze_bn: Literal["auto"] | bool = "auto"
    """Replace the backbone body's BatchNorm by ``FrozenBatchNorm2d`` after loading weights.
    ``auto``: when ``pretrained`` is set and an enabled task needs ``instances`` labels (the R-CNN
    tasks instance, keypoints and, through instance, panoptic), as detectron2 does."""
    freeze_at: int = Field(0, ge=0, le=5)
    """Stop gradients of the body's first levels ``c1``..``c<freeze_at>`` (detectron2's
    FREEZE_AT: 1 = stem, 2 = stem and res2, its default with pretrained weights; 0 = none)."""
    backbone_norm: Literal["bn", "frozen_bn", "gn"] = "bn"
    """Normalisation in the backbone body: BatchNorm, frozen BatchNorm (fine-tuning on tiny
    batches) or GroupNorm (independent of the batch, so results do not depend on how a global
    batch is split across DDP processes)."""
    fpn_channels: int = Field(128, ge=8)
    """Channels of every FPN level (integer, at least 8; detectron2's ``FPN.OUT_CHANNELS``, 256
    there): what each task head reads. Smaller is faster and holds less."""
    output_stride: Literal[8, 16, 32] = 32
    """Stride of the backbone's deepest level: 16 or 8 dilate the last stages (dense decoders
    such as ``aspp``; backbones that cannot dilate refuse it). The R-CNN tasks need 32."""
    tasks: list[str] = Field(default_factory=lambda: ["semantic"])
    """Tasks trained together in one model, on one shared backbone (``densepipe tasks`` lists the
    installed ones, e.g. ``[semantic, depth]``); tasks they depend on are enabled too
    (``panoptic`` adds ``semantic`` and ``instance``). With ``train.best_metric: auto`` the
    first of them that has a main metric picks ``best.pt``."""
    heads: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per-task options, validated by each task's ``Options`` model (``model.heads.semantic``)."""
    loss_weights: dict[str, float] = Field(default_factory=dict)
    """Weight of each task's summed loss; 1.0 where not given."""

    @field_validator("pretrained")
    @classmethod
    def _pretrained_name(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or any(c.isspace() for c in v)):
            raise ValueError("expected null, 'imagenet', a torchvision weights name such as "
                             "ResNet50_Weights.IMAGENET1K_V2 or a timm pretrained tag")
        return v

    @field_validator("freeze_bn", mode="before")
    @classmethod
    def _auto_or_bool(cls, v: Any) -> Any:
        if v != "auto" and not isinstance(v, bool):
            raise ValueError("expected 'auto', true or false")
        return v


class LossWeightingConfig(Section):
    method: Literal["fixed", "uncertainty", "dwa", "gradnorm"] = "fixed"
    """fixed: ``model.loss_weights``; uncertainty: Kendall et al. 2018 (learned log-variances);
    dwa: dynamic weight average, Liu et al. 2019; gradnorm: Chen et al. 2018. Every method
    multiplies the fixed weights; the weights in force are logged as ``train/weight/<task>``."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Method options (dwa: temperature, window; gradnorm: alpha; uncertainty: init)."""


class EarlyStoppingConfig(Section):
    patience: int = Field(0, ge=0)
    """Stop after this many evaluations without improvement (0 = never stop early)."""
    metric: str | None = None
    """Metric watched; default ``train.best_metric`` as resolved (same direction and checks)."""
    min_delta: float = Field(0.0, ge=0)
    """An improvement smaller than this does not count."""


class EMAConfig(Section):
    decay: float | None = Field(None, gt=0, lt=1)
    """Exponential moving average of the weights (e.g. 0.999); ``None`` = off. With it,
    evaluation, ``best.pt`` selection, ``evaluate`` and ``predict`` use the averaged weights."""
    warmup: bool = True
    """Use ``min(decay, (1 + n) / (10 + n))`` after n updates (TensorFlow's num_updates rule), so
    early random weights fade quickly."""


class TrainConfig(Section):
    steps: int = Field(600, ge=1)
    """Optimizer steps of the whole run (integer, at least 1; detectron2's ``MAX_ITER``,
    MMSegmentation's ``max_iters``). Resuming from ``last.pt`` continues up to this step."""
    batch_size: int = Field(8, ge=1)
    """Global batch: under torchrun each of N processes takes batch_size / N images."""
    lr: float = Field(2e-3, gt=0)
    """Peak learning rate (float, above 0), reached at the end of ``warmup_steps``; ``schedule``
    then decays it. Tuned for the global ``batch_size``: scale it with the batch."""
    weight_decay: float = Field(1e-4, ge=0)
    """Decoupled (AdamW) or L2 (SGD) weight decay (float, 0 or more); never applied to
    normalisation weights and biases (parameters of one dimension)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """``adamw`` (torch's AdamW) or ``sgd`` (SGD with ``momentum``, as detectron2 and
    MMSegmentation schedules use); both take ``lr`` and ``weight_decay``. On CPU and CUDA torch's
    fused kernel does the update (AdamW 6x faster than torch's default on a 2-core CPU)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum in [0, 1) (used with ``optimizer: sgd`` only)."""
    schedule: Literal["cosine", "poly", "constant"] = "cosine"
    """Learning-rate schedule after warm-up, by step: ``cosine`` decays to 0 at ``steps``,
    ``poly`` multiplies by (1 - t)^0.9 (t the fraction of steps after warm-up; MMSegmentation's
    ``PolyLR``), ``constant`` keeps ``lr``."""
    warmup_steps: int = Field(50, ge=0)
    """Steps of linear warm-up (0 or more): the learning rate rises from ``lr / (warmup_steps +
    1)`` to ``lr`` before ``schedule`` applies (detectron2's ``WARMUP_ITERS``)."""
    clip_grad_norm: float | None = Field(5.0, gt=0)
    """Clip the gradients' global L2 norm to this value (float, above 0) before each step;
    ``null``: no clipping."""
    channels_last: bool = True
    """NHWC memory format for the model and its inputs (faster convolutions on CPU and GPU)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast dtype: ``auto`` = bf16 on CUDA, fp32 on CPU; ``fp16`` adds a gradient scaler."""
    tf32: bool = True
    """Allow TF32 matmuls and convolutions on GPUs that have them (Ampere and later)."""
    compile: bool = False
    """``torch.compile`` the backbone (first steps are slower while it compiles)."""
    activation_checkpointing: bool = False
    """Recompute the backbone body's activations in the backward pass instead of keeping them
    (``torch.utils.checkpoint``, one segment per stage): less memory for a slower step, as
    UberNet trains many tasks in little memory (benchmarks/results/train_512_checkpointing.json).
    BatchNorm running statistics are updated twice per step (the recomputation); with
    ``backbone_norm: frozen_bn`` or ``gn`` there are none."""
    deterministic: bool = False
    """``torch.use_deterministic_algorithms``, no cuDNN benchmarking: bit-exact reruns."""
    sync_bn: bool = False
    """Convert BatchNorm to SyncBatchNorm under DDP (CUDA only; PyTorch has no CPU version)."""
    loss_weighting: LossWeightingConfig = LossWeightingConfig()
    skip_nonfinite: bool = False
    """Skip a batch whose loss is NaN/inf (counted, logged as ``train/skipped_nonfinite``)
    instead of stopping."""
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    ema: EMAConfig = EMAConfig()
    disabled_hooks: list[str] = Field(default_factory=list)
    """Names of installed ``densepipe.hooks`` plugins not to call in this run."""
    eval_every: int = Field(200, ge=0)
    """Evaluate on the val split every N steps (0 = only at the end); ``best.pt`` follows it."""
    checkpoint_every: int = Field(100, ge=1)
    """Write ``<out_dir>/last.pt``, the resume point, every N steps (at least 1), after each
    evaluation and at the last step; a stopped run resumes from it."""
    log_every: int = Field(10, ge=1)
    """Log the losses, learning rate and images/s to MLflow every N steps (at least 1) and at the
    last step; without a progress bar, also as a line on the terminal."""
    best_metric: str = "auto"
    """Metric (``<task>/<name>``) that picks ``best.pt``; maximised, or minimised when its task
    lists it in ``lower_is_better`` (e.g. ``depth/rmse``). ``auto``: the ``main_metric`` of the
    first task in ``model.tasks`` that has one, else of the first task they enable that has one
    (``semantic/mIoU`` for ``[semantic, ...]``); with none, ``best.pt`` is the last checkpoint.
    An explicit metric must belong to an enabled task and be one it reports
    (``check_metric``)."""
    seed: int = 0
    """Seed (integer) of the weights' initialisation, the data order and the augmentations: the
    same seed and config reproduce a run (bit for bit on CPU; see ``deterministic``)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device of training, evaluation and prediction: ``auto`` = CUDA when a GPU is visible, else
    the CPU; ``cuda`` without a GPU is an error. Under torchrun each process takes its local
    GPU."""
    out_dir: str = "runs/train"
    """Folder of the training outputs (a path): ``last.pt``, ``best.pt``, ``config.yaml``,
    ``train_log.csv`` and the run record (docs/outputs.md). Training resumes from the
    ``last.pt`` found here."""
    progress: bool = True
    """A progress bar of the steps when the output is a terminal; ``false``, or not a terminal: a
    plain line every ``log_every`` steps."""


class EvaluateConfig(Section):
    checkpoint: str | None = None
    """Checkpoint to evaluate; default ``<train.out_dir>/best.pt`` (else ``last.pt``)."""
    metrics_file: str = "metrics.json"
    """JSON file ``evaluate`` writes the metrics to, flat ``{"task/metric": value}`` (a path;
    DVC's ``metrics`` reads it)."""
    out_dir: str = "runs/eval"
    """Folder of the evaluation's other outputs (a path): the drawings grid, plot data and the
    COCO ground-truth and result files (docs/outputs.md)."""
    batch_size: int = Field(8, ge=1)
    """Images per evaluation batch (at least 1); also the default of ``predict --batch-size``."""
    num_visualizations: int = Field(8, ge=0)
    """Validation images drawn with their predictions into the drawings grid (0 or more; 0: none)."""
    scales: list[float] = Field(default_factory=lambda: [1.0])
    """Multi-scale inference: the test size (``data.test_size``) times each factor (> 0), one
    model run each; dense tasks average their outputs at the original size, detections are
    merged by NMS (``pipeline.nn.tta``). ``[1.0]``: one scale. Cost: one model run per view. Read
    when the model is built from this config (``evaluate`` of a checkpoint, the periodic evaluation
    in training); a model built from its stored config (``predict``, serving) uses that one's."""
    flip: bool = False
    """Also predict each scale's image mirrored left-right and combine it (doubles the views)."""

    @field_validator("scales")
    @classmethod
    def _positive_scales(cls, value: list[float]) -> list[float]:
        if not value or any(not s > 0 for s in value):
            raise ValueError("expected one or more factors > 0 of the test size, e.g. [0.75, 1.0, 1.25]")
        return value


class TrackingConfig(Section):
    enabled: bool = True
    """Track runs in MLflow (parameters, metrics by step, checkpoints, the model) at ``uri``;
    ``false``: nothing is logged."""
    uri: str | None = None
    """Any MLflow tracking URI; default ``sqlite:///<working folder>/mlflow.db``."""
    experiment: str = "densepipe"
    """MLflow experiment the runs are logged under (created when missing)."""
    log_model: bool = True
    """Log the trained model (weights plus config, never a pickle) to the training's MLflow run
    when ``train`` ends; ``false``: ``register`` logs it when it registers it."""
    registered_model: str = "densepipe"
    """Model-registry name the ``register`` stage adds a version to."""


class PromoteConfig(Section):
    """Scheduled retraining (``densepipe retrain``, the ``densepipe-retrain`` flow): when a newly
    trained model (the challenger) replaces the one the ``alias`` points to (the champion)."""

    alias: str = Field("champion", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    """MLflow registered-model alias of the model in production (``models:/<name>@<alias>``);
    promotion moves it, ``densepipe promote`` moves it by hand."""
    primary_metric: str = "auto"
    """Metric (``<task>/<name>``) the challenger must improve; ``auto``: ``train.best_metric``
    as resolved (the first enabled task's main metric)."""
    min_gain: float = 0.0
    """Relative improvement of ``primary_metric`` the challenger needs, in the metric's direction:
    0.01 = more than 1 % better than the champion; 0: any improvement; negative: it may be that
    much worse (-0.01: promote fresh data unless more than 1 % worse)."""
    tolerance: float = Field(0.02, ge=0.0)
    """How much worse, relatively, the challenger may be on each other enabled task's main metric
    (0 or more; 0.02 = 2 % worse at most; 0: no worse at all)."""
    notify_url: str | None = None
    """Webhook the outcome of each retraining run is POSTed to as JSON (``promoted``, ``kept``,
    ``skipped`` or ``failed``, with the versions and the comparison); ``null``: none."""


class Config(Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    promote: PromoteConfig = PromoteConfig()

    @model_validator(mode="after")
    def _named_sections(self) -> Config:
        self._set_paths("")
        return self

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 0.002, ...}``: the flattened config (MLflow params)."""
        return flatten(self.model_dump(mode="json"))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


# -- loading ----------------------------------------------------------------------------------
def load_config(
    path: str | Path | None = "params.yaml", overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Load ``path`` (a missing default ``params.yaml`` means all defaults), apply overrides.

    A file may start from another: a top-level ``base: FILE`` (relative to the file naming it)
    is loaded first (with its own ``base``) and the file's values are deep-merged over it
    (mappings merge key by key; lists and scalars replace). ``recipes/*.yaml`` use
    ``base: ../params.yaml``."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.exists():
            tree = _read_tree(p, ())
        elif str(path) != "params.yaml":
            raise ConfigError(f"{p}: config file not found")
    overridden: dict[str, str] = {}
    for item in overrides:
        apply_override(tree, item)
        overridden[item.split("=", 1)[0].strip()] = item
    return config_from_dict(tree, source=str(path) if path else "config", overrides=overridden)


def _read_tree(p: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """The mapping in ``p`` over its ``base`` file's (``chain``: the files that named it)."""
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML {_yaml_problem(e)}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: expected a mapping of sections, got {type(loaded).__name__}")
    if "base" not in loaded:
        return loaded
    base = loaded.pop("base")
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{p}: base: expected the path of a params file, got {base!r}")
    base_path = p.parent / base
    here = p.resolve()
    if base_path.resolve() in (*chain, here):
        cycle = " -> ".join(str(c) for c in (*chain, here, base_path.resolve()))
        raise ConfigError(f"{p}: base: {base} makes a cycle ({cycle})")
    if not base_path.is_file():
        raise ConfigError(f"{p}: base: {base} not found (looked for {base_path})")
    return _deep_merge(_read_tree(base_path, (*chain, here)), loaded)


def _deep_merge(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(under)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(tree: dict[str, Any], *, source: str = "config",
                     overrides: dict[str, str] | None = None) -> Config:
    """Validate ``tree``; an error names ``source``, or ``--set KEY=VALUE`` when the bad value
    came from that override (``overrides``: dotted key -> the override as typed)."""
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        loc = ".".join(str(p) for p in e.errors()[0]["loc"])
        for key, item in (overrides or {}).items():
            if loc == key or loc.startswith(key + "."):
                source = f"--set {item}"
        raise ConfigError(f"{source}: {_describe(e)}") from None


def apply_override(tree: dict[str, Any], item: str) -> None:
    """Apply ``a.b=c`` to a nested dict; the value is parsed as YAML. Keys are checked here so
    the error can list the allowed keys at the level where the path went wrong."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=0.01")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    model: Any = Config
    node = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if model is not None:
            fields = model.model_fields
            if part not in fields:
                where = ".".join(parts[:depth]) or "top level"
                raise ConfigError(
                    f"--set {key}: unknown key {part!r} in {where}; allowed: {', '.join(fields)}"
                )
            annotation = fields[part].annotation
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if last:
            node[part] = value
        else:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child


def _describe(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = err["loc"][:-1]
        model: Any = Config
        for p in parent:
            ann = model.model_fields[p].annotation if p in getattr(model, "model_fields", {}) else None
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            if model is None:
                break
        allowed = ", ".join(model.model_fields) if model is not None else "?"
        return f"unknown key {loc!r}; allowed: {allowed}"
    got = err.get("input")
    msg = err["msg"]
    if kind == "literal_error":
        msg = msg.replace("Input should be", "expected one of")
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{loc}: {msg}, got {got!r}{more}"


def _yaml_problem(e: yaml.YAMLError) -> str:
    """``line L, column C: <problem> (<context> at line L')``: where the parser gave up, 1-based."""
    mark = getattr(e, "problem_mark", None)
    if mark is None:
        return f"({_one_line(e)})"
    where = f"at line {mark.line + 1}, column {mark.column + 1}: {getattr(e, 'problem', None) or 'error'}"
    context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and start is not None:
        where += f" ({context} started at line {start.line + 1})"
    return where


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def check_tasks(cfg: Config, available: list[str]) -> None:
    """Raise ConfigError if ``model.tasks`` names a task the registry does not have."""
    if not cfg.model.tasks:
        raise ConfigError(f"model.tasks is empty; allowed: {', '.join(sorted(available))}")
    for name in cfg.model.tasks:
        if name not in available:
            raise ConfigError(
                f"model.tasks: unknown task {name!r}; allowed: {', '.join(sorted(available))}"
            )
    for name in list(cfg.model.heads) + list(cfg.model.loss_weights):
        if name not in available:
            raise ConfigError(
                f"model.heads/loss_weights: unknown task {name!r}; allowed: {', '.join(sorted(available))}"
            )


AUTO_METRIC = "auto"
"""``train.best_metric`` value: the enabled tasks' first main metric (``resolve_best_metric``)."""


class _MetricTask(Protocol):
    """What metric checks read of a ``pipeline.task.Task`` (this module imports no task)."""

    name: str
    main_metric: str | None
    metrics: tuple[str, ...]


METRIC_SOURCE_SEPARATOR = "@"
"""Between a metric and its source when several are trained (``semantic/mIoU@nyuv2``)."""


def split_source(metric: str) -> tuple[str, str | None]:
    """``("semantic/mIoU", "nyuv2")`` for ``semantic/mIoU@nyuv2``; ``(metric, None)`` without."""
    base, sep, source = metric.rpartition(METRIC_SOURCE_SEPARATOR)
    return (base, source) if sep and base else (metric, None)


def resolve_best_metric(value: str, named: Iterable[str], tasks: Iterable[_MetricTask],
                        sources: Sequence[SourceConfig] = ()) -> str | None:
    """``value`` itself, or for ``auto`` the ``<task>/<main_metric>`` of the first of ``tasks``
    (the enabled ones) that has a main metric, taking the tasks ``named`` in ``model.tasks`` in
    their order first; ``None`` when no enabled task has one. With ``sources`` (``data.sources``),
    ``auto`` names the first source that trains that task: ``<task>/<main_metric>@<source>``."""
    if value != AUTO_METRIC:
        return value
    tasks = list(tasks)
    order = {name: i for i, name in enumerate(named)}
    ranked = sorted(tasks, key=lambda t: order.get(t.name, len(order)))  # stable: rest in order
    for task in ranked:
        if task.main_metric:
            metric = f"{task.name}/{task.main_metric}"
            for src in sources:
                if src.tasks is None or task.name in src.tasks:
                    return f"{metric}{METRIC_SOURCE_SEPARATOR}{src.name}"
            if not sources:
                return metric
    return None


def check_metric(key: str, metric: str, tasks: Iterable[_MetricTask],
                 sources: Sequence[SourceConfig] = ()) -> None:
    """Refuse ``metric`` (the value of config key ``key``) unless its task prefix is one of
    ``tasks`` (the enabled ones) and, where that task declares ``metrics``, its name matches one
    of them (``fnmatch`` patterns such as ``IoU/*``); with ``sources`` it must name one of them
    (``<task>/<metric>@<source>``), without, none. One ``ConfigError`` line."""
    tasks = list(tasks)
    base, source = split_source(metric)
    names = [s.name for s in sources]
    if sources and source not in names:
        raise ConfigError(f"{key} {metric!r}: data.sources has several datasets; name one: "
                          f"{base}@<{' | '.join(names)}>")
    if not sources and source is not None:
        raise ConfigError(f"{key} {metric!r}: @{source} names a source, but data.sources is empty")
    task_name, _, name = base.partition("/")
    task = next((t for t in tasks if t.name == task_name), None)
    if task is not None and name and (
            not task.metrics or any(fnmatchcase(name, p) for p in task.metrics)):
        return
    mains = ", ".join(f"{t.name}/{t.main_metric}" for t in tasks if t.main_metric) or "none"
    declared = f"{task.name} reports: {', '.join(task.metrics)}; " if task is not None and name else ""
    raise ConfigError(f"{key} {metric!r}: no enabled task reports it; {declared}"
                      f"enabled tasks' main metrics: {mains}")


def check_registry_tracking(cfg: Config, what: str) -> None:
    """Refuse ``what`` (a command or flow that keeps its champion in the MLflow model registry:
    retraining, serving it, promoting) when tracking is off. One ``ConfigError`` line."""
    if not cfg.tracking.enabled:
        raise ConfigError(f"{what}: tracking.enabled is false; the champion alias lives in the MLflow "
                          f"model registry: set tracking.enabled: true (and tracking.uri)")
