"""Regenerate docs/bad-inputs.md: every bad input densepipe refuses, run for real, with its message.

    .venv/bin/python docs/bad_inputs.py          # about 3 minutes on 2 cores; no network

Each case runs the real `densepipe` command in a scratch folder and records the exit code and what
it printed on stderr (temporary paths shortened to `<tmp>`). A case whose command does not exit
with code 2 and exactly one `error:` line is reported and fails the script, so the catalogue never
shows a message the product no longer gives. The tests pin each message; this page collects them.
"""

from __future__ import annotations

import http.server
import os
import pickle
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "bad-inputs.md"
TINY = ["data.synthetic.num_train=4", "data.synthetic.num_val=2", "data.synthetic.image_size=32",
        "data.image_size=32", "model.tasks=[semantic]", "train.steps=1", "train.batch_size=2",
        "train.eval_every=0", "train.progress=false", "evaluate.num_visualizations=0",
        "tracking.enabled=false", "data.num_workers=0", "train.device=cpu"]


@dataclass
class Case:
    section: str
    what: str
    args: list[str]
    setup: Callable[[Path], None] | None = None
    tiny: bool = True
    """Add the tiny-run overrides (a fast 32 px semantic model, no tracking)."""


class Payload:
    """Unpickling this would run code: what a crafted file would do."""

    def __reduce__(self):  # noqa: D105
        return (os.system, ("echo pwned",))


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def _user_folder(w: Path) -> None:
    _write(w / "mine" / "notes.txt", "precious")


def _coco_folder(w: Path) -> None:
    _write(w / "coco" / "annotations" / "instances_train2017.json", "{}")


def _git_checkout(w: Path) -> None:
    (w / "checkout" / ".git").mkdir(parents=True)


def _broken_folder(w: Path) -> None:
    from pipeline.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(w / "ds", num_train=3, num_val=1, image_size=32, seed=0)
    (w / "ds" / "images" / "train" / "000001.png").unlink()
    png = w / "ds" / "images" / "train" / "000002.png"
    png.write_bytes(png.read_bytes()[:60])
    Image.new("RGB", (40, 32)).save(w / "ds" / "images" / "train" / "000003.png")


def _bad_label(w: Path) -> None:
    from pipeline.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(w / "ds", num_train=2, num_val=1, image_size=32, seed=0)
    Image.new("L", (16, 16)).save(w / "ds" / "semantic" / "train" / "000001.png")


def _trained(w: Path) -> None:
    for stage in ("prepare", "train"):
        subprocess.run([sys.executable, "-m", "pipeline.cli", stage, *_sets(TINY)], cwd=w, check=True,
                       capture_output=True)
    _write(w / "notimage.png", "not an image")
    for path in (w / "good.png", w / "a" / "x.png", w / "b" / "x.png"):
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (32, 32)).save(path)
    Image.fromarray(np.full((8, 8), 70000, np.int32)).save(w / "wide.tif")


def _pickles(w: Path) -> None:
    _write(w / "payload.pt", pickle.dumps(Payload(), protocol=4))
    import torch

    torch.save(torch.nn.Linear(2, 2), w / "module.pt")
    _write(w / "half.pt", (w / "module.pt").read_bytes()[:300])


def _bad_yaml(w: Path) -> None:
    _write(w / "bad.yaml", "train:\n  lr: [0.1\n")


def _semseg(w: Path) -> None:
    for folder, names in (("gt", ["a.png", "b.png"]), ("pred", ["a.png"])):
        for name in names:
            (w / folder).mkdir(exist_ok=True)
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(w / folder / name)


def _not_mlflow_server() -> str:
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def cases(not_mlflow: str) -> list[Case]:
    c, d, m, p, t, o = ("Configuration", "Datasets and `prepare`", "Checkpoints and models",
                        "`predict`", "Tracking (MLflow)", "Evaluators and schedules")
    return [
        Case(c, "unknown key", ["config", "--set", "train.lrr=1"], tiny=False),
        Case(c, "wrong type from `--set`", ["config", "--set", "train.steps=abc"], tiny=False),
        Case(c, "`--set` without a value", ["config", "--set", "train.lr"], tiny=False),
        Case(c, "params file not found", ["config", "--params", "nope.yaml"], tiny=False),
        Case(c, "params file not YAML", ["config", "--params", "bad.yaml"], _bad_yaml, tiny=False),
        Case(c, "unknown task", ["train", "--set", "model.tasks=[semantic,sky]"]),
        Case(c, "unknown backbone", ["train", "--set", "model.backbone=vgg"]),
        Case(c, "unknown dataset format", ["config", "--set", "data.source=kitty"], tiny=False),
        Case(c, "an option the dataset format does not have",
             ["config", "--set", "data.source=cityscapes", "--set", "data.options={depht: true}"],
             tiny=False),
        Case(d, "a Cityscapes folder without its images",
             ["prepare", "--set", "data.source=cityscapes", "--set", "data.root=cs"],
             lambda w: (w / "cs" / "gtFine").mkdir(parents=True)),
        Case(d, "synthetic render into a folder with the user's files",
             ["prepare", "--set", "data.root=mine"], _user_folder),
        Case(d, "a COCO folder given without `data.source=folder`",
             ["prepare", "--set", "data.root=coco"], _coco_folder),
        Case(d, "the working folder", ["prepare", "--set", "data.root=."]),
        Case(d, "a git checkout", ["prepare", "--set", "data.root=checkout"], _git_checkout),
        Case(d, "a user's folder with a missing, a truncated and a resized image",
             ["prepare", "--set", "data.source=folder", "--set", "data.root=ds"], _broken_folder),
        Case(d, "a label PNG of the wrong size",
             ["prepare", "--set", "data.source=folder", "--set", "data.root=ds"], _bad_label),
        Case(d, "a folder that is no dataset", ["train", "--set", "data.root=."]),
        Case(m, "checkpoint not found", ["evaluate", "--checkpoint", "nope.pt"], _trained),
        Case(m, "a pickled object as checkpoint", ["predict", "good.png", "--checkpoint", "payload.pt"],
             lambda w: (_trained(w), _pickles(w))),
        Case(m, "a saved nn.Module as checkpoint", ["predict", "good.png", "--checkpoint", "module.pt"],
             lambda w: (_trained(w), _pickles(w))),
        Case(m, "a truncated checkpoint", ["predict", "good.png", "--checkpoint", "half.pt"],
             lambda w: (_trained(w), _pickles(w))),
        Case(m, "a checkpoint of another model config",
             ["evaluate", "--set", "model.heads={semantic: {conv_dims: 16}}"], _trained),
        Case(m, "`--model` and `--checkpoint` both given",
             ["evaluate", "--model", "models:/densepipe/1", "--checkpoint", "runs/train/best.pt"],
             _trained),
        Case(p, "an image that does not exist",
             ["predict", "good.png", "nope.png", "--checkpoint", "runs/train/best.pt"], _trained),
        Case(p, "a file that is not an image (nothing is written, not even for good.png)",
             ["predict", "good.png", "notimage.png", "--checkpoint", "runs/train/best.pt"], _trained),
        Case(p, "two images with the same file stem",
             ["predict", "a/x.png", "b/x.png", "--checkpoint", "runs/train/best.pt"], _trained),
        Case(p, "a 32-bit integer image with values past 16 bits",
             ["predict", "wide.tif", "--checkpoint", "runs/train/best.pt"], _trained),
        Case(p, "a path with rich-markup brackets (printed literally)",
             ["predict", "a[/x]my[red]ck.png", "--checkpoint", "c.pt"]),
        Case(t, "nothing listens at tracking.uri",
             ["train", "--set", "tracking.enabled=true", "--set", "tracking.uri=http://127.0.0.1:9"]),
        Case(t, "a server that is not MLflow",
             ["train", "--set", "tracking.enabled=true", "--set", f"tracking.uri={not_mlflow}"]),
        Case(t, "a SQLite store in a missing folder",
             ["train", "--set", "tracking.enabled=true", "--set", "tracking.uri=sqlite:///nope/mlflow.db"]),
        Case(o, "semseg-eval: a prediction missing",
             ["semseg-eval", "--gt-dir", "gt", "--pred-dir", "pred", "--num-classes", "3"], _semseg,
             tiny=False),
        Case(o, "coco-eval: sigmas not numbers",
             ["coco-eval", "--gt", "g.json", "--pred", "p.json", "--type", "keypoints", "--sigmas", "a,b"],
             tiny=False),
        Case(o, "serve: a cron with 4 fields", ["serve", "--cron", "0 3 * *"], tiny=False),
        Case(o, "serve: both schedules", ["serve", "--cron", "0 3 * * *", "--interval", "60"], tiny=False),
    ]


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def run(case: Case, work: Path) -> tuple[int, list[str]]:
    work.mkdir(parents=True)
    if case.setup is not None:
        case.setup(work)
    args = list(case.args)  # run in `work`, which has no params.yaml: the code defaults
    if case.tiny:
        args[1:1] = _sets(TINY)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          cwd=work, timeout=300)
    lines = [line.replace(str(work), "<tmp>") for line in proc.stderr.splitlines() if line.strip()]
    return proc.returncode, lines


def main() -> int:
    not_mlflow = _not_mlflow_server()
    rows: dict[str, list[str]] = {}
    failed = 0
    with tempfile.TemporaryDirectory(prefix="densepipe-bad-inputs-") as tmp:
        for i, case in enumerate(cases(not_mlflow)):
            code, lines = run(case, Path(tmp) / f"case{i}")
            ok = code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
            if not ok:
                failed += 1
                print(f"FAILED: {case.what}: exit {code}: {lines}", file=sys.stderr)
            shown = " ".join(case.args).replace(not_mlflow, "http://127.0.0.1:PORT")
            message = (lines[0] if ok else " / ".join(lines)).replace(not_mlflow, "http://127.0.0.1:PORT")
            cell = message.replace("|", "\\|")
            rows.setdefault(case.section, []).append(f"| {case.what} | `densepipe {shown}` | `{cell}` |")
            print(f"{case.what}: {message}")
    text = [
        "# Bad inputs and their messages",
        "",
        "Every bad input densepipe refuses gives one line on stderr, `error: <what>: <problem>; <what to",
        "do>`, and exit code 2, before anything is written or trained. This page is generated by",
        "`docs/bad_inputs.py`, which runs each case with the real `densepipe` command in a scratch folder",
        "(code defaults, a 32 px semantic model where a model is needed); `<tmp>` is that folder.",
        "",
        "Not errors, but said: a polygon with fewer than 3 points, fewer than 3 distinct points, an odd",
        "number of coordinates or zero area is dropped (detectron2's and pycocotools' rule) with one",
        "warning per dataset naming the count and the first example; images in the images folder that",
        "no JSON lists are counted in `prepare`'s summary (`unlisted_images`) with a warning naming a",
        "few. A registered model whose weights do not match the checksum the tracking store recorded,",
        "or that an older densepipe logged as a pickle, is refused with one line (tests:",
        "`tests/test_model_registry.py`); a second training into a `train.out_dir` that a live",
        "training holds is refused with one line naming its pid.",
        "",
    ]
    for section, lines in rows.items():
        text += [f"## {section}", "", "| case | command | message |", "|---|---|---|", *lines, ""]
    OUT.write_text("\n".join(text))
    print(f"wrote {OUT} ({sum(map(len, rows.values()))} cases, {failed} failed)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
