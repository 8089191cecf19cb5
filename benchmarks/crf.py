"""Dense CRF post-processing (``plugins.semantic.crf``): its mIoU effect and its cost.

Two measurements:

- ``synthetic``: a semantic-only model is trained on CPU for ``--steps`` steps (params.yaml's
  settings with ``model.tasks=[semantic]``, the synthetic world rendered into a temporary
  folder), then the val split is evaluated as ``densepipe evaluate`` does (the test-size rule,
  logits pasted back at the original size) without the CRF and with each CRF setting on the
  same logits: mIoU, pixel accuracy and CRF seconds per image. The exact path (every pixel pair,
  O(pixels^2)) runs on the first ``--exact-images`` images only, compared with no CRF on those.
- ``real``: the real photographs among the conformance fixtures (``../shared/testdata/
  conformance``: panopticapi's two COCO val2017 images, faster-coco-eval's three shapes JPEGs),
  with no model trained on their classes: the unaries are the ground truth seen at output stride
  ``s`` (one-hot averaged over s x s cells, bilinearly upsampled, as a perfect stride-s head with
  bilinear upsampling would give), smoothed to ``p = 0.8 p + 0.2 / C``, logits ``log p``. This
  measures the CRF's one job, putting boundaries back on image edges, on real colours.

    python benchmarks/crf.py [--steps 300] [--windows 5,11,21] [--exact-images 4] [--out FILE]
    python benchmarks/crf.py --smoke     # seconds: 20 steps, 64x64 images, no result file

Writes ``benchmarks/results/crf.json`` (docs/benchmarks.md renders it: ``docs/gen_benchmarks.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from machine import cpu_description  # noqa: E402  (benchmarks/machine.py)

from pipeline.config import load_config  # noqa: E402
from pipeline.io import atomic_write_json  # noqa: E402
from plugins.semantic.confusion import ConfusionMatrix  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "crf.json"
CONFORMANCE = ROOT.parent / "shared" / "testdata" / "conformance"
SETTINGS = ("params.yaml with model.tasks=[semantic] (mobilenet_v3_large, fpn_channels 64, semantic "
            "head conv_dims 32 norm BN, AdamW lr 0.002 poly, batch 8, 128x128 crops), "
            "data.synthetic.num_train 320, random init, CPU")
SMOOTH = 0.2  # real fixtures: p = (1 - SMOOTH) p + SMOOTH / C


def overrides(data_root: Path, out_dir: Path, *, steps: int, smoke: bool) -> list[str]:
    values: dict[str, Any] = {
        "data.root": str(data_root), "data.num_workers": 0, "model.tasks": "[semantic]",
        "data.synthetic.num_train": 320, "train.steps": steps,
        "train.warmup_steps": min(50, max(1, steps // 10)),
        "train.eval_every": 0, "train.checkpoint_every": 1000000, "train.progress": False,
        "train.device": "cpu", "train.out_dir": str(out_dir), "evaluate.num_visualizations": 0,
        "tracking.enabled": False,
    }
    if smoke:
        values.update({"data.synthetic.num_train": 16, "data.synthetic.num_val": 4, "data.image_size": 64,
                       "data.synthetic.image_size": 64, "train.batch_size": 4})
    return [f"{k}={v}" for k, v in values.items()]


ALTERNATIVE = {"appearance_weight": 10.0, "theta_alpha": 80.0, "theta_beta": 13.0}
"""A second parameter set, at window 11: pydensecrf's README example (``addPairwiseBilateral(sxy=80,
srgb=13, compat=10)``, ``addPairwiseGaussian(sxy=3, compat=3)``): a stronger, less colour-strict
appearance kernel than DeepLab's."""


def variants(windows: list[int], base: Any) -> dict[str, Any]:
    out = {f"window_{k}": base.model_copy(update={"window": k}) for k in windows}
    out["window_11_pydensecrf_example"] = base.model_copy(update={"window": 11, **ALTERNATIVE})
    return out


def score(matrix: ConfusionMatrix, names: list[str]) -> dict[str, float]:
    m = matrix.compute(class_names=names)
    return {"mIoU": round(float(m["mIoU"]), 4), "pixel_acc": round(float(m["pixel_acc"]), 4)}


def synthetic(cfg: Any, *, windows: list[int], exact_images: int) -> dict[str, Any]:
    """Train (or resume: ``train.out_dir`` may hold a finished run), then evaluate the val split
    with and without the CRF on the same logits."""
    from pipeline import stages
    from pipeline.engine.loaders import eval_dataset, eval_loader
    from pipeline.nn.inference_size import paste_maps
    from pipeline.trained_model import load_model_to_evaluate

    t0 = time.perf_counter()
    stages.prepare(cfg)
    prepare_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = stages.train(cfg)
    train_s = time.perf_counter() - t0
    from plugins.semantic.crf import CRFOptions, dense_crf_batch

    base = CRFOptions()
    model, step, _, _ = load_model_to_evaluate(cfg, checkpoint=summary["last"])
    model.eval()
    card = model.card
    names = list(card.class_names)
    settings = variants(windows, base)
    exact = base.model_copy(update={"window": None})
    matrices = {k: ConfusionMatrix(card.num_classes, card.ignore_index) for k in ["none", *settings]}
    subset = {k: ConfusionMatrix(card.num_classes, card.ignore_index) for k in ["none", "exact"]}
    seconds = dict.fromkeys([*settings, "exact"], 0.0)
    best = dict.fromkeys(settings, float("inf"))  # least seconds per image of any batch: load-robust
    images = 0
    size = None
    loader = eval_loader(cfg, eval_dataset(cfg, tasks=["semantic"]), batch_size=cfg.evaluate.batch_size)
    with torch.no_grad():
        for batch in loader:
            prepared = model.inference_resize.prepare(batch) if model.inference_resize else batch
            logits = paste_maps(model(prepared)["semantic"], prepared).float()
            original = prepared.get("original_image", prepared["image"])
            size = tuple(original.shape[-2:])
            targets = batch["semantic"]
            n = logits.shape[0]
            preds = {"none": logits.argmax(1)}
            for key, opts in settings.items():
                t = time.perf_counter()
                preds[key] = dense_crf_batch(logits, original, opts).argmax(1)
                elapsed = time.perf_counter() - t
                seconds[key] += elapsed
                best[key] = min(best[key], elapsed / n)
            for key, pred in preds.items():
                for i in range(n):
                    matrices[key].update(pred[i], targets[i])
            for i in range(n):
                if images + i < exact_images:
                    t = time.perf_counter()
                    q = dense_crf_batch(logits[i:i + 1], original[i:i + 1], exact)
                    seconds["exact"] += time.perf_counter() - t
                    subset["exact"].update(q.argmax(1)[0], targets[i])
                    subset["none"].update(preds["none"][i], targets[i])
            images += n
    rows: dict[str, dict[str, Any]] = {"none": {**score(matrices["none"], names), "seconds_per_image": 0.0}}
    for key in settings:
        rows[key] = {**score(matrices[key], names),
                     "seconds_per_image": round(seconds[key] / max(images, 1), 4),
                     "seconds_per_image_best_batch": round(best[key], 4)}
    n_exact = min(exact_images, images)
    result: dict[str, Any] = {
        "images": images, "image_size": list(size) if size else None, "steps": step,
        "prepare_seconds": round(prepare_s, 1), "train_seconds": round(train_s, 1),
        "train_reported_mIoU": round(float((summary.get("metrics") or {}).get("semantic/mIoU", math.nan)), 4),
        "rows": rows,
    }
    if n_exact:
        result["exact_subset"] = {
            "none": {**score(subset["none"], names), "seconds_per_image": 0.0, "images": n_exact},
            "exact": {**score(subset["exact"], names),
                      "seconds_per_image": round(seconds["exact"] / n_exact, 3), "images": n_exact},
        }
    return result


def _panoptic_fixtures() -> list[tuple[str, np.ndarray, np.ndarray]]:
    from PIL import Image

    folder = CONFORMANCE / "panoptic_sample"
    meta = json.loads((folder / "panoptic_examples.json").read_text())
    out = []
    for ann in meta["annotations"]:
        stem = Path(ann["file_name"]).stem
        png = np.asarray(Image.open(folder / "panoptic_examples" / ann["file_name"]).convert("RGB"), np.int64)
        ids = png[..., 0] + 256 * png[..., 1] + 256 * 256 * png[..., 2]
        cats = sorted({s["category_id"] for s in ann["segments_info"]})
        label = np.full(ids.shape, 255, np.int64)  # unlabelled (id 0) stays ignored
        for s in ann["segments_info"]:
            label[ids == s["id"]] = cats.index(s["category_id"])
        image = np.asarray(Image.open(folder / "input_images" / f"{stem}.jpg").convert("RGB"))
        out.append((f"coco_{stem}", image, label))
    return out


def _shapes_fixtures() -> list[tuple[str, np.ndarray, np.ndarray]]:
    from PIL import Image
    from pycocotools import mask as mask_utils

    folder = CONFORMANCE / "shapes_case"
    gt = json.loads((folder / "gt_dataset.json").read_text())
    cats = sorted(c["id"] for c in gt["categories"])
    out = []
    for img in gt["images"]:
        h, w = img["height"], img["width"]
        label = np.zeros((h, w), np.int64)  # background: class 0
        for ann in gt["annotations"]:
            if ann["image_id"] != img["id"]:
                continue
            rles = mask_utils.frPyObjects(ann["segmentation"], h, w)
            m = mask_utils.decode(mask_utils.merge(rles) if isinstance(rles, list) else rles)
            label[m.astype(bool)] = 1 + cats.index(ann["category_id"])
        image = np.asarray(Image.open(folder / img["file_name"]).convert("RGB"))
        out.append((f"shapes_{Path(img['file_name']).stem}", image, label))
    return out


def coarse_logits(label: np.ndarray, classes: int, stride: int) -> torch.Tensor:
    """The ground truth as a perfect stride-``stride`` head with bilinear upsampling sees it:
    C x H x W logits (log of the smoothed probabilities)."""
    t = torch.from_numpy(label)
    valid = t != 255
    onehot = F.one_hot(torch.where(valid, t, 0), classes).permute(2, 0, 1).float() * valid
    h, w = label.shape
    pooled = F.avg_pool2d(onehot[None], stride, ceil_mode=True)
    pooled = pooled / pooled.sum(1, keepdim=True).clamp_min(1e-6)
    up = F.interpolate(pooled, size=(h, w), mode="bilinear", align_corners=False)[0]
    p = (1 - SMOOTH) * up + SMOOTH / classes
    return p.clamp_min(1e-6).log()


def label_miou(pred: torch.Tensor, label: np.ndarray, classes: int) -> float:
    m = ConfusionMatrix(classes, 255)
    m.update(pred, torch.from_numpy(label))
    return score(m, [str(c) for c in range(classes)])["mIoU"]


def real(*, windows: list[int], strides: list[int]) -> dict[str, Any]:
    from plugins.semantic.crf import CRFOptions, dense_crf_batch

    base = CRFOptions()
    fixtures = _panoptic_fixtures() + _shapes_fixtures()
    settings = variants(windows, base)
    rows: dict[str, dict[str, Any]] = {}
    for stride in strides:
        for name, image, label in fixtures:
            classes = int(label[label != 255].max()) + 1
            logits = coarse_logits(label, classes, stride)
            img = torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous()
            row: dict[str, Any] = {"image": name, "size": f"{label.shape[0]}x{label.shape[1]}",
                                   "classes": classes, "stride": stride}
            row["none"] = label_miou(logits.argmax(0), label, classes)
            for key, opts in settings.items():
                t = time.perf_counter()
                q = dense_crf_batch(logits[None], img[None], opts)[0]
                row[key] = label_miou(q.argmax(0), label, classes)
                row[f"{key}_seconds"] = round(time.perf_counter() - t, 3)
            rows[f"{name}_s{stride}"] = row
            print(json.dumps(row), flush=True)
    return rows


def _default_options() -> dict[str, Any]:
    from plugins.semantic.crf import CRFOptions

    return CRFOptions().model_dump(exclude={"window"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--windows", default="5,11,21", help="comma-separated odd window sizes")
    ap.add_argument("--exact-images", type=int, default=4, help="val images for the exact path (0: none)")
    ap.add_argument("--strides", default="8,16", help="real fixtures: output strides of the coarse unaries")
    ap.add_argument("--out", default=None, help=f"JSON results (default {DEFAULT_OUT.relative_to(ROOT)})")
    ap.add_argument("--work-dir", default=None,
                    help="keep the rendered data and the trained run here (reused when present)")
    ap.add_argument("--smoke", action="store_true", help="seconds: 20 steps at 64x64, no real fixtures")
    args = ap.parse_args()
    windows = [int(k) for k in args.windows.split(",") if k]
    steps = 20 if args.smoke else args.steps
    out_path = Path(args.out) if args.out else (None if args.smoke else DEFAULT_OUT)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="densepipe-crf-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        cfg = load_config(ROOT / "params.yaml",
                          overrides(work / "data", work / "run", steps=steps, smoke=args.smoke))
        syn = synthetic(cfg, windows=windows, exact_images=2 if args.smoke else args.exact_images)
    print(json.dumps(syn, indent=1), flush=True)
    have_real = CONFORMANCE.is_dir() and not args.smoke
    real_rows = real(windows=windows, strides=[int(s) for s in args.strides.split(",")]) \
        if have_real else {}
    report: dict[str, Any] = {
        "benchmark": "crf",
        "command": "python benchmarks/crf.py " + " ".join(sys.argv[1:]),
        "device": cpu_description(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "settings": SETTINGS + (" (smoke: 16 images at 64x64, batch 4)" if args.smoke else ""),
        "crf_options": _default_options(),
        "synthetic": syn,
        "real": real_rows,
    }
    if out_path is not None:
        atomic_write_json(out_path, report)
        print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
