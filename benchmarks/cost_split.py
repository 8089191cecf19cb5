"""Where a multi-task training step's time goes: reading a batch, a backbone pass, each head.

``benchmarks/multitask.py`` measures the cost ratio (multi-task training time / the sum of the
single-task models' times, target <= 0.5) end to end. This splits it into its parts on the same
in-memory batches, so the ratio can be predicted on any machine:

- ``L``: seconds to read and augment one batch (``train_loader``, ``data.num_workers`` as set);
- ``step/<model>``: seconds per ``train_step`` (forward, losses, backward, AdamW) of the
  multi-task model and of each single-task model, after ``--warmup`` steps, on the same batches,
  in the memory layout training uses (``train.channels_last``);
  the multi-task model is timed before and after the single ones (their spread is the noise);
- ``B``: a backbone pass, from the two sums: the multi-task model runs the backbone once per input
  view (twice with colorization: RGB and gray), the k single models k times, each head once on
  both sides, so ``B = (sum of singles - multi) / (k - views)``, ``sum_h = multi - views * B``
  and ``h/<task> = single - B``. Fixed per-step costs (the optimizer over the backbone's weights,
  Python dispatch) are paid once per model and land in ``B`` and the ``h``: the split is an
  estimate, meaningful where the convolutions dominate (not at ``--smoke`` sizes, where h < 0).

Reads the prepared dataset at ``data.root`` (run from the repository root after ``densepipe
prepare``, or ``--set data.root=...``). Predicted ratio ``(L + multi) / (kL + sum of singles)``;
with the four dense tasks it is <= 0.5 only when ``sum_h <= 2L`` (``sum_h_allowed``): the heads
must cost no more than reading two batches.

    python benchmarks/cost_split.py [--steps 30] [--warmup 3] [--tasks semantic,depth,normals,colorization]
        [--set KEY=VALUE ...] [--out benchmarks/results/cost_split.json] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from machine import cpu_description  # noqa: E402  (benchmarks/machine.py)

from pipeline.config import load_config  # noqa: E402
from pipeline.engine.loaders import train_dataset, train_loader  # noqa: E402
from pipeline.engine.trainer import build_optimizer, train_step  # noqa: E402
from pipeline.io import atomic_write_json  # noqa: E402
from pipeline.model import build_model  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "cost_split.json"
DEFAULT_TASKS = ("semantic", "depth", "normals", "colorization")
SMOKE = ["data.image_size=64", "train.batch_size=2"]


def seconds_per_step(cfg: Any, card: Any, batches: list[dict[str, Any]], *, warmup: int) -> tuple[float, int]:
    """Mean ``train_step`` seconds over ``batches[warmup:]`` of a fresh model of ``cfg``, and the
    number of input views its backbone runs on per step (``MultiTaskModel.views``)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, card).use_channels_last(cfg.train.channels_last)  # as training runs it
    model.train()
    optimizer = build_optimizer(cfg, model)
    clip = cfg.train.clip_grad_norm
    for batch in batches[:warmup]:
        train_step(model, batch, optimizer, clip_grad_norm=clip)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        train_step(model, batch, optimizer, clip_grad_norm=clip)
    return (time.perf_counter() - start) / (len(batches) - warmup), len(model.views)


def first_batches(cfg: Any, n: int) -> tuple[list[dict[str, Any]], Any, float]:
    """The first ``n`` training batches of ``cfg`` (its ``train_loader``, augmentation on), its
    dataset card and the mean seconds to read and augment one batch."""
    dataset = train_dataset(cfg)
    batches_iter = iter(train_loader(cfg, dataset, start_step=0))
    start = time.perf_counter()
    batches = [next(batches_iter) for _ in range(n)]
    return batches, dataset.card, (time.perf_counter() - start) / n  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per model (12 moved by 10-20 %%)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--smoke", action="store_true", help="tiny images and batches (checks it runs)")
    args = ap.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    base = ["tracking.enabled=false", "train.device=cpu", *(SMOKE if args.smoke else []), *args.overrides]

    def config(names: list[str]) -> Any:
        return load_config(args.params, [*base, f"model.tasks=[{','.join(names)}]"])

    cfg = config(tasks)
    batches, card, load = first_batches(cfg, args.warmup + args.steps)

    multi_before, views = seconds_per_step(cfg, card, batches, warmup=args.warmup)
    singles = {t: seconds_per_step(config([t]), card, batches, warmup=args.warmup)[0] for t in tasks}
    multi_after, _ = seconds_per_step(cfg, card, batches, warmup=args.warmup)
    multi = (multi_before + multi_after) / 2
    total_singles = sum(singles.values())
    # backbone passes: one per single model, one per input view (RGB, gray) in the multi-task one
    backbone = (total_singles - multi) / (len(tasks) - views) if len(tasks) > views else None
    result: dict[str, Any] = {
        "benchmark": "cost_split",
        "command": "python benchmarks/cost_split.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "tasks": tasks, "steps": args.steps, "warmup": args.warmup, "overrides": args.overrides,
        "batch_size": cfg.train.batch_size, "image_size": cfg.data.image_size,
        "L_load_s": round(load, 4),
        "step_s": {"multi (before singles)": round(multi_before, 4),
                   "multi (after singles)": round(multi_after, 4),
                   **{t: round(s, 4) for t, s in singles.items()}},
        "predicted_cost_ratio": round((load + multi) / (len(tasks) * load + total_singles), 4),
        "device": cpu_description(), "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    if backbone is not None:
        sum_h = multi - views * backbone
        result.update({
            "B_backbone_pass_s": round(backbone, 4), "sum_h_s": round(sum_h, 4),
            "h_s": {t: round(s - backbone, 4) for t, s in singles.items()},
            "sum_h_allowed_s": round(2 * load, 4),
            "note": f"the multi-task model runs the backbone {views}x (once per input view), the single "
                    f"models {len(tasks)}x: B = (sum of singles - multi) / {len(tasks) - views}; "
                    "with 4 tasks and 2 views the ratio is <= 0.5 only when sum_h <= 2 L",
        })
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.out), result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
