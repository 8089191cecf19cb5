"""Images/s of batch prediction on a folder of 512x512 images: the predict engine with every task,
and the four dense tasks in PyTorch eager vs the exported ONNX graph in onnxruntime.

``--num-images`` synthetic scenes (``pipeline.data.synthetic``, 512x512) are written as PNG into a
temporary folder. The model is params.yaml's (backbone, FPN, heads; all seven tasks), built with
random weights (speed only; note that a random detector's boxes and masks are not a trained one's,
so instance/keypoints/panoptic post-processing may cost more or less than after training). Timed,
in interleaved rounds (the order reversed every other round; the machine is shared), after
``--warmup`` untimed passes of each:

- ``engine``: ``pipeline.predict`` as ``densepipe predict`` runs it once the model is loaded
  (``expand_inputs``, ``image_ids``, ``scan_images`` reading every file, then ``predict_to_folder``
  reading them again, predicting all seven tasks, writing every task's files, staging and the
  manifest), ``vis=False``, ``num_workers=0``, batch 1 and 4, into a fresh output folder each time.
  Images/s end to end is N over the whole call; ``model.predict`` (forward and per-task
  post-processing, no files) and the forward alone (``model(batch)``) are timed inside it too.
- ``dense_eager``: ``DenseExportModule`` (normalisation, one backbone pass per view, the semantic,
  depth, normals and colorization heads and their outputs) of the same model, in eager, over the
  same images decoded once beforehand (float32 0..255), in batches of 1 and 4.
- ``dense_onnx``: that module exported with ``pipeline.export.export_onnx`` (at 512x512) and run by
  onnxruntime (CPUExecutionProvider) over the same float32 batches.

Torch and onnxruntime use ``--threads`` threads. Images/s = N / the median seconds of a pass over
the N images (the best pass is given too). With a GPU (``torch.cuda.is_available()``), the same
three are then timed on CUDA (engine with the model on the GPU; eager dense with the batch copied
to the GPU and the outputs back; onnxruntime's CUDAExecutionProvider when it is available), and the
device name is recorded.

    python benchmarks/predict_speed.py [--num-images 8] [--rounds 5] [--warmup 1] [--threads 2] \
        [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from machine import cpu_description  # noqa: E402  (benchmarks/machine.py)

from pipeline.config import load_config  # noqa: E402
from pipeline.data.reader import read_image  # noqa: E402
from pipeline.data.synthetic.render import render_scene  # noqa: E402
from pipeline.data.synthetic.spec import synthetic_card  # noqa: E402
from pipeline.export import DenseExportModule, export_onnx  # noqa: E402
from pipeline.io import atomic_write_png  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.predict import expand_inputs, image_ids, predict_to_folder, scan_images  # noqa: E402
from pipeline.registry import default_registry  # noqa: E402

DENSE = ("semantic", "depth", "normals", "colorization")
SIZE = 512
BATCHES = (1, 4)


class ForwardClock:
    """Wraps ``model.predict`` (an instance attribute, the class is untouched) to add up the
    seconds of the forward (``model(batch)``) and of the whole ``predict`` (forward and
    post-processing), synchronising CUDA around each when the model is on a GPU."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.original = model.predict
        self.forward_s = 0.0
        self.predict_s = 0.0
        self.cuda = next(model.parameters()).is_cuda
        model.predict = self._predict

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _predict(self, batch: Any, outputs: Any = None) -> Any:
        self._sync()
        t0 = time.perf_counter()
        outputs = self.model(batch)
        self._sync()
        t1 = time.perf_counter()
        predictions = self.original(batch, outputs)
        self._sync()
        self.forward_s += t1 - t0
        self.predict_s += time.perf_counter() - t0
        return predictions

    def reset(self) -> None:
        self.forward_s = self.predict_s = 0.0

    def remove(self) -> None:
        del self.model.predict


def render_folder(folder: Path, n: int) -> list[Path]:
    """``n`` synthetic 512x512 scenes (seeds 0..n-1) as PNG files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return [atomic_write_png(folder / f"scene_{i:03d}.png", render_scene(i, SIZE).image) for i in range(n)]


def engine_pass(model: Any, folder: Path, out: Path, *, batch: int, clock: ForwardClock,
                limit: int | None = None) -> dict[str, float]:
    """One ``densepipe predict``-like call over ``folder`` (the model already loaded): seconds end
    to end, of ``model.predict`` and of the forward; ``out`` is removed afterwards."""
    clock.reset()
    t0 = time.perf_counter()
    images = expand_inputs([folder], exclude=out)[:limit]
    ids = image_ids(images, None)
    sizes = scan_images(images, threads=1)
    predict_to_folder(model, images, sizes, out_dir=out, ids=ids, batch_size=batch, num_workers=0,
                      vis=False, eval_files=False, progress=False, source="random weights")
    total = time.perf_counter() - t0
    shutil.rmtree(out)
    return {"total": total, "predict": clock.predict_s, "forward": clock.forward_s}


def _chunks(images: torch.Tensor, batch: int) -> list[torch.Tensor]:
    return [images[k:k + batch].contiguous() for k in range(0, len(images), batch)]


def _stats(n: int, seconds: list[float]) -> dict[str, Any]:
    return {"images_per_s": round(n / statistics.median(seconds), 2),
            "best_images_per_s": round(n / min(seconds), 2),
            "seconds_per_pass": [round(s, 3) for s in seconds]}


def run_device(device: str, *, model: Any, module: DenseExportModule, onnx_path: Path, folder: Path,
               work: Path, decoded: torch.Tensor, rounds: int, warmup: int, threads: int
               ) -> dict[str, Any]:
    """The interleaved rounds on ``device`` (``cpu`` or ``cuda``); results per measurement."""
    import onnxruntime as ort

    n = len(decoded)
    model.to(device).eval()
    clock = ForwardClock(model)
    cuda = device == "cuda"
    provider = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
    session = None
    onnx_note = None
    if provider in ort.get_available_providers():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(onnx_path), options, providers=[provider])
        if provider not in session.get_providers():
            onnx_note = f"{provider} did not load (session providers: {session.get_providers()})"
            session = None
    else:
        onnx_note = f"{provider} not available in this onnxruntime ({ort.get_available_providers()})"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def eager(chunks: list[torch.Tensor]) -> None:
        for x in chunks:
            outs = module(x.to(device, non_blocking=False))
            [o.cpu() for o in outs]  # the outputs on the host, as onnxruntime gives them
        sync()

    def onnx(feeds: list[dict[str, Any]]) -> None:
        for f in feeds:
            session.run(None, f)  # type: ignore[union-attr]

    jobs: dict[str, Callable[[], Any]] = {}
    detail: dict[str, dict[str, list[float]]] = {}
    for b in BATCHES:
        chunks = _chunks(decoded, b)
        feeds = [{"image": x.numpy()} for x in chunks]
        jobs[f"engine_b{b}"] = (lambda b=b: engine_pass(model, folder, work / f"out_{device}_b{b}",
                                                        batch=b, clock=clock))
        jobs[f"dense_eager_b{b}"] = lambda c=chunks: eager(c)
        if session is not None:
            jobs[f"dense_onnx_b{b}"] = lambda f=feeds: onnx(f)
        detail[f"engine_b{b}"] = {"predict": [], "forward": []}

    with torch.no_grad():
        for _ in range(warmup):  # the engine on one image per batch size; the others on one batch
            for b in BATCHES:
                engine_pass(model, folder, work / "warmup", batch=b, clock=clock, limit=b)
                eager(_chunks(decoded[:b], b))
                if session is not None:
                    session.run(None, {"image": decoded[:b].numpy()})
        seconds: dict[str, list[float]] = {k: [] for k in jobs}
        order = list(jobs)
        for r in range(rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                sync()
                t0 = time.perf_counter()
                got = jobs[name]()
                sync()
                elapsed = time.perf_counter() - t0
                if name.startswith("engine"):
                    elapsed = got["total"]
                    detail[name]["predict"].append(got["predict"])
                    detail[name]["forward"].append(got["forward"])
                seconds[name].append(elapsed)
                print(f"[{device}] round {r + 1}/{rounds} {name}: {elapsed:.2f} s "
                      f"({n / elapsed:.2f} img/s)", flush=True)
    clock.remove()

    results: dict[str, Any] = {}
    for name, secs in seconds.items():
        entry = _stats(n, secs)
        if name in detail:
            entry["model_predict"] = _stats(n, detail[name]["predict"])
            entry["forward_only"] = _stats(n, detail[name]["forward"])
            rest = [t - p for t, p in zip(secs, detail[name]["predict"], strict=True)]
            entry["median_seconds_outside_model_predict"] = round(statistics.median(rest), 3)
        results[name] = entry
    for b in BATCHES:
        if f"dense_onnx_b{b}" in results:
            eager_s, onnx_s = seconds[f"dense_eager_b{b}"], seconds[f"dense_onnx_b{b}"]
            ratio = statistics.median(eager_s) / statistics.median(onnx_s)
            results[f"dense_onnx_over_eager_b{b}"] = round(ratio, 2)
    if onnx_note:
        results["onnxruntime_note"] = onnx_note
    results["onnxruntime_provider"] = provider if session is not None else None
    model.to("cpu")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "predict_speed.json")
    args = parser.parse_args()
    if args.num_images % max(BATCHES):
        parser.error(f"--num-images: a multiple of {max(BATCHES)}, so every batch is full")

    import onnx
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    run_start = time.perf_counter()
    cfg = load_config(REPO / "params.yaml", [])
    torch.manual_seed(0)
    model = build_model(cfg, synthetic_card(SIZE), default_registry()).eval()
    tasks = list(model.tasks)
    module = DenseExportModule(model, tasks=DENSE).eval()

    with tempfile.TemporaryDirectory(prefix="predict_speed.") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        files = render_folder(work / "images", args.num_images)
        render_s = time.perf_counter() - t0
        folder_mb = sum(f.stat().st_size for f in files) / 1e6
        decoded = torch.stack([torch.from_numpy(read_image(f).copy()).permute(2, 0, 1)
                               for f in files]).float()

        t0 = time.perf_counter()
        report = export_onnx(model, work / "dense.onnx", tasks=DENSE, image_size=SIZE)
        export_s = time.perf_counter() - t0
        print(f"rendered {len(files)} images in {render_s:.1f} s, exported in {export_s:.1f} s", flush=True)

        common = {"model": model, "module": module, "onnx_path": report.path, "folder": work / "images",
                  "work": work, "decoded": decoded, "rounds": args.rounds, "warmup": args.warmup,
                  "threads": args.threads}
        results = {"cpu": run_device("cpu", **common)}
        gpu = torch.cuda.is_available()
        if gpu:
            results["cuda"] = run_device("cuda", **common)

    result = {
        "benchmark": "predict_speed",
        "what": "images/s of batch prediction on a folder of 512x512 PNG images: the predict engine "
                "(all seven tasks, files read and written, vis=False) and the four dense tasks on the "
                "decoded images in PyTorch eager (DenseExportModule) vs the exported ONNX graph in "
                "onnxruntime",
        "command": "python benchmarks/predict_speed.py",
        "image_size": SIZE,
        "num_images": args.num_images,
        "images": f"synthetic scenes (seeds 0..{args.num_images - 1}) written as PNG, {folder_mb:.1f} MB",
        "batch_sizes": list(BATCHES),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "statistic": "images/s = images / median seconds of a pass over the folder, interleaved rounds "
                     "(best also given)",
        "measurements": {
            "engine_bB": "expand_inputs + image_ids + scan_images + predict_to_folder (num_workers 0, "
                         "vis=False, no eval files), model already loaded; model_predict = forward + "
                         "per-task post-processing; forward_only = model(batch)",
            "dense_eager_bB": "DenseExportModule(model, tasks=dense) in eager over the decoded float32 "
                              "images, outputs on the host",
            "dense_onnx_bB": "the exported graph in onnxruntime over the same float32 batches",
        },
        "model": {"backbone": cfg.model.backbone, "fpn_channels": cfg.model.fpn_channels,
                  "tasks": tasks, "dense_tasks": list(DENSE),
                  "heads": {t: cfg.model.heads.get(t, {}) for t in tasks},
                  "weights": "random (speed only; post-processing of the detection tasks depends on "
                             "what a random detector outputs)"},
        "export": {"seconds": round(export_s, 1), "opset": report.opset, "exporter": report.exporter,
                   "input_shape": report.inputs[0]["shape"]},
        "results": results,
        "machine": {"device": cpu_description(), "threads": args.threads, "python": platform.python_version(),
                    "torch": torch.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
                    "onnxruntime_providers": ort.get_available_providers(),
                    "cuda_available": gpu,
                    "gpu": torch.cuda.get_device_name(0) if gpu else None,
                    "load_average_1min": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
                    "run_seconds": round(time.perf_counter() - run_start, 1),
                    "note": "a 2-core machine shared with other developers' processes while measured"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
