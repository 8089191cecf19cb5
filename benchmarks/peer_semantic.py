"""densepipe's semantic-only model against segmentation_models_pytorch's FPN, side by side.

Both models train on the same batches (the project's own loader over one rendered synthetic
split, same augmentation, same order), with the same optimizer (``pipeline.engine.trainer
.build_optimizer``: AdamW, ``train.lr``, ``train.weight_decay`` off norms and biases), the same
linear warm-up then a cosine decay to 0 over the budget's seconds (``TimeSchedule``: the
library's default schedule, indexed by time), and the same gradient clipping, for the same
wall-clock budget in interleaved time slices (slice ``i`` trains model A then model B, the order
reversed on odd slices, so a noisy neighbour slows both alike). densepipe's model is stepped by its own
``train_step``; smp's by the loop an smp user writes (ImageNet-normalised float input, cross-
entropy with the ignore index). Both are scored by the same code (``plugins.semantic.confusion``)
on the val split: densepipe through ``MultiTaskModel.predict``, smp by the argmax of its logits.

Used by ``benchmarks/peers.py``; smp comes from the ``bench`` extra (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Config, load_config
from pipeline.engine.loaders import eval_dataset, eval_loader, train_dataset, train_loader
from pipeline.engine.schedule import lr_factor
from pipeline.engine.step import train_step
from pipeline.engine.trainer import build_optimizer
from pipeline.model import PIXEL_MEAN, PIXEL_STD, build_model
from plugins.semantic.confusion import ConfusionMatrix

SMP_VERSION_PIN = "0.6.0"


def semantic_config(data_root: Path, *, size: int, seed: int, batch: int, overrides: list[str]) -> Config:
    """The library's defaults for a semantic-only model (what a user gets with
    ``model.tasks=[semantic]``), on the rendered synthetic data at ``data_root``."""
    return load_config(None, [
        f"data.root={data_root}", f"data.image_size={size}", f"data.synthetic.image_size={size}",
        "model.tasks=[semantic]", f"train.seed={seed}", f"train.batch_size={batch}",
        "train.schedule=constant", "train.device=cpu", *overrides])


@dataclass
class TimeSchedule:
    """The library's default schedule indexed by training time, as a time budget needs (its step
    count is not known in advance): linear warm-up over ``warmup_steps`` steps, times a cosine
    from 1 to 0 over ``budget_s`` seconds of training (``elapsed_s``, which the trainee advances
    before each step); ``budget_s=None``: constant after the warm-up."""

    warmup_steps: int
    budget_s: float | None = None
    elapsed_s: float = 0.0

    def __post_init__(self) -> None:
        self._warmup = lr_factor(kind="constant", total_steps=1 << 30, warmup_steps=self.warmup_steps)

    def factor(self, step: int) -> float:
        """Multiplier of the base rate for ``step`` (``LambdaLR``'s ``lr_lambda``)."""
        warm = self._warmup(step)
        if self.budget_s is None:
            return warm
        return warm * 0.5 * (1 + math.cos(math.pi * min(self.elapsed_s / self.budget_s, 1.0)))


@dataclass
class Trainee:
    """One model under the budget: its step, its predictor, its schedule and its running totals."""

    name: str
    step: Callable[[dict[str, Any]], float]
    predict: Callable[[dict[str, Any]], torch.Tensor]
    batches: Iterator[dict[str, Any]]
    schedule: TimeSchedule
    seconds: float = 0.0
    steps: int = 0
    images: int = 0
    images_timed_offset: int = 0
    """Images of the untimed warm-up steps (not in ``images_per_s``)."""
    losses: list[float] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        """Training images per second over the timed slices."""
        return (self.images - self.images_timed_offset) / max(self.seconds, 1e-9)

    def step_once(self) -> None:
        """One training step on the next batch, counted."""
        batch = next(self.batches)
        self.losses.append(self.step(batch))
        self.steps += 1
        self.images += int(batch["image"].shape[0])

    def summary(self, model: nn.Module, cfg: Config, card: Any) -> dict[str, Any]:
        """Steps, timed images/s, val mIoU, parameters and the mean of the last 20 losses."""
        return {"steps": self.steps, "images": self.images, "train_seconds": round(self.seconds, 2),
                "images_per_s": round(self.images_per_s, 3), "mIoU": round(miou(self, cfg, card), 4),
                "parameters": sum(p.numel() for p in model.parameters()),
                "last_loss_mean_of_20": round(sum(self.losses[-20:]) / len(self.losses[-20:]), 4)}

    def train_until(self, total_seconds: float) -> None:
        """Steps until this trainee's timed seconds reach ``total_seconds`` (the step that crosses
        it counts; the next slice's target is cumulative, so an overshoot is paid back there)."""
        start, before = time.perf_counter(), self.seconds
        while (elapsed := before + time.perf_counter() - start) < total_seconds:
            self.schedule.elapsed_s = elapsed
            self.step_once()
        self.seconds = before + time.perf_counter() - start


def zero_init_residual(model: nn.Module) -> None:
    """Each residual block's last norm to weight 0 (Goyal et al.'s ``zero_init_residual``, the
    default before the ablation found it slowed AdamW training from random initialisation)."""
    for m in model.modules():
        for name in ("bn2", "bn3"):
            norm = getattr(m, name, None)
            if isinstance(norm, nn.BatchNorm2d) and hasattr(m, "conv1"):
                nn.init.zeros_(norm.weight)


def fpn_kaiming_relu(model: nn.Module) -> None:
    """The FPN's convolutions initialised as smp's decoder (Kaiming uniform with the ReLU gain)
    instead of torchvision's ``kaiming_uniform_(a=1)`` (unit gain)."""
    for m in model.backbone.fpn.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")


def predictor_dropout(model: nn.Module) -> None:
    """``Dropout2d(0.2)`` on the fused features before the semantic predictor (smp's FPN decoder)."""
    decoder = model.heads["semantic"].decoder
    decoder.predictor = nn.Sequential(nn.Dropout2d(0.2), decoder.predictor)


def fpn_no_output_conv(model: nn.Module) -> None:
    """The FPN without its 3x3 output convolution per level (smp's FPN: each level is the 1x1
    lateral plus the upsampled coarser level, read directly by the head)."""
    fpn = model.backbone.fpn
    fpn.layer_blocks = nn.ModuleList(nn.Identity() for _ in fpn.layer_blocks)


ABLATIONS: dict[str, Callable[[nn.Module], None]] = {
    "fpn_no_output_conv": fpn_no_output_conv,
    "fpn_kaiming_relu": fpn_kaiming_relu, "zero_init_residual": zero_init_residual,
    "predictor_dropout": predictor_dropout}


def densepipe_trainee(cfg: Config, card: Any, *, name: str = "densepipe",
                      mutate: Callable[[nn.Module], None] | None = None) -> tuple[Trainee, nn.Module]:
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, card)
    if mutate is not None:
        mutate(model)
    model.use_channels_last(cfg.train.channels_last)
    optimizer = build_optimizer(cfg, model)
    schedule = TimeSchedule(cfg.train.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
    model.train()

    def step(batch: dict[str, Any]) -> float:
        model.train()
        row = train_step(model, batch, optimizer, scheduler, clip_grad_norm=cfg.train.clip_grad_norm)
        return row["loss"]

    def predict(batch: dict[str, Any]) -> torch.Tensor:
        model.eval()
        return torch.stack(model.predict(batch)["semantic"])

    return Trainee(name, step, predict, _batches(cfg), schedule), model


def smp_trainee(cfg: Config, card: Any, *, encoder: str) -> tuple[Trainee, nn.Module]:
    import segmentation_models_pytorch as smp

    torch.manual_seed(cfg.train.seed)
    model = smp.FPN(encoder_name=encoder, encoder_weights=None, classes=card.num_classes)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    schedule = TimeSchedule(cfg.train.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)

    def inputs(batch: dict[str, Any]) -> torch.Tensor:
        x = (batch["image"].float() - mean) / std
        return x.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else x

    def step(batch: dict[str, Any]) -> float:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs(batch)), batch["semantic"], ignore_index=card.ignore_index)
        loss.backward()
        if cfg.train.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
        optimizer.step()
        scheduler.step()
        return float(loss.detach())

    @torch.no_grad()
    def predict(batch: dict[str, Any]) -> torch.Tensor:
        model.eval()
        return model(inputs(batch)).argmax(1)

    return Trainee("smp", step, predict, _batches(cfg), schedule), model


def _batches(cfg: Config) -> Iterator[dict[str, Any]]:
    """The training batches in the loader's seeded order (each trainee its own iterator)."""
    return iter(train_loader(cfg, train_dataset(cfg, tasks=["semantic"]), start_step=0))


def miou(trainee: Trainee, cfg: Config, card: Any) -> float:
    """Mean IoU over the val split (classes present in it), by ``ConfusionMatrix``."""
    matrix = ConfusionMatrix(card.num_classes, ignore_index=card.ignore_index)
    dataset = eval_dataset(cfg, tasks=["semantic"])
    for batch in eval_loader(cfg, dataset, batch_size=cfg.evaluate.batch_size):
        matrix.update(trainee.predict(batch), batch["semantic"])
    return float(matrix.compute()["mIoU"])


WARMUP_STEPS = 3
"""Untimed first steps of each trainee (its loader's workers starting, first-call allocations):
they train on the same first batches, so both still see the same data."""


def interleave(trainees: list[Trainee], *, budget_s: float, slice_s: float,
               after_slice: Callable[[float], None] | None = None) -> None:
    """Each trainee gets ``budget_s`` seconds in slices of ``slice_s``, alternating the order,
    after ``WARMUP_STEPS`` untimed steps each. Slice ``i`` ends when a trainee's total reaches
    ``(i + 1)`` slices' worth, so the budgets stay equal within one step even where a step is a
    large part of a slice (512 px on a CPU). Each trainee's rate follows a cosine to 0 over its
    ``budget_s`` (``TimeSchedule``, the library's default schedule).
    ``after_slice(seconds)`` runs, untimed, after each slice but the last (a learning curve)."""
    for t in trainees:
        t.schedule.budget_s = budget_s
        for _ in range(WARMUP_STEPS):
            t.step_once()
        t.images_timed_offset = t.images
    slices = max(1, round(budget_s / slice_s))
    for i in range(slices):
        for t in trainees if i % 2 == 0 else trainees[::-1]:
            t.train_until(budget_s * (i + 1) / slices)
        if after_slice is not None and i + 1 < slices:
            after_slice(budget_s * (i + 1) / slices)


def run(data_root: Path, card: Any, *, size: int, seed: int, batch: int, budget_s: float,
        slice_s: float, encoder: str, overrides: list[str], with_curve: bool = False) -> dict[str, Any]:
    """One seed: both models for ``budget_s`` seconds each; their steps, img/s and val mIoU
    (``with_curve``: also both val mIoUs after every slice, evaluated outside the budgets)."""
    cfg = semantic_config(data_root, size=size, seed=seed, batch=batch,
                          overrides=[f"model.backbone={encoder}", *overrides])
    ours, ours_model = densepipe_trainee(cfg, card)
    peer, peer_model = smp_trainee(cfg, card, encoder=encoder)
    curve: list[dict[str, float]] = []

    def point(seconds: float) -> None:
        curve.append({"seconds": round(seconds, 1), **{t.name: round(miou(t, cfg, card), 4)
                                                        for t in (ours, peer)}})

    interleave([ours, peer], budget_s=budget_s, slice_s=slice_s, after_slice=point if with_curve else None)
    out: dict[str, Any] = {"seed": seed}
    for t, m in ((ours, ours_model), (peer, peer_model)):
        out[t.name] = t.summary(m, cfg, card)
    out["miou_ratio"] = round(out["densepipe"]["mIoU"] / max(out["smp"]["mIoU"], 1e-9), 4)
    out["speed_ratio"] = round(out["densepipe"]["images_per_s"] / out["smp"]["images_per_s"], 4)
    if with_curve:
        curve.append({"seconds": round(budget_s, 1), **{n: out[n]["mIoU"] for n in ("densepipe", "smp")}})
        late = curve[len(curve) // 2:]
        out["curve"] = curve
        out["miou_ratio_second_half"] = round(sum(p["densepipe"] for p in late)
                                              / max(sum(p["smp"] for p in late), 1e-9), 4)
    return out


def _mutations(name: str) -> Callable[[nn.Module], None] | None:
    """The ``ABLATIONS`` a variant name joins with ``+`` (other parts are labels), applied in order."""
    found = [ABLATIONS[part] for part in name.split("+") if part in ABLATIONS]
    return (lambda model: [f(model) for f in found]) if found else None  # type: ignore[func-returns-value]


def ablate(data_root: Path, card: Any, *, size: int, seed: int, batch: int, budget_s: float,
           slice_s: float, encoder: str, variants: dict[str, list[str]]) -> dict[str, Any]:
    """Several densepipe variants (``name -> overrides``; a name in ``ABLATIONS`` also applies
    that change to the built model) and smp, each for ``budget_s`` seconds interleaved."""
    trainees: list[tuple[Trainee, nn.Module, Config]] = []
    for name, overrides in variants.items():
        cfg = semantic_config(data_root, size=size, seed=seed, batch=batch,
                              overrides=[f"model.backbone={encoder}", *overrides])
        t, m = densepipe_trainee(cfg, card, name=name, mutate=_mutations(name))
        trainees.append((t, m, cfg))
    cfg = semantic_config(data_root, size=size, seed=seed, batch=batch,
                          overrides=[f"model.backbone={encoder}"])
    t, m = smp_trainee(cfg, card, encoder=encoder)
    trainees.append((t, m, cfg))
    interleave([t for t, _, _ in trainees], budget_s=budget_s, slice_s=slice_s)
    out = {}
    for t, m, c in trainees:
        summary = t.summary(m, c, card)
        del summary["images"], summary["train_seconds"]  # the run's part reports them; this never did
        out[t.name] = {"overrides": variants.get(t.name, []), **summary}
    return out
