"""Which folders ``write_synthetic_dataset`` may replace: only its own renders, provably.

A finished render holds ``MARKER``, a JSON file with the generator, its version, the render's
parameters and a fingerprint of every other file in the folder (relative path and size). A folder
may be replaced when it does not exist, is empty, or holds a marker whose fingerprint still matches
the folder: a file the user added, removed or resized makes it theirs again. Anything else is
refused with one line (``OutputError``) naming the folder and what to do.

While a render is under way its temporary folder (``.<name>.<random>.tmp`` beside the target)
holds a marker with ``state: "rendering"`` and the writer's pid and host, so that the temporary
folder of a writer that was killed can be recognised and removed by the next render.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import stat
from pathlib import Path
from typing import Any

from pipeline.data.synthetic import spec
from pipeline.errors import OutputError
from pipeline.io import atomic_write_json, protected_reason

log = logging.getLogger(__name__)

MARKER = ".densepipe-synthetic.json"
MARKER_FORMAT = "densepipe-synthetic-marker/1"


def content_fingerprint(root: Path) -> tuple[str, int]:
    """``(sha256 hex, number of files)`` over the sorted relative paths of everything under
    ``root`` except the marker, not following links: files by size, folders (empty ones too) and
    symbolic links (by their target path) by kind, so a file, folder or link added, removed or
    resized changes it."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):  # does not descend into linked folders
        dirnames.sort()
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if rel == MARKER:
                continue
            info = full.lstat()
            if stat.S_ISLNK(info.st_mode):
                entries.append(f"{rel}\0link\0{os.readlink(full)}")
            elif stat.S_ISDIR(info.st_mode):
                entries.append(f"{rel}\0dir")
            else:
                entries.append(f"{rel}\0{info.st_size}")
    entries.sort()
    digest = hashlib.sha256("\n".join(entries).encode("utf-8", "surrogateescape")).hexdigest()
    return digest, sum(1 for e in entries if not e.endswith("\0dir"))


def write_rendering_marker(tmp: Path) -> None:
    """Mark ``tmp`` as a render in progress by this process."""
    atomic_write_json(tmp / MARKER, {"format": MARKER_FORMAT, "state": "rendering",
                                     "pid": os.getpid(), "host": socket.gethostname()})


def write_done_marker(root: Path, params: dict[str, Any]) -> None:
    """Seal a complete render: the fingerprint of everything already in ``root``."""
    digest, files = content_fingerprint(root)
    atomic_write_json(root / MARKER, {
        "format": MARKER_FORMAT, "state": "complete", "generator": spec.GENERATOR,
        "generator_version": spec.GENERATOR_VERSION, "params": params,
        "files": files, "fingerprint": digest,
    })


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) and obj.get("format") == MARKER_FORMAT else None


def is_own_render(root: Path) -> bool:
    """True when ``root`` holds a complete render whose files are exactly those it sealed."""
    marker = _read_marker(root)
    if marker is None or marker.get("state") != "complete":
        return False
    digest, _ = content_fingerprint(root)
    return digest == marker.get("fingerprint")


def check_replaceable(root: Path) -> None:
    """Raise ``OutputError`` unless ``root`` is missing, an empty folder, or our own render, and
    always for a symbolic link or a folder that holds the home, the working folder, the project or
    a git checkout."""
    reason = protected_reason(root)
    if reason is not None:
        raise OutputError(f"{root}: data.root will not be rendered into: {reason}; set data.root "
                          "to a new folder (the default is data/synthetic)")
    if root.is_symlink():
        raise OutputError(f"{root}: data.root is a symbolic link (to {os.readlink(root)}); set "
                          "data.root to the folder itself, or to a new folder")
    if root.exists() and not root.is_dir():
        raise OutputError(f"{root}: data.root exists and is not a folder; move it away or set "
                          "data.root to a new folder")
    refusal = replace_refusal(root)
    if refusal is not None:
        raise OutputError(f"{root}: {refusal}")


def replace_refusal(root: Path) -> str | None:
    """Why the folder ``root`` may not be replaced by a render (``None``: it is missing, empty or
    a sealed render of ours with its files unchanged)."""
    if not root.is_dir() or not any(root.iterdir()):
        return None
    marker = _read_marker(root)
    if marker is None:
        if _is_unsealed_render(root):
            return (f"was rendered by an older densepipe, before renders were sealed with {MARKER}, "
                    "so it is not provably ours: delete or move it yourself (it is regenerated "
                    "from data.synthetic), or set data.root to a new folder")
        hint = (" (it looks like a dataset: for your own data set data.source=folder)"
                if (root / "annotations").is_dir() or (root / "meta.json").exists() else "")
        return (f"holds files densepipe did not write (no {MARKER}){hint}; prepare renders the "
                "synthetic dataset only into a new or empty folder or over its own earlier render: "
                "set data.root to a new folder, or move this one away")
    digest, files = content_fingerprint(root)
    if marker.get("state") != "complete" or digest != marker.get("fingerprint"):
        return (f"its files changed since densepipe rendered it ({files} files now, "
                f"{marker.get('files', '?')} when rendered), so it is no longer provably ours and "
                "will not be replaced: set data.root to a new folder, or move this one away")
    return None


def _is_unsealed_render(root: Path) -> bool:
    """A render of an older densepipe: its ``meta.json`` names this generator."""
    try:
        extra = json.loads((root / "meta.json").read_text(encoding="utf-8")).get("extra", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(extra, dict) and extra.get("generator") == spec.GENERATOR


def _writer_alive(marker: dict[str, Any]) -> bool:
    if marker.get("host") != socket.gethostname() or os.name == "nt":
        return True  # another machine's writer (a shared disk), or no kill(pid, 0): cannot tell
    try:
        os.kill(int(marker.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def remove_stale_renders(root: Path) -> int:
    """Delete the temporary folders of killed renders beside ``root`` (``.<name>.*.tmp`` whose
    marker names a dead writer on this host) and leftover old renders (``.<name>.*.old`` that
    are provably ours). Returns how many were removed."""
    removed = 0
    if not root.parent.is_dir():
        return 0
    for sibling in root.parent.glob(f".{glob.escape(root.name)}.*"):
        if not sibling.is_dir() or sibling.is_symlink():
            continue
        marker = _read_marker(sibling)
        if marker is None:
            continue
        stale = (sibling.suffix == ".tmp" and marker.get("state") == "rendering"
                 and not _writer_alive(marker)) or (sibling.suffix == ".old" and is_own_render(sibling))
        if stale:
            shutil.rmtree(sibling, ignore_errors=True)
            removed += 1
    if removed:
        log.info("removed %d leftover folder(s) of interrupted renders beside %s", removed, root)
    return removed
