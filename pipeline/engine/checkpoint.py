"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)`` only.

A checkpoint is a dict. ``last.pt`` (for resuming) holds all of it: ``format``, ``step``,
``epoch``, ``samples_seen`` (the sampler position), ``world_size``, ``model`` (state dict),
``optimizer``, ``scheduler``, ``scaler`` (fp16 gradient scaler), ``loss_weighting`` (its state
dict), ``rng`` (torch CPU/CUDA, Python and NumPy states), ``config`` (the full config as plain data),
``card`` (dataset card JSON), ``metrics`` (last evaluation), ``best_value``, ``early_stopping``,
``skipped_nonfinite``, ``hooks`` (per-hook plain data) and, with ``train.ema``, ``model_ema`` (the
averaged weights). ``best.pt`` (for evaluation, prediction, registration and fine-tuning) is the
same without the resume state (``RESUME_KEYS``): ``weights_payload``. ``load_checkpoint(...,
resume=True)`` refuses a checkpoint without it in one line.

The bytes are a function of the payload alone: the same training (same params, same seed) writes
the same files, so DVC sees no change when it reruns one. Nothing volatile is inside: the MLflow
run that wrote a folder's checkpoints is in ``<folder>/mlflow_run.json`` (``RunRecord``), which
names each checkpoint it belongs to by sha256; ``load_checkpoint`` reports that run as
``mlflow_run_id`` only for a file the record names, so a record never lends its run to a
checkpoint another training wrote.

A training holds ``<train.out_dir>/.lock`` (``hold_out_dir``) while it writes there, so it can tell
the temporary files of a killed writer (``remove_stale_temp_files``) from those of a live one.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import pickletools
import random
import re
import stat
import types
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch._weights_only_unpickler import _get_allowed_globals

from pipeline.errors import CheckpointError, DensepipeError
from pipeline.io import atomic_path, atomic_write_json, sha256_file

try:
    import fcntl
except ImportError:  # not POSIX: no lock, no clean-up
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FORMAT = "densepipe-checkpoint/1"
LOCK_NAME = ".lock"
"""The advisory lock file a training holds in its ``train.out_dir``."""
RUN_RECORD = "mlflow_run.json"
"""Beside the checkpoints: the MLflow run that wrote them (``RunRecord``)."""
RUN_RECORD_FORMAT = "densepipe-run/1"
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "loss_weighting", "rng", "early_stopping",
               "hooks", "samples_seen", "skipped_nonfinite")
"""What only resuming reads: in ``last.pt``, not in ``best.pt``."""
REQUIRED_TO_RESUME = ("optimizer", "scheduler", "rng")
"""What a checkpoint must hold for ``load_checkpoint(..., resume=True)``."""


def rng_state() -> dict[str, Any]:
    """Torch CPU (+ every CUDA device), Python and NumPy generator states."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": _numpy_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_state(state["python"]))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(state: Any) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def weights_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` without the resume state (``RESUME_KEYS``): what ``best.pt`` holds. Weights
    (``model``, ``model_ema`` and whatever else a hook added), config, card, step, metrics and
    ``best_value`` stay."""
    return {k: v for k, v in payload.items() if k not in RESUME_KEYS}


class _FullPickler(pickle.Pickler):
    """Writes every object in full (pickle's ``fast`` mode: no memo). With a memo, a second
    occurrence of an object is a back-reference, so the bytes would depend on which equal
    strings happen to be one object: a value read from params.yaml or given as a default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fast = True


_PICKLE = types.ModuleType("densepipe_checkpoint_pickle")
_PICKLE.Pickler = _FullPickler  # type: ignore[attr-defined]
"""What ``torch.save`` pickles with (it subclasses ``pickle_module.Pickler``)."""


def save_checkpoint(path: str | Path, payload: dict[str, Any], *,
                    record: RunRecord | None = None) -> str:
    """Write ``payload`` (plus ``format``) to ``path`` through a temporary file and rename;
    returns the file's sha256. ``record``: the ``RunRecord`` of ``path``'s folder, which notes the
    new file before it replaces the old one (a run killed in between still owns the old file).

    The bytes are a function of the payload's values alone: ``torch.save`` into an open file names
    the archive inside ``archive`` (given a file name, torch names it after the random temporary
    name), zip entries carry no dates, storages are numbered in order of appearance and the pickle
    has no memo (``_FullPickler``)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f, pickle_module=_PICKLE)
            f.flush()
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        if record is not None:
            record.note(path.name, digest)
    return digest


class RunRecord:
    """``<folder>/mlflow_run.json``: the MLflow run that wrote the checkpoints of ``folder``.

    ``{"format", "mlflow_run_id", "checkpoints": {name: [sha256, ...]}}``: for each checkpoint
    name, the sha256 of the newest file the run wrote under it, then of the one before. Kept out
    of the checkpoints so that their bytes do not depend on the run id; tied to them by content
    so that a checkpoint of another training (restored by ``dvc checkout``, copied in, or written
    after the record was) never inherits the run. ``mlflow_run_id`` may be None (tracking off)."""

    def __init__(self, folder: str | Path, run_id: str | None = None,
                 checkpoints: dict[str, list[str]] | None = None) -> None:
        self.path = Path(folder) / RUN_RECORD
        self.run_id = run_id
        self.checkpoints = dict(checkpoints or {})

    @classmethod
    def read(cls, folder: str | Path) -> RunRecord | None:
        """The record in ``folder``; None when there is none or it is unreadable (logged)."""
        path = Path(folder) / RUN_RECORD
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("format") != RUN_RECORD_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {RUN_RECORD_FORMAT}")
            run_id = data["mlflow_run_id"]
            checkpoints = {str(k): [str(h) for h in v] for k, v in data["checkpoints"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("%s: ignored, not a densepipe run record (%s)", path, e)
            return None
        return cls(folder, run_id if isinstance(run_id, str) else None, checkpoints)

    def owns(self, digest: str) -> bool:
        """Whether the run wrote a checkpoint with this sha256."""
        return any(digest in hashes for hashes in self.checkpoints.values())

    def note(self, name: str, digest: str) -> None:
        """Record that the run wrote ``name`` with sha256 ``digest`` (keeping the previous one)
        and rewrite the file atomically."""
        previous = [h for h in self.checkpoints.get(name, []) if h != digest]
        self.checkpoints[name] = [digest, *previous[:1]]
        atomic_write_json(self.path, {"format": RUN_RECORD_FORMAT, "mlflow_run_id": self.run_id,
                                      "checkpoints": dict(sorted(self.checkpoints.items()))})

    def start(self, run_id: str | None) -> None:
        """The checkpoints written from now on are ``run_id``'s; those noted for another run
        are forgotten."""
        if run_id != self.run_id:
            self.run_id, self.checkpoints = run_id, {}


def recorded_run_id(path: str | Path) -> str | None:
    """The MLflow run id that ``path``'s folder record (``RunRecord``) gives for this very file
    (by sha256), else None."""
    path = Path(path)
    record = RunRecord.read(path.parent)
    if record is None or record.run_id is None:
        return None
    return record.run_id if record.owns(sha256_file(path)) else None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *,
                    resume: bool = False) -> dict[str, Any]:
    """Read a densepipe checkpoint with ``torch.load(weights_only=True)``; anything else (missing,
    truncated, corrupt, a pickled object, another format) raises a one-line ``CheckpointError``.
    torch's warnings while reading (e.g. about the pickle protocol of a raw pickle) are not shown.

    ``mlflow_run_id`` in the result: the run that wrote the file, from the folder's ``RunRecord``
    when it names this file (older checkpoints carry it inside), else None. ``resume``: the
    checkpoint must hold the resume state (``REQUIRED_TO_RESUME``), else a one-line
    ``CheckpointError`` names the file and what it lacks (``best.pt`` holds weights only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, pickle errors, unsafe globals
        raise CheckpointError(unreadable_message(path, e)) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a densepipe checkpoint (expected format {FORMAT})")
    if resume:
        missing = [k for k in REQUIRED_TO_RESUME if k not in ckpt]
        if missing:
            raise CheckpointError(
                f"{path}: cannot resume from it: it holds weights only (as best.pt does), without "
                f"the resume state ({', '.join(missing)}); resume needs the last.pt a training "
                f"wrote, or move {path.name} away to train afresh")
    if ckpt.get("mlflow_run_id") is None:
        ckpt["mlflow_run_id"] = recorded_run_id(path)
    return ckpt


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_WEIGHTS_ONLY = "Weights only load failed"
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)")


def unreadable_message(path: Path, e: Exception, *, source: str | None = None,
                       what: str = "checkpoint") -> str:
    """One line saying why ``torch.load(path, weights_only=True)`` raised ``e``, naming ``source``
    (default ``path``): the unsupported global a pickled object needs (from torch's message, else
    found by scanning the pickle without running it), or the error's first 160 characters for a
    truncated or corrupt file. ``what``: what the file should have been (a densepipe ``what``)."""
    source = source or str(path)
    text = " ".join(_ANSI.sub("", str(e)).split())
    if _WEIGHTS_ONLY in text:
        found = _UNSUPPORTED_GLOBAL.search(text)
        name = found.group(1) if found else _first_unsafe_global(path)
        if name is not None:
            why = f"the file is a pickled object (Unsupported global: GLOBAL {name})"
        else:
            detail = _UNPICKLER_ERROR.search(text)
            problem = (detail.group(1) if detail else text)[:160]
            why = f"the file is a pickle that torch will not read as weights ({problem})"
        return (f"{source}: refuses to load: {why}, not a densepipe {what}; only weights are "
                "loaded (torch.load weights_only=True)")
    first = text.split(". ")[0]  # torch's first sentence; the rest is advice about other causes
    return f"{source}: not a readable {what} (truncated or corrupt?): {type(e).__name__}: {first[:160]}"


def _first_unsafe_global(path: Path, *, limit: int = 16 << 20) -> str | None:
    """The first ``module.name`` global that the pickles at the start of ``path`` (a raw pickle, or
    torch's legacy format: several pickles in a row) refer to and that torch's weights-only
    unpickler does not allow; None when there is none in the first ``limit`` bytes. Scans the
    opcodes (``pickletools``): nothing is imported or run."""
    try:
        allowed: set[str] = set(_get_allowed_globals())
    except Exception:  # noqa: BLE001 - private torch API: without it, name the first global
        allowed = set()
    try:
        with open(path, "rb") as f:
            data = io.BytesIO(f.read(limit))
    except OSError:
        return None
    for name in _pickle_globals(data):
        if name not in allowed:
            return name
    return None


_STRING_OPS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
                         "SHORT_BINUNICODE", "BINUNICODE8"})


def _pickle_globals(data: io.BytesIO) -> Iterator[str]:
    """``module.name`` of every GLOBAL / STACK_GLOBAL in the consecutive pickles of ``data``
    (stops at the end or at the first undecodable byte)."""
    strings: list[Any] = []  # values pushed by string opcodes, or None for anything else
    memo: dict[int, Any] = {}
    while data.tell() < len(data.getbuffer()):
        try:
            for op, arg, _ in pickletools.genops(data):
                if op.name == "GLOBAL":
                    yield ".".join(str(arg).split(" ", 1))
                elif op.name == "STACK_GLOBAL":
                    if len(strings) >= 2 and isinstance(strings[-2], str) and isinstance(strings[-1], str):
                        yield f"{strings[-2]}.{strings[-1]}"
                elif op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                    memo[len(memo) if op.name == "MEMOIZE" else int(arg)] = strings[-1] if strings else None
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    strings.append(memo.get(int(arg)))
                elif op.name not in ("PROTO", "FRAME"):
                    strings.append(arg if isinstance(arg, str) and op.name in _STRING_OPS else None)
        except (ValueError, pickle.UnpicklingError, EOFError):
            return


@contextlib.contextmanager
def hold_out_dir(folder: str | Path) -> Iterator[bool]:
    """Hold an exclusive advisory lock (``flock``) on ``<folder>/.lock`` for the block; the block
    gets True. One densepipe training writes a ``train.out_dir`` at a time: while another process
    holds it, raises a one-line ``DensepipeError`` naming its pid. The lock dies with its process,
    even under ``kill -9``. Where the file system cannot lock (or not POSIX), logs a warning and the
    block gets False. The file stays (removing it would race with the next training); it holds
    the owner's pid while locked and is empty after a clean exit."""
    folder = Path(folder)
    fd = -1
    if fcntl is not None:
        try:
            fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise DensepipeError(
                f"{folder}: another densepipe training{f' (pid {owner})' if owner.isdigit() else ''}"
                " is writing to this train.out_dir; wait for it to end or set another train.out_dir"
            ) from None
        except OSError as e:
            if fd >= 0:
                os.close(fd)
                fd = -1
            log.warning("%s: cannot lock %s (%s): temporary files of killed runs are not removed",
                        folder, LOCK_NAME, e.strerror or e)
    if fd < 0:
        yield False
        return
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield True
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the lock


def temp_name_pattern(names: Iterable[str]) -> re.Pattern[str]:
    """Names of the temporary files ``pipeline.io`` writes before renaming them to one of
    ``names``: ``.<name>.<random>.tmp``."""
    return re.compile(rf"\.(?:{'|'.join(map(re.escape, names))})\.[A-Za-z0-9_]+\.tmp")


def remove_stale_temp_files(folder: str | Path, names: Iterable[str]) -> tuple[int, int]:
    """Delete, in ``folder`` (not below it), the regular files named ``.<name>.<random>.tmp`` for
    one of ``names``: what ``pipeline.io``'s atomic writers leave when killed mid-write. Call only
    while holding the folder (``hold_out_dir``) and for names that only its holder writes: then no
    live process is writing any of them. Nothing else is touched (other names, folders, symlinks).
    Returns ``(files, bytes)`` removed and logs one line when there were any."""
    folder = Path(folder)
    pattern = temp_name_pattern(names)
    count = size = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if not pattern.fullmatch(entry.name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            count, size = count + 1, size + st.st_size
    if count:
        log.warning("%s: removed %d temporary file%s (%s) left by a killed run", folder, count,
                    "" if count == 1 else "s", _size(size))
    return count, size


def _size(n: int) -> str:
    """``n`` bytes for a person: ``512 B``, ``3.5 kB``, ``139.0 MB``, ``2.1 GB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _head_of(key: str) -> str:
    parts = key.split(".")
    return parts[1] if parts[0] == "heads" and len(parts) > 1 else parts[0]


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], *, source: str | Path) -> None:
    """Load ``state`` strictly; a mismatch names the heads (or backbone) that differ."""
    own = model.state_dict()
    missing = sorted({_head_of(k) for k in own if k not in state})
    unexpected = sorted({_head_of(k) for k in state if k not in own})
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items() if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing in checkpoint: {', '.join(missing)}")
        if unexpected:
            problems.append(f"not in this model: {', '.join(unexpected)}")
        if shapes:
            problems.append(f"shape mismatch (checkpoint vs model): {shapes[0]}"
                            + (f" and {len(shapes) - 1} more" if len(shapes) > 1 else ""))
        raise CheckpointError(
            f"{source}: checkpoint does not match the model config ({'; '.join(problems)})"
        )
    model.load_state_dict(state, strict=True)
