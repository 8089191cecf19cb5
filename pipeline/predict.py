"""Batch prediction: image files, folders and glob patterns in; one documented folder layout out.

``run_predict`` is what ``stages.predict`` (and so ``densepipe predict``) runs:

1. ``expand_inputs``: files, folders (image files found recursively, sorted) and glob patterns
   (``*``, ``?``, ``**``; expanded here, so a quoted pattern works from cron or Prefect) become one
   de-duplicated list of ``InputImage``s, each named by its path relative to the folder given (or to
   the pattern's fixed leading folders; a file given by itself: its file name). Two inputs whose
   outputs would land on the same path are refused; a pattern or folder that yields no image is one
   error naming it.
2. Every image is read (in threads) before the model is loaded: a bad file fails the run at once.
3. ``ImageFiles`` + ``SizeBatches`` feed a ``DataLoader`` (``num_workers`` processes): a batch
   only ever holds images of one size, so images are predicted at their original resolution and
   a prediction does not depend on the batch it was in (padding to a common size would change the
   pixels near the padded border; see ``SizeBatches``).
4. Outputs go to a staging folder inside ``out_dir`` and are moved into place only when every image
   succeeded (all or nothing; a created ``out_dir`` is removed on failure). A file already in
   ``out_dir`` is replaced only when ``predict_manifest.json`` says an earlier run wrote it.

Layout of ``out_dir`` (``<name>`` = an input's relative path without its extension)::

    <task>/<name>_<task>.<ext>       each task's raw outputs (Task.save_prediction)
    vis/<task>/<name>.png            drawings (Task.visualize); vis=False skips them
    eval/                            evaluator-ready files (Task.write_dataset_predictions), with
                                     eval_files=True or coco_gt; replaced as a whole by each run
                                     that writes it
    predict_manifest.json            inputs, image ids, model, and every file predict wrote here
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from torch.utils.data import DataLoader, Dataset

from pipeline.data.reader import IMAGE_SUFFIXES, read_image
from pipeline.engine.loaders import SizeBatches, _worker_init_fn, worker_context
from pipeline.engine.trainer import resolve_device
from pipeline.errors import ConfigError, DataError, OutputError
from pipeline.io import atomic_write_json, atomic_write_png
from pipeline.task import PredictedImage, Task
from pipeline.trained_model import load_model_to_evaluate

log = logging.getLogger(__name__)

MANIFEST = "predict_manifest.json"
"""Written into ``out_dir`` by every run: what it predicted and every file predict wrote there."""
MANIFEST_FORMAT = 1
VIS_DIR = "vis"
EVAL_DIR = "eval"
RESERVED = (VIS_DIR, EVAL_DIR)
"""Top-level names of the layout that a task's own folder must not take."""
GLOB_CHARS = ("*", "?")


# -- inputs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputImage:
    """One image to predict: its file and its ``name``, the POSIX path relative to the folder it
    was found in (``sub/img.png``), which keys every output of it."""

    path: Path
    name: str

    @property
    def stem(self) -> str:
        """``name`` without its extension: ``sub/img``."""
        return str(PurePosixPath(self.name).with_suffix(""))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _walk(folder: Path, *, exclude: Path | None) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted by relative path; linked folders followed,
    each once), skipping hidden entries (``.name``) and the folder ``exclude`` (the output folder
    when it lies inside)."""
    found: list[Path] = []
    visited = {folder.resolve()}
    for root, dirs, files in os.walk(folder, followlinks=True):
        here = Path(root)
        keep = []
        for d in sorted(dirs):
            real = (here / d).resolve()
            if d.startswith(".") or real == exclude or real in visited:  # hidden, output, a loop
                continue
            visited.add(real)
            keep.append(d)
        dirs[:] = keep
        found += [here / f for f in files if not f.startswith(".") and _is_image(here / f)]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _glob_base(pattern: str) -> Path:
    """The leading folders of ``pattern`` that hold no wildcard (names are relative to them)."""
    parts = PurePosixPath(pattern.replace(os.sep, "/")).parts
    fixed = []
    for part in parts[:-1]:
        if any(c in part for c in GLOB_CHARS):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def expand_inputs(inputs: Sequence[str | os.PathLike[str]], *,
                  exclude: str | os.PathLike[str] | None = None) -> list[InputImage]:
    """Files, folders and glob patterns as one list of images, in the order given (a folder's and
    a pattern's images sorted by name), each file once.

    - a file: taken as is (whatever its extension; reading it checks it), named by its file name;
    - a folder: every image file under it (extensions ``IMAGE_SUFFIXES``, any case; hidden files
      and folders skipped; ``exclude`` skipped), named relative to the folder;
    - a pattern with ``*``, ``?`` or ``**`` (recursive) that is not an existing path: the image
      files it matches (folders it matches are walked), named relative to its leading folders
      without a wildcard. ``[`` is a literal character (file names with brackets just work).

    Raises ``DataError`` (one line naming the input): a missing file, a folder or a pattern with
    no image file, two different files with the same output name (``a/x.png`` and ``a/x.jpg``, or
    ``x.png`` in two folders given separately)."""
    skip = Path(exclude).resolve() if exclude is not None else None
    images: list[InputImage] = []
    seen: dict[Path, str] = {}
    owner: dict[str, Path] = {}

    def add(path: Path, name: str) -> None:
        real = path.resolve()
        if real in seen:  # the same file twice: predicted once, under its first name
            return
        key = str(PurePosixPath(name).with_suffix(""))
        if key in owner:
            raise DataError(path, f"its outputs would be named {key!r}, as those of {owner[key]}; "
                                  "give their common parent folder, or predict them in separate runs")
        seen[real] = name
        owner[key] = path
        images.append(InputImage(path, name))

    for given in inputs:
        text = os.fspath(given)
        path = Path(text)
        if path.is_dir():
            found = _walk(path, exclude=skip)
            if not found:
                raise DataError(path, f"no image files in this folder (looked recursively for "
                                      f"{', '.join(IMAGE_SUFFIXES)})")
            for f in found:
                add(f, f.relative_to(path).as_posix())
        elif path.exists() or path.is_symlink():
            add(path, path.name)
        elif any(c in text for c in GLOB_CHARS):
            base = _glob_base(text)
            matched = sorted(glob.glob(text.replace("[", "[[]"), recursive=True))
            files: list[tuple[Path, str]] = []
            for m in map(Path, matched):
                if m.is_dir():
                    files += [(f, f.relative_to(base).as_posix()) for f in _walk(m, exclude=skip)]
                elif _is_image(m) and not any(p.startswith(".") for p in m.relative_to(base).parts):
                    files.append((m, m.relative_to(base).as_posix()))
            if not files:
                raise DataError(text, f"the pattern matched no image files ({', '.join(IMAGE_SUFFIXES)})")
            for f, name in sorted(files, key=lambda fn: fn[1]):
                add(f, name)
        else:
            raise DataError(path, "image file not found")
    return images


def image_ids(images: Sequence[InputImage], coco_gt: str | os.PathLike[str] | None) -> list[int]:
    """COCO image id of each image: from ``coco_gt`` (any COCO JSON with ``images``: ``id`` and
    ``file_name``), matching ``file_name`` to the image's name, else to its file name when that is
    unique in the JSON; without ``coco_gt``, 1..N in input order.

    Raises ``DataError`` naming the JSON (unreadable, no ``images``) or the image it lacks."""
    if coco_gt is None:
        return list(range(1, len(images) + 1))
    gt = Path(coco_gt)
    try:
        obj = json.loads(gt.read_bytes())
    except FileNotFoundError:
        raise DataError(gt, "COCO ground-truth JSON not found (--coco-gt)") from None
    except (OSError, ValueError) as e:
        raise DataError(gt, f"not a readable JSON file ({e})".splitlines()[0]) from None
    entries = obj.get("images") if isinstance(obj, dict) else None
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and "id" in e and "file_name" in e for e in entries):
        raise DataError(gt, "not a COCO JSON: expected an 'images' list of objects with 'id' and "
                            "'file_name'")
    by_name = {str(e["file_name"]).replace("\\", "/"): int(e["id"]) for e in entries}
    by_base: dict[str, list[int]] = {}
    for name, iid in by_name.items():
        by_base.setdefault(PurePosixPath(name).name, []).append(iid)
    ids: list[int] = []
    used: dict[int, Path] = {}
    for img in images:
        iid = by_name.get(img.name)
        if iid is None:
            candidates = by_base.get(PurePosixPath(img.name).name, [])
            iid = candidates[0] if len(candidates) == 1 else None
        if iid is None:
            raise DataError(img.path, f"not in {gt}: no image with file_name {img.name!r} "
                                      f"({len(entries)} images there)")
        if iid in used:
            raise DataError(img.path, f"{gt} gives it image id {iid}, as {used[iid]}")
        used[iid] = img.path
        ids.append(iid)
    return ids


def scan_images(images: Sequence[InputImage], *, threads: int = 1) -> list[tuple[int, int]]:
    """Read every image fully (so a truncated or corrupt file fails now) in ``threads`` threads;
    returns each one's ``(height, width)``. Raises the ``DataError`` of the first bad file in input
    order."""

    def size(img: InputImage) -> tuple[int, int] | DataError:
        try:
            h, w = read_image(img.path).shape[:2]
            return int(h), int(w)
        except DataError as e:
            return e

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        sizes = list(pool.map(size, images))
    for s in sizes:
        if isinstance(s, DataError):
            raise s
    return sizes  # type: ignore[return-value]


# -- loading ------------------------------------------------------------------------------------
class ImageFiles(Dataset):
    """``files[i]`` decoded by ``read_image``: ``{"image": 3xHxW uint8, "index": i}``, or
    ``{"error": DataError, "index": i}`` (raised by the caller: a worker's exception would lose its
    one-line message)."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            rgb = read_image(self.files[index])
        except DataError as e:
            return {"error": e, "index": index}
        rgb = np.require(rgb, requirements=["C", "W"])  # torch wants a writable array
        return {"image": torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), "index": index}


def collate_images(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of ``ImageFiles`` samples (one image size): ``image`` Bx3xHxW uint8, ``index``;
    ``{"error": DataError}`` when a file could not be read (raised by the main process)."""
    for s in samples:
        if "error" in s:
            return {"error": s["error"]}
    return {"image": torch.stack([s["image"] for s in samples]), "index": [s["index"] for s in samples]}


def image_loader(files: Sequence[Path], sizes: Sequence[tuple[int, int]], *, batch_size: int,
                 num_workers: int) -> tuple[DataLoader, SizeBatches]:
    """The loader of ``files`` (``ImageFiles`` in ``SizeBatches``) and its batch sampler."""
    batches = SizeBatches(sizes, batch_size=batch_size)
    if num_workers < 0:
        raise ConfigError(f"--num-workers {num_workers}: expected 0 or more")
    loader = DataLoader(ImageFiles(files), batch_sampler=batches, num_workers=num_workers,
                        collate_fn=collate_images, pin_memory=torch.cuda.is_available(),
                        worker_init_fn=_worker_init_fn() if num_workers else None,
                        multiprocessing_context=worker_context() if num_workers else None)
    return loader, batches


# -- progress -----------------------------------------------------------------------------------
class ItemProgress:
    """Progress of ``total`` items on stderr: on a terminal a live bar with items/s and the time
    left; otherwise nothing until ``close``, which prints one summary line either way (unless
    ``enabled`` is false: silent)."""

    def __init__(self, total: int, *, label: str, unit: str = "images", enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.total, self.label, self.unit, self.enabled = total, label, unit, enabled
        self.console = Console(file=stream or sys.stderr, markup=False, highlight=False)
        self.start = time.perf_counter()
        self.done = 0
        self.bar: Any = None
        if enabled and self.console.is_terminal:
            self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TextColumn("ETA"),
                                TimeRemainingColumn(), console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(label, total=total, rate="")

    @property
    def rate(self) -> float:
        """Items per second so far."""
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, advance=n, rate=f"{self.rate:.1f} {self.unit}/s")

    def stop(self) -> None:
        """Remove the bar (a failed run: no summary)."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def close(self, summary: str | None = None) -> str:
        """Stop the bar; print and return the summary line (``summary`` appended to it)."""
        self.stop()
        seconds = time.perf_counter() - self.start
        unit = self.unit.removesuffix("s") if self.done == 1 else self.unit
        line = (f"{self.label}: {self.done} {unit} in {seconds:.1f} s "
                f"({self.rate:.2f} {self.unit}/s)" + (f", {summary}" if summary else ""))
        if self.enabled:
            self.console.print(line, soft_wrap=True)
        return line


# -- dataset-level writers ----------------------------------------------------------------------
_END, _ABORT = object(), object()


class _Aborted(Exception):
    """Raised inside a dataset writer's iterator when the run failed elsewhere."""


class DatasetWriterThread:
    """Runs ``task.write_dataset_predictions(items, out_dir, card=card)`` in a thread, fed one
    ``PredictedImage`` at a time through a bounded queue, so no run holds every prediction.

    ``put`` re-raises the writer's error as soon as it has one; ``finish`` ends the stream and
    returns the paths the writer wrote; ``abort`` makes the writer's iterator raise and waits."""

    def __init__(self, task: Any, out_dir: Path, *, card: Any, maxsize: int = 8) -> None:
        self.task, self.out_dir, self.card = task, out_dir, card
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=maxsize)
        self.result: list[str] = []
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"densepipe-predict-{task.name}",
                                       daemon=True)
        self.thread.start()

    def _items(self) -> Iterator[Any]:
        while True:
            item = self.queue.get()
            if item is _END:
                return
            if item is _ABORT:
                raise _Aborted
            yield item

    def _run(self) -> None:
        try:
            self.result = [str(p) for p in self.task.write_dataset_predictions(
                self._items(), str(self.out_dir), card=self.card)]
        except BaseException as e:  # handed to the main thread
            self.error = e
        finally:
            self.finished.set()

    def _raise(self) -> None:
        if self.error is not None and not isinstance(self.error, _Aborted):
            raise self.error

    def put(self, item: Any) -> None:
        while not self.finished.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        self._raise()  # a writer that returned early takes no more items

    def finish(self) -> list[str]:
        self.put(_END)
        self.thread.join()
        self._raise()
        return self.result

    def abort(self) -> None:
        with contextlib.suppress(queue.Full):
            while not self.finished.is_set():
                try:
                    self.queue.put(_ABORT, timeout=0.2)
                    break
                except queue.Full:
                    with contextlib.suppress(queue.Empty):
                        self.queue.get_nowait()  # make room: the items are dropped anyway
        self.thread.join(timeout=30)


# -- output folder ------------------------------------------------------------------------------
@dataclass
class _Manifest:
    """An earlier run's ``predict_manifest.json`` (or none): which files in ``out_dir`` are ours."""

    owned: set[str] = field(default_factory=set)

    @classmethod
    def read(cls, out: Path) -> _Manifest:
        path = out / MANIFEST
        if not path.exists() and not path.is_symlink():
            return cls()
        try:
            obj = json.loads(path.read_bytes())
        except (OSError, ValueError):
            obj = None
        if not isinstance(obj, dict) or obj.get("densepipe_predict") != MANIFEST_FORMAT \
                or not isinstance(obj.get("files"), list):
            raise OutputError(f"{path}: exists but is not a densepipe predict manifest (format "
                              f"{MANIFEST_FORMAT}); choose another --out or move it away")
        return cls({str(f) for f in obj["files"]})


def _check_destinations(out: Path, staged: Sequence[str], manifest: _Manifest, *,
                        replace_eval: bool) -> None:
    """Refuse (``OutputError``, before anything moves) a staged file whose destination holds
    something an earlier run did not write, or lies under a path that is not a folder."""
    folders_ok: set[Path] = set()
    for rel in staged:
        dest = out / rel
        for parent in reversed(dest.parents):
            if parent in folders_ok or out not in (parent, *parent.parents) or parent == out:
                continue
            if (parent.exists() or parent.is_symlink()) and not parent.is_dir():
                raise OutputError(f"{parent}: exists and is not a folder, but predictions go "
                                  "under it; nothing was written: move it away or choose another --out")
            folders_ok.add(parent)
        if rel == MANIFEST or (replace_eval and rel.split("/", 1)[0] == EVAL_DIR):
            continue
        if (dest.exists() or dest.is_symlink()) and rel not in manifest.owned:
            raise OutputError(f"{dest}: exists and was not written by densepipe predict (not in "
                              f"{MANIFEST}); nothing was written: move it away or choose another --out")
    if replace_eval and (out / EVAL_DIR).exists():
        eval_dir = out / EVAL_DIR
        if not eval_dir.is_dir() or eval_dir.is_symlink():
            raise OutputError(f"{eval_dir}: exists and is not a folder densepipe predict wrote; "
                              "nothing was written: move it away or choose another --out")
        for f in sorted(eval_dir.rglob("*")):
            rel = f.relative_to(out).as_posix()
            if (f.is_file() or f.is_symlink()) and rel not in manifest.owned:
                raise OutputError(f"{f}: in the eval folder that this run replaces, but not written "
                                  "by densepipe predict; nothing was written: move it away or "
                                  "choose another --out")


def _writes_dataset_files(task: Any) -> bool:
    """True when ``task`` overrides ``Task.write_dataset_predictions`` (the default writes nothing)."""
    return getattr(type(task), "write_dataset_predictions", None) is not Task.write_dataset_predictions


def _staged_files(staging: Path) -> list[str]:
    return sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*")
                  if p.is_file() and not p.name.startswith("."))


# -- the run ------------------------------------------------------------------------------------
@torch.no_grad()
def predict_to_folder(model: Any, images: Sequence[InputImage], sizes: Sequence[tuple[int, int]], *,
                      out_dir: str | os.PathLike[str], ids: Sequence[int], batch_size: int,
                      num_workers: int, vis: bool, eval_files: bool,
                      progress: bool = True, source: str = "", step: int | None = None) -> list[str]:
    """Predict ``images`` (read and sized already) with ``model`` into ``out_dir`` (module doc:
    layout, all or nothing, ownership); returns the written paths, sorted."""
    card = model.card
    bad = [n for n in model.tasks if n in RESERVED or n == MANIFEST]
    if bad:
        raise ConfigError(f"predict: task {bad[0]!r} would write into the layout's own "
                          f"{bad[0]}/ folder; rename the task")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; choose another --out")
    manifest = _Manifest.read(out)
    model.eval()
    loader, _ = image_loader([i.path for i in images], sizes, batch_size=batch_size,
                                   num_workers=num_workers)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    # staged inside out: the same filesystem (a move, never a copy), and a folder the user can write
    staging = Path(tempfile.mkdtemp(prefix=".predict.", suffix=".tmp", dir=out))
    writers: dict[str, DatasetWriterThread] = {}
    bar = ItemProgress(len(images), label="predict", enabled=progress)
    done = False
    try:
        if eval_files:
            writers = {name: DatasetWriterThread(task, staging / EVAL_DIR, card=card)
                       for name, task in model.tasks.items() if _writes_dataset_files(task)}
        for batch in loader:
            if "error" in batch:  # the file changed since it was read before the model loaded
                raise batch["error"]
            indices = batch["index"]
            model_batch = {"image": batch["image"], "image_ids": [int(ids[i]) for i in indices],
                           "file_names": [images[i].name for i in indices],
                           "meta": [{} for _ in indices], "has": {}}
            predictions = model.predict(model_batch)
            for j, i in enumerate(indices):
                img = images[i]
                rgb = batch["image"][j].permute(1, 2, 0).numpy()
                for name, task in model.tasks.items():
                    pred = predictions[name][j]
                    if vis:
                        atomic_write_png(staging / VIS_DIR / name / f"{img.stem}.png",
                                         task.visualize(rgb, pred, card=card,
                                                        options=model.options[name]))
                    stem = staging / name / img.stem
                    stem.parent.mkdir(parents=True, exist_ok=True)
                    task.save_prediction(pred, str(stem), card=card, options=model.options[name])
                    if name in writers:
                        writers[name].put(PredictedImage(name=img.name, image_id=int(ids[i]),
                                                         height=sizes[i][0], width=sizes[i][1],
                                                         prediction=pred))
            bar.advance(len(indices))
        for w in writers.values():
            w.finish()
        writers = {}
        files = _staged_files(staging)
        owned = sorted((manifest.owned - ({f for f in manifest.owned if f.startswith(EVAL_DIR + "/")}
                                          if eval_files else set())) | set(files) | {MANIFEST})
        atomic_write_json(staging / MANIFEST, {
            "densepipe_predict": MANIFEST_FORMAT, "model": source, "step": step,
            "tasks": list(model.tasks),
            "images": [{"input": str(images[i].path), "name": images[i].name, "image_id": int(ids[i]),
                        "height": sizes[i][0], "width": sizes[i][1]} for i in range(len(images))],
            "eval_files": [f for f in files if f.startswith(EVAL_DIR + "/")],
            "files": owned,
        })
        files.append(MANIFEST)
        _check_destinations(out, files, manifest, replace_eval=eval_files)
        if eval_files and (out / EVAL_DIR).exists():
            os.rename(out / EVAL_DIR, staging / ".old-eval")  # removed with the staging folder
        for rel in files:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, out / rel)
        done = True
    finally:
        if not done:
            bar.stop()
        for w in writers.values():
            w.abort()
        shutil.rmtree(staging, ignore_errors=True)
        if created and not done:
            with contextlib.suppress(OSError):  # only when empty: nothing of anyone's is removed
                out.rmdir()
    bar.close(f"{len(files)} files in {out}")
    return sorted(str(out / rel) for rel in files)


def run_predict(cfg: Any, inputs: Sequence[str | os.PathLike[str]], *,
                checkpoint: str | os.PathLike[str] | None = None, model_uri: str | None = None,
                out_dir: str | os.PathLike[str], batch_size: int | None = None,
                num_workers: int | None = None, vis: bool = True, eval_files: bool = False,
                coco_gt: str | os.PathLike[str] | None = None, progress: bool = True) -> list[str]:
    """``stages.predict``: expand ``inputs``, read every image, then load the model (the
    checkpoint's, with its own stored config, or the MLflow model ``model_uri``) and write
    ``out_dir`` (module doc). ``batch_size`` defaults to ``evaluate.batch_size``, ``num_workers``
    to ``data.num_workers``; ``coco_gt`` (a COCO JSON whose ``images`` give the ids) implies
    ``eval_files``. Returns the written paths."""
    if checkpoint is None and model_uri is None:
        raise ConfigError("predict: give --checkpoint PATH or --model models:/<name>/<version>")
    batch_size = cfg.evaluate.batch_size if batch_size is None else batch_size
    num_workers = cfg.data.num_workers if num_workers is None else num_workers
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: expected 1 or more")
    if num_workers < 0:
        raise ConfigError(f"--num-workers {num_workers}: expected 0 or more")
    images = expand_inputs(inputs, exclude=out_dir)
    if not images:
        raise ConfigError("predict: no input images given")
    ids = image_ids(images, coco_gt)
    sizes = scan_images(images, threads=max(1, num_workers))  # fail before loading the model
    device = resolve_device(cfg.train.device)
    model, step, _, source = load_model_to_evaluate(cfg, checkpoint=checkpoint, model_uri=model_uri,
                                                    device=device)
    return predict_to_folder(model, images, sizes, out_dir=out_dir, ids=ids, batch_size=batch_size,
                             num_workers=num_workers, vis=vis,
                             eval_files=eval_files or coco_gt is not None, progress=progress,
                             source=source, step=step)


__all__ = ["InputImage", "ItemProgress", "SizeBatches", "expand_inputs", "image_ids",
           "predict_to_folder", "run_predict", "scan_images"]
