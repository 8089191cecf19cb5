"""Training-engine speed: DDP scaling on CPU, mixed precision on a GPU.

``--mode ddp`` (CPU): ``densepipe train`` on the synthetic dataset, one process against two
gloo processes under torchrun, same global batch and steps. The scaling ratio is images/s of
two processes over one process with one thread each (each process gets one core); one process
using every core is reported too, as what a user without torchrun gets.

``--mode precision`` (CUDA): the all-task model at 512x512, fp32 against bf16 + channels_last
(+ ``torch.compile`` of the backbone): images/s, peak memory, and model FLOP utilisation =
(FLOPs of one training step, counted by ``torch.utils.flop_counter``) x steps/s over the GPU's
dense bf16 peak.

    python benchmarks/engine_speed.py --mode ddp [--steps 40]
    python benchmarks/engine_speed.py --mode precision [--steps 30] [--batch 8] [--smoke]
Results: benchmarks/results/engine_<mode>.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_model  # noqa: E402

ALL_TASKS = ["semantic", "instance", "keypoints", "panoptic", "depth", "normals", "colorization"]
# dense bf16 tensor-core peaks (FLOP/s), from the vendors' data sheets (no sparsity)
BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def _params(data: Path, out: Path, **train: object) -> dict:
    with open(ROOT / "params.yaml") as f:
        params = yaml.safe_load(f)
    params["data"]["root"] = str(data)
    params["train"].update({"out_dir": str(out), "progress": False, "eval_every": 0,
                            "checkpoint_every": 10**6, **train})
    params["tracking"]["enabled"] = False
    params["evaluate"]["num_visualizations"] = 0
    return params


def _render(root: Path, *, num_train: int, image_size: int) -> None:
    from pipeline.data.synthetic import write_synthetic_dataset

    if not (root / "meta.json").exists():
        write_synthetic_dataset(root, num_train=num_train, num_val=8, image_size=image_size, seed=0,
                                workers=min(os.cpu_count() or 1, 8))


def _train_images_per_s(cmd: list[str], params: dict, work: Path, env: dict[str, str]) -> float:
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, "train", "--params", str(path)], cwd=work, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    match = re.search(r"\(([\d.]+) img/s\)", proc.stdout)
    if match is None:
        raise SystemExit(f"no img/s in the output of {cmd}: {proc.stdout[-500:]}")
    print(f"{' '.join(cmd[-4:])}: {match.group(1)} img/s ({time.perf_counter() - t0:.0f} s)", flush=True)
    return float(match.group(1))


def ddp_scaling(steps: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="engine-ddp-"))
    data = work / "data"
    _render(data, num_train=200, image_size=128)
    cores = os.cpu_count() or 1
    base_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    single = [sys.executable, "-m", "pipeline.cli"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--standalone", "-m", "pipeline.cli"]
    results = {}
    for name, cmd, threads in (("1 process, 1 thread", single, 1),
                               ("2 processes (gloo), 1 thread each", torchrun, 1),
                               (f"1 process, {cores} threads", single, cores)):
        runs = []
        for i in range(2):  # twice each, keep the faster (machine noise)
            params = _params(data, work / f"out-{len(results)}-{i}", steps=steps,
                             **({"warmup_steps": 5}))
            env = {**base_env, "OMP_NUM_THREADS": str(threads)}
            runs.append(_train_images_per_s(cmd, params, work / ".", env))
        results[name] = {"images_per_s": max(runs), "runs": runs}
    two = results["2 processes (gloo), 1 thread each"]["images_per_s"]
    one = results["1 process, 1 thread"]["images_per_s"]
    return {
        "benchmark": "engine_ddp_scaling", "steps": steps, "global_batch": 8,
        "image_size": 128, "tasks": ALL_TASKS, "backbone": "mobilenet_v3_large FPN 64 (params.yaml)",
        "device": f"cpu: {cpu_model()} ({cores} cores)", "torch": torch.__version__,
        "results": results, "scaling_ratio_2_vs_1": two / one,
        "ideal_ratio": 2.0,
        "note": "images/s of the training loop as densepipe train prints it (global images over "
                "wall time from the first step, so it includes the first steps' warm-up)",
    }


def precision(steps: int, batch: int, size: int, *, smoke: bool = False) -> dict:
    """``smoke``: run the same code on the CPU in seconds (64 px, 2 steps) to check it works."""
    if not torch.cuda.is_available() and not smoke:
        raise SystemExit("--mode precision needs a CUDA GPU (it measures bf16 against fp32 there)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    from pipeline.config import config_from_dict
    from pipeline.engine.loaders import train_dataset, train_loader
    from pipeline.engine.precision import configure_backends, resolve_precision
    from pipeline.engine.trainer import TrainingModule, build_optimizer, train_step
    from pipeline.model import build_model

    name = torch.cuda.get_device_name() if cuda else f"cpu (smoke): {cpu_model()}"
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    work = Path(tempfile.mkdtemp(prefix="engine-prec-"))
    data = work / "data"
    _render(data, num_train=16 if smoke else 64, image_size=size)
    variants = {"fp32": ("fp32", False, False), "bf16 + channels_last": ("bf16", True, False),
                "bf16 + channels_last + compile": ("bf16", True, True)}
    if smoke:  # compiling takes minutes on a CPU
        variants.pop("bf16 + channels_last + compile")
    results = {}
    flops_per_step = None
    for label, (prec, cl, compile_) in variants.items():
        params = _params(data, work / "out", steps=steps, batch_size=batch, precision=prec,
                         channels_last=cl, compile=compile_)
        params["data"]["image_size"] = size
        params["data"]["num_workers"] = 0 if smoke else 4
        preset = "cpu" if smoke else "gpu"
        params["model"]["heads"]["instance"] = {"preset": preset}
        params["model"]["heads"]["keypoints"] = {"preset": preset, "share_detector": True}
        cfg = config_from_dict(params)
        configure_backends(device=device, tf32=True, deterministic=False)
        torch.manual_seed(0)
        ds = train_dataset(cfg)
        model = build_model(cfg, ds.card).to(device).use_channels_last(cl)
        if compile_:
            model.backbone.compile()
        opt = build_optimizer(cfg, model)
        p = resolve_precision(prec, device)
        forward = TrainingModule(model)
        loader = iter(train_loader(cfg, ds, start_step=0))
        batches = [next(loader) for _ in range(4)]
        if flops_per_step is None:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter:
                train_step(model, batches[0], opt, forward=forward, precision=p)
            flops_per_step = counter.get_total_flops()
        for i in range(1 if smoke else 5):  # warm-up (and compilation)
            train_step(model, batches[i % 4], opt, forward=forward, precision=p)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for i in range(steps):
            train_step(model, batches[i % 4], opt, forward=forward, precision=p)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        achieved = flops_per_step * steps / seconds
        results[label] = {"images_per_s": steps * batch / seconds,
                          "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                          "achieved_tflops": achieved / 1e12,
                          "mfu_vs_bf16_peak": achieved / peak if peak else None}
        print(label, json.dumps(results[label]), flush=True)
        del model, opt
        if cuda:
            torch.cuda.empty_cache()
    return {"benchmark": "engine_precision", "device": name, "torch": torch.__version__,
            "image_size": size, "batch": batch, "steps": steps, "tasks": ALL_TASKS,
            "flops_per_train_step": flops_per_step, "bf16_peak_flops": peak, "results": results,
            "speedup_bf16_cl_vs_fp32": results["bf16 + channels_last"]["images_per_s"]
            / results["fp32"]["images_per_s"],
            "note": "batches held on the host and reused (data loading excluded); FLOPs counted "
                    "once in fp32 (the same operations in every variant)"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["ddp", "precision"], required=True)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true",
                    help="precision mode on the CPU in seconds (checks the script, measures nothing)")
    args = ap.parse_args()
    if args.mode == "ddp":
        report = ddp_scaling(args.steps or 40)
    else:
        if args.smoke:
            report = precision(args.steps or 2, 2, 64, smoke=True)
            args.out = args.out or str(Path(tempfile.mkdtemp()) / "smoke.json")
        else:
            report = precision(args.steps or 30, args.batch, args.size)
    report["python"] = platform.python_version()
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"engine_{args.mode}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
