"""Regenerate docs/benchmarks.md from benchmarks/results/*.json: no number is copied by hand.

    .venv/bin/python docs/gen_benchmarks.py           # writes docs/benchmarks.md
    .venv/bin/python docs/gen_benchmarks.py OUT.md    # writes OUT.md (tests/test_docs.py compares)

The page starts with the demo runs side by side (every file whose ``benchmark`` is ``demo_run``:
its overrides, time and headline metrics), then one section per results file: the benchmark, the
machine it ran on and the command as the file records them, its prose fields, and every value in
tables (a mapping of mappings becomes one table, a list of records another). A benchmark writes
its JSON (``make bench``, ``benchmarks/*.py``); rerun this script after it, ``make test`` fails
while the page is stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
OUT = REPO / "docs" / "benchmarks.md"
sys.path.insert(0, str(REPO))

from pipeline.config import flatten  # noqa: E402  (nested dicts to dotted keys)
from pipeline.io import atomic_write_text  # noqa: E402

PROSE = ("what", "how", "note", "settings", "statistic", "data", "images")
"""Top-level string fields rendered as paragraphs rather than table cells."""
MACHINE = ("device", "machine")
COMMAND = ("command",)
HEADLINE = [
    ("mIoU", "semantic/mIoU"), ("segm AP", "instance/segm_AP"), ("bbox AP", "instance/bbox_AP"),
    ("keypoint AP", "keypoints/AP"), ("PQ", "panoptic/PQ"), ("PQ things", "panoptic/PQ_th"),
    ("PQ stuff", "panoptic/PQ_st"), ("depth delta1", "depth/delta1"),
    ("depth abs_rel", "depth/abs_rel"), ("depth rmse", "depth/rmse"),
    ("normals mean angle", "normals/mean_angle"), ("normals median angle", "normals/median_angle"),
    ("colorization PSNR", "colorization/psnr"), ("gray PSNR", "colorization/psnr_gray"),
    ("colorization AUC", "colorization/auc"),
]
"""The demo table's metric columns: (heading, key in a demo_run file's ``metrics``)."""


def number(v: Any) -> str:
    """A value as shown: floats to 4 decimals (3 significant digits when smaller than 0.001)."""
    if isinstance(v, bool) or v is None:
        return str(v).lower() if isinstance(v, bool) else "null"
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.3g}"
        text = f"{v:.4f}".rstrip("0").rstrip(".")
        return "0" if text in ("-0", "") else text
    return str(v)


def cell(v: Any) -> str:
    if isinstance(v, list) and all(not isinstance(x, dict | list) for x in v):
        text = ", ".join(number(x) for x in v) if v else "[]"
    elif isinstance(v, dict | list):
        text = json.dumps(v, separators=(", ", ": "), default=str)
    else:
        text = number(v)
    return " ".join(text.split()).replace("|", "\\|")


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def record_table(first: str, records: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """One row per record (flattened), columns in order of first appearance."""
    flat = [(name, flatten(r)) for name, r in records]
    columns: list[str] = []
    for _, r in flat:
        columns += [c for c in r if c not in columns]
    return table([first, *[f"`{c}`" for c in columns]],
                 [[name, *[r.get(c, "") for c in columns]] for name, r in flat])


def is_table_of_records(value: Any) -> bool:
    if isinstance(value, list):
        return len(value) > 0 and all(isinstance(x, dict) for x in value)
    return (isinstance(value, dict) and len(value) >= 2
            and all(isinstance(x, dict) for x in value.values()))


def machine_text(data: dict[str, Any]) -> str:
    parts = []
    for key in MACHINE:
        value = data.get(key)
        if isinstance(value, dict):
            parts.append(", ".join(f"{k} {number(v)}" for k, v in value.items()))
        elif value is not None:
            parts.append(str(value))
    return "; ".join(parts) or "not recorded"


def shell_line(command: str) -> str:
    """A results file's command as a line a shell runs: a trailing ``(note)`` becomes a comment."""
    text = command.strip()
    if text.endswith(")") and " (" in text:
        head, _, note = text.rpartition(" (")
        if head.count("(") == head.count(")"):
            return f"{head}  # {note[:-1]}"
    return text


def section(path: Path, data: dict[str, Any]) -> list[str]:
    out = [f"## {path.stem}", ""]
    out.append(f"`benchmarks/results/{path.name}`: benchmark `{data.get('benchmark', path.stem)}`, "
               f"machine: {machine_text(data)}.")
    out.append("")
    for key in COMMAND:
        if isinstance(data.get(key), str):
            out += ["```bash", shell_line(data[key]), "```", ""]
    for key in PROSE:
        if isinstance(data.get(key), str):
            out += [f"**{key}:** " + " ".join(data[key].split()), ""]
    skip = {"benchmark", *MACHINE, *COMMAND, *[k for k in PROSE if isinstance(data.get(k), str)]}
    scalars: dict[str, Any] = {}
    tables: list[tuple[str, Any]] = []
    for key, value in data.items():
        if key in skip:
            continue
        if is_table_of_records(value):
            tables.append((key, value))
        elif isinstance(value, dict) and value:
            scalars.update(flatten(value, f"{key}."))
        else:
            scalars[key] = value
    if path.stem in SUMMARIES:
        out += [f"### {path.stem} summary", "", *SUMMARIES[path.stem](data), ""]
    if scalars:
        out += table(["key", "value"], [[f"`{k}`", v] for k, v in scalars.items()])
        out.append("")
    for key, value in tables:
        out += [f"`{key}`:", ""]
        if isinstance(value, dict):
            out += record_table("", [(f"`{k}`", v) for k, v in value.items()])
        else:
            out += record_table("#", [(str(i), v) for i, v in enumerate(value)])
        out.append("")
    return out


def last_logged_step(d: dict[str, Any]) -> Any:
    """The step of a run's last training-log line (``train_log_tail``), else ``""``."""
    tail = d.get("train_log_tail") or []
    first = tail[-1].split(",")[0] if tail else ""
    return int(first) if first.isdigit() else ""


def overrides_text(overrides: list[str] | None) -> str:
    return " ".join(f"`{o}`" for o in overrides or []) or "(the defaults)"


def demo_table(files: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    runs = [(p, d) for p, d in files if d.get("benchmark") == "demo_run"]
    header = ["file", "overrides", "steps", "seconds", "training s", *[h for h, _ in HEADLINE],
              "machine"]
    rows = []
    for path, d in runs:
        metrics = d.get("metrics", {})
        rows.append([f"[{path.stem}](#{path.stem})", overrides_text(d.get("overrides")),
                     last_logged_step(d), d.get("seconds", ""), d.get("train_seconds", ""),
                     *[metrics.get(k, "") for _, k in HEADLINE], machine_text(d)])
    return table(header, rows)


def multitask_table(files: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    """Every ``multitask`` result side by side: cost ratio, Delta_m and each task's metric."""
    runs = [(p, d) for p, d in files if d.get("benchmark") == "multitask"]
    metrics: list[str] = []
    for _, d in runs:
        metrics += [r["metric"] for r in d.get("delta_m_rows", []) if r["metric"] not in metrics]
    header = ["file", "overrides", "steps", "multi-task train s", "single-task train s (sum)",
              "cost ratio", "Delta_m %", *[f"{m}: multi (single, %)" for m in metrics], "machine"]
    rows = []
    for path, d in runs:
        by_metric = {r["metric"]: r for r in d.get("delta_m_rows", [])}
        multi = d.get("multi") if isinstance(d.get("multi"), dict) else {}
        cells = []
        for m in metrics:
            r = by_metric.get(m)
            cells.append(f"{number(r['multi'])} ({number(r['single'])}, "
                         f"{number(r['relative_percent'])})" if r else "")
        overrides = [*(d.get("overrides") or []), *(d.get("multi_overrides") or [])]
        rows.append([f"[{path.stem}](#{path.stem})", overrides_text(overrides), d.get("steps", ""),
                     multi.get("train_seconds", ""), d.get("single_total_train_seconds", ""),
                     d.get("cost_ratio", ""), d.get("delta_m_percent", ""), *cells,
                     machine_text(d)])
    return table(header, rows)


def decoder_summary(data: dict[str, Any]) -> list[str]:
    """decoder_compare's rows as docs/decoders.md discusses them (millions, GFLOPs, img/s)."""
    rows = []
    for r in data.get("rows", []):
        params = " / ".join(f"{r[k] / 1e6:.2f}" for k in ("params_total", "params_used",
                                                            "params_decoder"))
        gflops = f"{r['gflops_total']:.2f} / {r['gflops_decoder']:.2f}"
        rows.append([f"`{r['decoder']}`", f"{r['backbone']} ({r['output_stride']})", params,
                     gflops, f"{r['train_images_per_s']:.1f}", r["steps"], r["train_seconds"],
                     f"{r['mIoU']:.3f}"])
    return table(["decoder", "backbone (output stride)", "params total / used / decoder (M)",
                  "GFLOPs total / decoder", "train img/s", "steps", "train s", "mIoU"], rows)


def predict_summary(data: dict[str, Any]) -> list[str]:
    """predict_speed's images/s per batch size (best round in brackets), one row per device."""
    def pair(entry: dict[str, Any] | None) -> str:
        if not entry:
            return ""
        return f"{number(entry['images_per_s'])} ({number(entry['best_images_per_s'])})"
    rows = []
    for device, res in data.get("results", {}).items():
        for b in data.get("batch_sizes", []):
            engine = res.get(f"engine_b{b}", {})
            rows.append([device, b, pair(engine), pair(engine.get("model_predict")),
                         pair(engine.get("forward_only")), pair(res.get(f"dense_eager_b{b}")),
                         pair(res.get(f"dense_onnx_b{b}")),
                         res.get(f"dense_onnx_over_eager_b{b}", "")])
    return table(["device", "batch", "predict, end to end", "model.predict", "its forward alone",
                  "4 dense tasks, eager", "4 dense tasks, onnxruntime", "onnxruntime / eager"],
                 rows)


def conditions_text(part: dict[str, Any]) -> str:
    """A part's machine, threads and load when it ended."""
    load = part.get("load_average_1min")
    text = f"{part.get('device', 'not recorded')}, {part.get('threads', '?')} threads, load {number(load)}"
    return f"{text}; {part['note']}" if part.get("note") else text


def peers_table(files: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    """Every ratio of ``peers.json`` (densepipe over the peer; the multi-task cost ratio is
    multi-task time over the single-task models' sum) with its target and run conditions, then
    ``gpu_peers.json``'s, or a line saying GPU numbers are unmeasured."""
    data = dict(files).get(RESULTS / "peers.json") or {}
    targets = data.get("targets", {})
    rows: list[list[Any]] = []
    semantic = data.get("semantic") or {}
    for key, run in (semantic.get("runs") or {}).items():
        for what, ratio, target in (("mIoU at equal time", "miou_ratio", "semantic_miou_ratio_at_least"),
                                    ("images/s", "speed_ratio", "semantic_speed_ratio_at_least")):
            metric = "mIoU" if ratio == "miou_ratio" else "images_per_s"
            rows.append([f"semantic vs smp FPN: {what}", key, run["densepipe"][metric], run["smp"][metric],
                         run[ratio], f">= {number(targets.get(target))}",
                         conditions_text(run if "device" in run else semantic)])
    instance = data.get("instance") or {}
    for key, run in (instance.get("runs") or {}).items():
        rates = run["images_per_s"]
        rows.append(["instance vs torchvision Mask R-CNN: images/s", key, rates.get("plugin_sem_inst"),
                     rates.get("torchvision_sem_inst"), run["speed_ratio"],
                     f">= {number(targets.get('instance_speed_ratio_at_least'))}",
                     conditions_text(run if "device" in run else instance)])
        for metric, ratio in (run.get("ap_ratio") or {}).items():
            target = f">= {number(targets.get('instance_ap_ratio_at_least'))}"
            rows.append([f"instance vs torchvision Mask R-CNN: {metric} at {run['steps']} steps", key,
                         run["ap"]["densepipe"][metric], run["ap"]["torchvision"][metric], ratio,
                         target, conditions_text(run if "device" in run else instance)])
    seeded = [k for k, r in (instance.get("runs") or {}).items() if "ap_ratio" in r]
    for metric, ratio in (instance.get("ap_ratio_over_seeds") or {}).items():
        rows.append([f"instance vs torchvision Mask R-CNN: {metric}, summed over the seeds",
                     ", ".join(seeded), "", "", ratio,
                     f">= {number(targets.get('instance_ap_ratio_at_least'))}", conditions_text(instance)])
    multitask = data.get("multitask") or {}
    if multitask:
        rows.append(["4 dense tasks, one model vs four: training time", f"{multitask['steps']} steps",
                     "", "", multitask["cost_ratio"],
                     f"<= {number(targets.get('multitask_cost_ratio_at_most'))}", conditions_text(multitask)])
    out = table(["comparison", "run", "densepipe", "peer", "ratio", "target", "conditions"], rows)
    ablation = data.get("ablation") or {}
    for key, variants in (ablation.get("runs") or {}).items():
        where = (ablation.get("run_conditions") or {}).get(key, ablation)
        budget = where.get("budget_s", ablation.get("budget_s"))
        out += ["", f"Ablation of the semantic model ({key}, {number(budget)} s each, "
                f"one interleaved run; `smp` is the peer; {conditions_text(where)}):", "",
                *table(["variant", "overrides", "steps", "images/s", "mIoU"],
                       [[name, " ".join(f"`{o}`" for o in v.get("overrides", [])), v["steps"],
                         v["images_per_s"], v["mIoU"]] for name, v in variants.items()])]
    gpu = dict(files).get(RESULTS / "gpu_peers.json")
    if gpu:
        out += ["", f"GPU ({gpu['device']}, {gpu['precision']}, {gpu['size']} px, batch {gpu['batch']}):", "",
                *table(["model", "images/s", "peak memory MiB", "MFU"],
                       [[r["model"], r["images_per_s"], r["peak_memory_mib"], r["mfu"]]
                        for r in gpu.get("results", [])])]
    else:
        out += ["", "GPU numbers: unmeasured (`make bench-gpu` has not run on a GPU yet; "
                "`benchmarks/results/gpu_peers.json` is written when it does)."]
    return out


SUMMARIES = {"decoder_compare": decoder_summary, "predict_speed": predict_summary}
"""Results files that also get a compact table (``## <stem> summary``) that pages link to."""


def render() -> str:
    files = [(p, json.loads(p.read_text())) for p in sorted(RESULTS.glob("*.json"))]
    out = [
        "# Benchmarks",
        "",
        "<!-- Generated by docs/gen_benchmarks.py from benchmarks/results/*.json: do not edit by "
        "hand. -->",
        "",
        "Every number on this page is read from a results file in `benchmarks/results/`, written "
        "by the benchmark scripts in `benchmarks/` (`make bench` runs the speed benchmarks). Each "
        "file records the machine it ran on: compare numbers measured on the same machine only. "
        "What the demo settings mean and how they were chosen: [demo results](results.md).",
        "",
        "## Against the peers",
        "",
        "`benchmarks/peers.py` (`make bench-peers`): densepipe side by side with what users would "
        "pick instead, in one run on one machine, as ratios (densepipe / peer; for the multi-task "
        "row, the one model's training time over the four single-task models' sum). Why a ratio "
        "misses its target: [results](results.md#against-the-peers).",
        "",
        *peers_table(files),
        "",
        "## Demo runs",
        "",
        "Every `benchmarks/demo_run.py` result (the whole `densepipe run` pipeline, as `make demo` "
        "runs it, with the overrides shown): wall time, training time and the headline metrics "
        "(empty where the run did not train that task).",
        "",
        *demo_table(files),
        "",
        "## Multi-task runs",
        "",
        "Every `benchmarks/multitask.py` result: the multi-task model against one single-task "
        "model per task, trained for the same steps; cost ratio = multi-task training time / the "
        "single-task ones' sum, Delta_m = the mean relative difference to the single-task models "
        "(positive: the multi-task model is better).",
        "",
        *multitask_table(files),
        "",
    ]
    for path, data in files:
        out += section(path, data)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str]) -> int:
    target = Path(argv[1]) if len(argv) > 1 else OUT
    atomic_write_text(target, render())  # a failed render leaves the page as it was
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
