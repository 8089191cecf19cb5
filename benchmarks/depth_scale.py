"""How much of a depth model's error on the synthetic world is its absolute scale, and how much of
that scale error is the camera height the image hides.

The synthetic world is scale-ambiguous by construction: the camera stands 1.1-2.2 m above the floor
and every size in view (things, floor tiles, textures, rooms) is drawn from a wide range, so the
same picture fits a taller camera in a larger room. The geometry of the floor then fixes depth only
up to the camera height. This benchmark regenerates each image's scene from its seed
(``pipeline.data.synthetic.scene_seed``), reads the camera height ``h`` and, for a checkpoint's
predictions on the split, reports:

- ``delta1`` as evaluated (predictions clipped to ``--max-depth``, as the evaluation does), and
  ``delta1_median_scaled`` after dividing each image by its median predicted / true ratio (the
  shape alone; the median of the ratios, where the evaluation's ``median_scaling`` takes the
  ratio of the medians);
- ``scale_sd``: the spread over images of that median, in log;
- ``height_slope``: that log scale error regressed on log h (centred): 0 = the model reads the
  height, -1 = it ignores it and predicts the same depths for every height; ``height_corr``;
- ``delta1_height_read``: delta1 once the height-correlated part of each image's scale error is
  taken out (what reading the height exactly would give, the shape and the rest of the scale error
  unchanged);
- ``no_cue_bound``: delta1 of the exact depth shape scaled by the one camera height that is best
  for the whole split, i.e. of a model that reads everything but the height.

    python benchmarks/depth_scale.py --checkpoint runs/train/last.pt [--root data/synthetic]

Writes ``benchmarks/results/depth_scale.json`` (``--out``), or adds the checkpoint to it under
``--name``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from pipeline.config import config_from_dict  # noqa: E402
from pipeline.data.synthetic import scene_seed  # noqa: E402
from pipeline.data.synthetic.scene import sample_scene  # noqa: E402
from pipeline.engine.loaders import eval_dataset, eval_loader  # noqa: E402
from pipeline.engine.trainer import load_trained_model  # noqa: E402
from pipeline.errors import DataError  # noqa: E402
from pipeline.io import atomic_write_json  # noqa: E402
from plugins.depth.task import to_depth  # noqa: E402

LOG_DELTA1 = math.log(1.25)


def camera_heights(card, split: str, image_ids: list[int], *, root: str) -> np.ndarray:
    """Camera height (m) of each image, from its scene regenerated from the card's seed."""
    extra = card.extra
    if extra.get("generator") != "densepipe.synthetic":
        raise DataError(Path(root) / "meta.json", "extra.generator: expected 'densepipe.synthetic' "
                        "(the camera heights come from the generator's seeds)")
    size, seed = int(extra["image_size"]), int(extra["seed"])
    return np.array([sample_scene(np.random.default_rng(scene_seed(seed, split, i - 1)), size)
                     .camera.position[2] for i in image_ids])


def per_image_log_ratios(model, cfg, dataset, *, max_depth: float) -> list[torch.Tensor]:
    """Per image, log(predicted / true depth) over its valid pixels (true depth in (0, max_depth])."""
    ratios = []
    with torch.no_grad():
        for batch in eval_loader(cfg, dataset, batch_size=cfg.evaluate.batch_size):
            pred = to_depth(model(batch)["depth"], model.options["depth"].output)[:, 0]
            true = batch["depth"].float()
            for p, t in zip(pred, true, strict=True):
                valid = (t > 0) & (t <= max_depth)
                ratios.append((p.clamp(max=max_depth)[valid] / t[valid]).log())
    return ratios


def best_constant_coverage(values: np.ndarray, weights: np.ndarray, radius: float) -> float:
    """max over c of the summed ``weights`` of ``values`` with ``|value - c| < radius``: an optimal
    window can slide up until its lower end meets a value, so trying each value there is exact."""
    ends = values[:, None] + 2 * radius * (1 - 1e-9)
    covered = (values[None, :] >= values[:, None]) & (values[None, :] < ends)
    return float((covered * weights[None, :]).sum(1).max())


def scale_report(ratios: list[torch.Tensor], heights: np.ndarray) -> dict[str, float]:
    """The numbers of the module docstring from per-image log ratios and camera heights."""
    pixels = np.array([len(r) for r in ratios], dtype=float)
    keep = pixels > 0
    ratios = [r for r, k in zip(ratios, keep, strict=True) if k]
    pixels, heights = pixels[keep], heights[keep]
    within = [(r.abs() < LOG_DELTA1).sum().item() for r in ratios]
    scale = np.array([r.median().item() for r in ratios])
    shape = [((r - s).abs() < LOG_DELTA1).sum().item() for r, s in zip(ratios, scale, strict=True)]
    log_h = np.log(heights) - np.log(heights).mean()
    slope, _ = np.polyfit(log_h, scale, 1)
    read = [((r - slope * h).abs() < LOG_DELTA1).sum().item() for r, h in zip(ratios, log_h, strict=True)]
    no_cue = best_constant_coverage(np.log(heights), pixels, LOG_DELTA1)
    total = pixels.sum()
    return {
        "images": int(keep.sum()),
        "delta1": sum(within) / total,
        "delta1_median_scaled": sum(shape) / total,
        "scale_sd": float(scale.std()),
        "height_slope": float(slope),
        "height_corr": float(np.corrcoef(log_h, scale)[0, 1]),
        "scale_sd_not_height": float(np.std(scale - slope * log_h)),
        "log_height_sd": float(log_h.std()),
        "delta1_height_read": sum(read) / total,
        "no_cue_bound": float(no_cue / total),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--root", default=str(ROOT / "data" / "synthetic"))
    ap.add_argument("--split", default="val")
    ap.add_argument("--max-depth", type=float, default=20.0)
    ap.add_argument("--name", default=None, help="key of this checkpoint in the JSON (default: its path)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "depth_scale.json"))
    args = ap.parse_args()
    model, ckpt = load_trained_model(None, args.checkpoint)  # reads the checkpoint once
    cfg = config_from_dict({**ckpt["config"], "data": {**ckpt["config"]["data"], "root": args.root}},
                           source=args.checkpoint)
    if "depth" not in model.tasks:
        raise SystemExit(f"{args.checkpoint}: the model has no depth task")
    dataset = eval_dataset(cfg, args.split)
    heights = camera_heights(dataset.card, args.split, dataset.image_ids, root=args.root)
    report = scale_report(per_image_log_ratios(model, cfg, dataset, max_depth=args.max_depth), heights)
    print(json.dumps({k: round(v, 4) for k, v in report.items()}, indent=1))
    out = Path(args.out)
    results = json.loads(out.read_text())["results"] if out.exists() else {}
    results[args.name or args.checkpoint] = {
        "step": int(ckpt["step"]), "tasks": list(cfg.model.tasks),
        **{k: round(v, 4) for k, v in report.items()}}
    atomic_write_json(out, {
        "benchmark": "depth_scale",
        "command": "python benchmarks/depth_scale.py --checkpoint CKPT --name NAME",
        "what": "per-image scale error of depth predictions on the synthetic split and its share "
                "explained by the hidden camera height (see the script's docstring)",
        "data": {"root": Path(args.root).name, "split": args.split, "max_depth": args.max_depth},
        "results": results,
    })


if __name__ == "__main__":
    main()
