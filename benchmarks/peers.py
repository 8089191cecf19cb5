"""densepipe against what users would pick instead, side by side in one run, as ratios.

Parts (``--parts``, each written into its own key of the results file, so parts can be rerun
alone; every part records its sizes, seeds, budgets, the machine and its load):

- ``semantic``: the semantic-only model (library defaults, ``model.tasks=[semantic]``, ResNet-18)
  against segmentation_models_pytorch's ``FPN`` on the same encoder, the same batches, optimizer,
  warm-up, cosine decay over the budget's seconds and clipping, for equal wall-clock budgets in
  interleaved slices, scored by the same metric code (``benchmarks/peer_semantic.py``), with both
  models' val mIoU after every slice at 128 px (``curve``). Ratios: mIoU at equal time and
  images/s, per seed and size. Targets: both >= 1.0.
- ``instance``: the instance plugin against torchvision's ``MaskRCNN`` built with the same
  settings on the same backbone, starting from the same weights (``benchmarks/instance_speed.py``'s
  like-for-like pair, semantic head on both), stepped on the same batches in interleaved blocks,
  then both evaluated by the same COCO evaluator, once per seed (the seed picks the sampling
  stream both share). Ratios: images/s and bbox / segm AP at equal steps, per seed and over the
  seeds. Targets: >= 1.0.
- ``multitask``: the four dense tasks in one model against one model per task
  (``benchmarks/multitask.py``, in a subprocess): cost ratio (target <= 0.5) and Delta_m.
- ``ablation`` (not run by default): why the semantic model learned slower per image than smp's:
  variants of it (``--variants``), one change each, against smp in one interleaved run at the
  first size.
- ``cost_split``: where one training step of the all-task demo model goes at ``--split-size``
  (reading a batch, the backbone, each head's forward and backward, the optimizer).

smp is a benchmark-only dependency: ``pip install -c constraints.txt -e '.[bench]'``.

    python benchmarks/peers.py [--parts semantic,instance,multitask,cost_split] [--sizes 128,512]
        [--seeds 0,1] [--budget 128=240 --budget 512=300] [--instance-steps 150]
        [--multitask-steps 300] [--variants default,zero_init_residual] [--out FILE.json] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from machine import cpu_description  # noqa: E402  (benchmarks/machine.py)

from pipeline.io import atomic_write_json  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "peers.json"
PARTS = ("semantic", "instance", "multitask", "cost_split", "ablation")
TRACE_STEPS = 6
"""Steps whose total loss the instance part records for both models: equal at step 0 (same weights,
batch and sampling), apart from then on where a rounding difference flips a proposal's rank."""
ABLATION_VARIANTS = {
    "default": [],
    "zero_init_residual": [],
    "output_init=small": ["model.heads.semantic.output_init=small"],
    "head norm=BN": ["model.heads.semantic.norm=BN"],
    "fpn_kaiming_relu": [],
    "predictor_dropout": [],
    "fpn_channels=256": ["model.fpn_channels=256"],
    "fpn_no_output_conv": [],
    "fpn_no_output_conv+fpn_channels=256": ["model.fpn_channels=256"],
    "loss=cross_entropy+soft_dice": [
        "model.heads.semantic.loss=combined",
        "model.heads.semantic.loss_options={weights: {cross_entropy: 1, soft_dice: 1}}"],
    "class_weights=median_frequency": ["model.heads.semantic.class_weights=median_frequency"],
}
"""Why the semantic model learned slower per image than smp's FPN: each variant changes one
thing of the defaults (a name in ``peer_semantic.ABLATIONS`` also changes the built model; names
joined by ``+`` apply each). ``zero_init_residual`` and ``output_init=small`` are earlier defaults."""
TARGETS = {"semantic_miou_ratio_at_least": 1.0, "semantic_speed_ratio_at_least": 1.0,
           "instance_speed_ratio_at_least": 1.0, "instance_ap_ratio_at_least": 1.0,
           "multitask_cost_ratio_at_most": 0.5}


def conditions() -> dict[str, Any]:
    """The machine and its state when a part ends."""
    return {"device": cpu_description(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average_1min": round(os.getloadavg()[0], 2),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


def render(root: Path, *, size: int, num_train: int, num_val: int) -> Any:
    """The synthetic world at ``size`` x ``size`` in ``root`` (reused when there); its card."""
    from pipeline import stages
    from pipeline.config import load_config
    from pipeline.engine.loaders import train_dataset

    cfg = load_config(None, [f"data.root={root}", f"data.image_size={size}",
                             f"data.synthetic.image_size={size}", f"data.synthetic.num_train={num_train}",
                             f"data.synthetic.num_val={num_val}", "model.tasks=[semantic]"])
    stages.prepare(cfg)
    return train_dataset(cfg, tasks=["semantic"]).card  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# semantic vs smp


def kept_runs(previous: dict[str, Any], sizes: list[int]) -> dict[str, Any]:
    """The runs of an earlier report of a part at sizes this run does not measure again, each
    with its own conditions (the earlier part's where the run has none)."""
    part = {k: previous[k] for k in ("device", "threads", "torch", "load_average_1min", "finished")
            if k in previous}
    return {k: {**part, **v} for k, v in (previous.get("runs") or {}).items() if v.get("size") not in sizes}


def semantic_part(args: argparse.Namespace, data: Path, previous: dict[str, Any]) -> dict[str, Any]:
    import peer_semantic
    import segmentation_models_pytorch as smp

    runs: dict[str, Any] = kept_runs(previous, args.sizes)
    for size in args.sizes:
        card = render(data / f"s{size}", size=size, num_train=args.num_train, num_val=args.num_val)
        budget = args.budget.get(size, 60.0)
        for seed in args.seeds:
            print(f"== semantic {size} px, seed {seed}, {budget:.0f} s each", flush=True)
            result = peer_semantic.run(data / f"s{size}", card, size=size, seed=seed, batch=args.batch,
                                       budget_s=budget, slice_s=min(args.slice_s, budget),
                                       encoder=args.encoder, overrides=args.overrides,
                                       with_curve=size <= 128)
            print(json.dumps(result), flush=True)
            runs[f"{size}px_seed{seed}"] = {"size": size, "budget_s": budget, **result, **conditions()}
    ratios = {k: {"miou_ratio": r["miou_ratio"], "speed_ratio": r["speed_ratio"]} for k, r in runs.items()}
    return {
        "what": f"densepipe semantic-only ({args.encoder}, library defaults) vs smp.FPN({args.encoder}) "
                f"{smp.__version__}, random init, equal wall-clock budgets in interleaved "
                f"{args.slice_s:.0f} s slices, batch {args.batch}, the same batches, AdamW "
                "(train.lr, train.weight_decay), 50 warm-up steps, then a cosine to 0 over the budget's "
                "seconds, clip 5.0; fused AdamW on both; val mIoU by "
                "the same ConfusionMatrix",
        "ratios": ratios,
        "meets_target": all(r["miou_ratio"] >= 1.0 and r["speed_ratio"] >= 1.0
                            for k, r in ratios.items() if "note" not in runs[k]),  # a note: superseded
        "runs": runs, "overrides": args.overrides, **conditions()}


def ablation_part(args: argparse.Namespace, data: Path, previous: dict[str, Any]) -> dict[str, Any]:
    import peer_semantic

    size, budget = args.sizes[0], args.ablation_budget_s
    card = render(data / f"s{size}", size=size, num_train=args.num_train, num_val=args.num_val)
    runs = {}
    for seed in args.seeds[:1] if not args.smoke else [0]:
        print(f"== ablation {size} px, seed {seed}, {budget:.0f} s each", flush=True)
        names = ["default"] if args.smoke else args.variants or list(ABLATION_VARIANTS)
        variants = {name: ABLATION_VARIANTS[name] for name in names}
        runs[f"{size}px_seed{seed}"] = peer_semantic.ablate(
            data / f"s{size}", card, size=size, seed=seed, batch=args.batch, budget_s=budget,
            slice_s=min(args.slice_s, budget), encoder=args.encoder, variants=variants)
        print(json.dumps(runs[f"{size}px_seed{seed}"]), flush=True)
    return {"what": "variants of the semantic-only model, one change each, and smp's FPN, all for "
                    "the same budget in interleaved slices on the same batches, each rate a cosine to 0 "
                    "over the budget (see the semantic part)",
            "runs": runs, "budget_s": budget, **conditions()}


# ---------------------------------------------------------------------------------------------
# instance vs torchvision Mask R-CNN


def _torchvision_predictions(ref: Any, batch: dict[str, Any], card: Any) -> list[dict[str, torch.Tensor]]:
    """torchvision's detections as the instance task's predictions (card class indices,
    boolean masks)."""
    detector = ref.detector.eval()
    with torch.no_grad():
        found = detector(list(batch["image"].float()))
    things = torch.tensor(card.thing_indices, dtype=torch.int64)
    return [{"boxes": d["boxes"], "scores": d["scores"], "labels": things[d["labels"] - 1],
             "masks": d["masks"][:, 0] > 0.5} for d in found]


def coco_ap(predict: Any, cfg: Any, card: Any) -> dict[str, float]:
    """bbox and segm AP / AP50 over the val split by the instance task's COCO evaluator."""
    from pipeline.engine.loaders import eval_dataset, eval_loader
    from plugins.rcnn.evaluator import CocoEvaluator

    evaluator = CocoEvaluator(card, iou_types=("bbox", "segm"))
    for batch in eval_loader(cfg, eval_dataset(cfg, tasks=["instance"]), batch_size=8):
        evaluator.process(batch, predict(batch))
    found = evaluator.compute()
    keys = ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50")
    return {k: round(float(found[k]), 4) for k in keys if k in found}


def instance_part(args: argparse.Namespace, data: Path, previous: dict[str, Any]) -> dict[str, Any]:
    runs: dict[str, Any] = kept_runs(previous, args.sizes)
    for size in args.sizes:
        root = data / f"s{size}"
        card = render(root, size=size, num_train=args.num_train, num_val=args.num_val)
        if size <= 128:
            for seed in args.seeds:
                runs[f"{size}px_seed{seed}"] = instance_run(root, card, size=size, seed=seed,
                                                            steps=args.instance_steps, with_ap=True)
        else:  # at 512 px the CPU buys too few steps for an AP to mean anything: speed only
            runs[f"{size}px"] = instance_run(root, card, size=size, seed=0,
                                             steps=args.instance_steps_large, with_ap=False)
    seeded = [r for r in runs.values() if "ap_ratio" in r]
    over_seeds = {}  # the seeds' summed AP, densepipe over torchvision (None where theirs is 0)
    for k in seeded[0]["ap_ratio"] if seeded else {}:
        theirs = sum(r["ap"]["torchvision"][k] for r in seeded)
        over_seeds[k] = round(sum(r["ap"]["densepipe"][k] for r in seeded) / theirs, 4) if theirs else None
    return {
        "what": "densepipe instance plugin (+ semantic head) vs torchvision MaskRCNN with the same "
                "settings, backbone (mobilenet_v3_large FPN 64), heads and semantic head, starting "
                "from the same weights, SGD lr 0.02, the same batches in interleaved 2-step blocks, "
                "each step of both from the same random seed (the same anchors and RoIs sampled; "
                "the run's seed picks that stream); AP by the same COCO evaluator after the same "
                "steps (128 px only: at 512 px the CPU buys too few steps for an AP to mean anything)",
        "runs": runs,
        "ap_ratio_over_seeds": over_seeds,
        "meets_target": all(r["speed_ratio"] >= 1.0 for r in runs.values())
                        and all(v is not None and v >= 1.0 for v in over_seeds.values()),
        **conditions()}


def instance_run(root: Path, card: Any, *, size: int, seed: int, steps: int, with_ap: bool) -> dict[str, Any]:
    """Both R-CNN models from the same weights for ``steps`` steps on the same batches, images/s
    from interleaved 2-step blocks, then (``with_ap``) both AP and the same-weights control."""
    import statistics

    import instance_speed as ins

    plugin, ref = "plugin_sem_inst", "torchvision_sem_inst"
    then = ", then AP" if with_ap else ""
    print(f"== instance {size} px, seed {seed}: {steps} steps each{then}", flush=True)
    batches, _ = ins.load_batches(root, steps + 2, size=size)
    built = ins.build_all(root, card, [plugin, ref], size=size)
    seconds: dict[str, list[float]] = {plugin: [], ref: []}
    trace: dict[str, list[float]] = {plugin: [], ref: []}

    def step(name: str, index: int) -> None:
        # the same sampling randomness in both models' step ``index`` (anchors, RoIs):
        # torchvision's transform draws one number per image first, so the plugin side does too
        torch.manual_seed(1000 + 1_000_000 * seed + index)
        if name == plugin:
            for _ in range(len(batches[index]["image"])):
                torch.empty(1).uniform_()
        row = built[name][1](batches[index])
        if index < TRACE_STEPS:
            trace[name].append(round(row["loss"], 6))

    for i in range(2):  # warm-up, not timed
        for name in (plugin, ref):
            step(name, i)
    block = 2
    for r in range(steps // block):
        for name in (plugin, ref) if r % 2 == 0 else (ref, plugin):
            t0 = time.perf_counter()
            for i in range(2 + r * block, 2 + (r + 1) * block):
                step(name, i)
            seconds[name].append(time.perf_counter() - t0)
    per_round = [tr / tp for tp, tr in zip(seconds[plugin], seconds[ref], strict=True)]
    rate = {n: round(len(s) * block * ins.BATCH / sum(s), 3) for n, s in seconds.items()}
    run: dict[str, Any] = {
        "size": size, "seed": seed, "steps": len(seconds[plugin]) * block, "images_per_s": rate,
        "speed_ratio": round(statistics.median(per_round), 4),
        "speed_ratio_pooled": round(rate[plugin] / rate[ref], 4),
        "rounds_plugin_faster": f"{sum(x > 1 for x in per_round)}/{len(per_round)}",
        "loss_trace": {"densepipe": trace[plugin], "torchvision": trace[ref]}}
    if with_ap:
        cfg = ins.make_config(root, keypoints=False, size=size)
        model, reference = built[plugin][0].eval(), built[ref][0]
        ours = coco_ap(lambda b: model.predict(b)["instance"], cfg, card)
        theirs = coco_ap(lambda b: _torchvision_predictions(reference, b, card), cfg, card)
        # the inference paths alone: torchvision's model with densepipe's trained weights
        same = ins.build_reference(card, keypoints=False, size=size)[0]
        ins.copy_weights(built[plugin][0], same)
        run["ap"] = {"densepipe": ours, "torchvision": theirs,
                     "torchvision_with_densepipe_weights": coco_ap(
                         lambda b: _torchvision_predictions(same, b, card), cfg, card)}
        run["ap_ratio"] = {k: round(ours[k] / theirs[k], 4) if theirs.get(k) else None for k in ours}
    run.update(conditions())
    print(json.dumps(run), flush=True)
    return run


# ---------------------------------------------------------------------------------------------
# multi-task vs single-task models, and where a step's time goes


def multitask_part(args: argparse.Namespace, data: Path, previous: dict[str, Any]) -> dict[str, Any]:
    out = data / "multitask.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "multitask.py"),
               "--steps", str(args.multitask_steps), "--out", str(out), *(["--smoke"] if args.smoke else [])]
    print("== multitask: " + " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)
    result = json.loads(out.read_text())
    return {"what": "the four dense tasks in one model vs one model per task, the same steps each "
                    "(benchmarks/multitask.py)",
            "cost_ratio": result["cost_ratio"], "delta_m_percent": result["delta_m_percent"],
            "meets_target": result["cost_ratio"] <= TARGETS["multitask_cost_ratio_at_most"],
            "steps": result["steps"], "rows": result["delta_m_rows"], **conditions()}


def cost_split_part(args: argparse.Namespace, data: Path, previous: dict[str, Any]) -> dict[str, Any]:
    import step_split

    size = args.split_size
    root = data / f"demo{size}"
    print(f"== cost split {size} px", flush=True)
    return {**step_split.split(root, size=size, batch=args.split_batch, steps=args.split_steps,
                               smoke=args.smoke, overrides=args.split_overrides), **conditions()}


# ---------------------------------------------------------------------------------------------


def _budgets(items: list[str]) -> dict[int, float]:
    out = {}
    for item in items:
        size, _, seconds = item.partition("=")
        out[int(size)] = float(seconds)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS[:4]), help=f"some of {', '.join(PARTS)}")
    ap.add_argument("--sizes", default="128,512")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--budget", action="append", default=[], metavar="SIZE=SECONDS",
                    help="training seconds per model per seed at SIZE (default 128=240, 512=300)")
    ap.add_argument("--slice-s", type=float, default=20.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="densepipe overrides for the semantic part")
    ap.add_argument("--num-train", type=int, default=320)
    ap.add_argument("--num-val", type=int, default=64)
    ap.add_argument("--ablation-budget-s", type=float, default=120.0)
    ap.add_argument("--variants", type=lambda v: v.split(","), default=None,
                    help=f"ablation variants to run (default all): {', '.join(ABLATION_VARIANTS)}")
    ap.add_argument("--instance-steps", type=int, default=150, help="steps per model at 128 px")
    ap.add_argument("--instance-steps-large", type=int, default=8, help="steps per model above 128 px")
    ap.add_argument("--multitask-steps", type=int, default=300)
    ap.add_argument("--split-size", type=int, default=512)
    ap.add_argument("--split-batch", type=int, default=4)
    ap.add_argument("--split-steps", type=int, default=4)
    ap.add_argument("--split-set", dest="split_overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="overrides of params.yaml for the cost_split part")
    ap.add_argument("--data", type=Path, default=None, help="keep rendered data here (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true",
                    help="seconds: 64 px, tiny budgets, nothing written by default")
    args = ap.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        ap.error(f"--parts: unknown {', '.join(unknown)}; expected some of {', '.join(PARTS)}")
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    unknown = sorted(set(args.variants or []) - set(ABLATION_VARIANTS))
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)}; expected some of {', '.join(ABLATION_VARIANTS)}")
    args.budget = {128: 240.0, 512: 300.0, **_budgets(args.budget)}
    if args.smoke:
        args.sizes, args.seeds, args.num_train, args.num_val = [64], [0], 16, 4
        args.budget, args.slice_s, args.batch, args.ablation_budget_s = {64: 2.0}, 1.0, 4, 1.0
        args.instance_steps, args.multitask_steps = 2, 2
        args.split_size, args.split_batch, args.split_steps = 64, 2, 1
    out_path = args.out or (None if args.smoke else DEFAULT_OUT)

    report: dict[str, Any] = json.loads(out_path.read_text()) if out_path and out_path.exists() else {}
    report.update({"benchmark": "peers", "targets": TARGETS})
    command = "python benchmarks/peers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    parts = {"semantic": semantic_part, "instance": instance_part, "multitask": multitask_part,
             "cost_split": cost_split_part, "ablation": ablation_part}
    with tempfile.TemporaryDirectory(prefix="densepipe-peers-") as tmp:
        data = args.data or Path(tmp)
        for name in args.parts:
            t0 = time.perf_counter()
            report[name] = {**parts[name](args, data, report.get(name) or {}), "command": command,
                            "part_seconds": round(time.perf_counter() - t0, 1)}
            if out_path is not None:  # after each part: a later part's failure loses nothing
                atomic_write_json(out_path, report)
    print(json.dumps({k: report[k].get("meets_target") for k in args.parts}))
    return report


if __name__ == "__main__":
    main()
