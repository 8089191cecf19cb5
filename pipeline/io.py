"""Atomic file output: nothing half-written is ever left under a final name.

Writers write to a temporary sibling and ``os.replace`` it into place, so a crash leaves either the
old file or the new one. ``atomic_dir`` does the same for a whole folder, and never replaces a
folder that holds the user's home, the working folder, a git checkout or densepipe itself
(``protected_reason``). What is written gets the modes of a plain ``open``/``mkdir`` under the
process umask (0644 / 0755 with the usual 022), not the private 0600 / 0700 of ``mkstemp`` and
``mkdtemp``: results are shared with a team and with DVC's cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.errors import OutputError


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (``/proc/self/status``):
    ``os.umask`` must set a value to read one, which other threads would see meanwhile."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _public_file(fd_or_path: int | str | os.PathLike[str]) -> None:
    """Give a ``mkstemp`` file the mode ``open(..., "w")`` would have (0666 minus the umask)."""
    mode = 0o666 & ~_umask()
    if isinstance(fd_or_path, int):
        os.fchmod(fd_or_path, mode)
    else:
        os.chmod(fd_or_path, mode)


def protected_reason(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` must never be replaced or deleted by densepipe, or ``None``.

    Protected: the filesystem root; the user's home and any folder holding it; the working folder
    and any folder holding it; any folder holding the densepipe installation (this project); a
    folder with a ``.git`` entry (a git checkout)."""
    target = Path(path).expanduser().resolve()
    if target == Path(target.anchor):
        return "it is the filesystem root"
    here = {"your home folder": Path.home().resolve(), "the working folder": Path.cwd().resolve(),
            "the densepipe project": Path(__file__).resolve().parents[1]}
    for what, place in here.items():
        if place == target:
            return f"it is {what}"
        if target in place.parents:
            return f"it holds {what} ({place})"
    if (target / ".git").exists():
        return "it is a git checkout (it has .git)"
    return None


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _public_file(fd)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """JSON with sorted keys (byte-stable output for DVC) written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``.

    For writers that want a file name (``torch.save``, ``PIL.Image.save``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _public_file(fd)
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_png(path: str | os.PathLike[str], array: Any) -> Path:
    """``array`` (``HxW`` uint8/uint16 or ``HxWx3`` uint8) as a PNG, written atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *,
               may_replace: Callable[[Path], str | None] | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; on success it replaces ``path``.

    The caller decides whether an existing ``path`` may be replaced (it must be provably the
    caller's own output). ``may_replace(folder)`` (a reason to refuse, or ``None``) is asked again
    at the swap, on the old folder just renamed aside, so nothing added while the caller was
    writing is lost: on a reason the old folder is put back and ``OutputError`` raised. A
    ``path`` that ``protected_reason`` names, or that is not a folder, is refused with
    ``OutputError`` whatever the caller says; a symbolic link at ``path`` is replaced (its target
    is not touched). On failure the temporary folder is removed and ``path`` is as it was."""
    path = Path(path)
    reason = protected_reason(path)
    if reason is not None:
        raise OutputError(f"{path}: will not replace this folder: {reason}; choose another path")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: exists and is not a folder; move it away or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if not path.exists() and not path.is_symlink():
            os.rename(tmp, path)
            return
        old = path.with_name(f".{path.name}.{secrets.token_hex(6)}.old")
        os.rename(path, old)  # atomic; from here on nobody can add to what we replace
        refusal = None if old.is_symlink() or may_replace is None else may_replace(old)
        if refusal is not None:
            os.rename(old, path)
            raise OutputError(f"{path}: {refusal}")
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of the file at ``path`` (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
