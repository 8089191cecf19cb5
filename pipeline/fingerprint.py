"""Fingerprints of what a training run consumes: the data, the params, the code.

A scheduled retraining asks whether its inputs changed since the model in production was trained;
``inputs_fingerprint`` answers with three strings (stored as MLflow tags by the caller) and
``changed`` names the parts that differ. Nothing here runs DVC, imports torch or writes anywhere
but the per-file hash cache (``data_fingerprint``).

- data: the hash DVC recorded for ``data.root`` (``<root>.dvc`` or a ``dvc.lock`` stage output),
  else a sha256 over the folder's files (relative path, size, sha256 of the bytes).
- params: a sha256 of the config without the keys that do not change what is trained
  (``IGNORED_KEYS``).
- code: a sha256 of the ``pipeline`` and ``plugins`` sources, the third-party plugin
  distributions' versions and torch's and torchvision's versions.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config import Config
from pipeline.errors import DataError
from pipeline.io import atomic_write_json, sha256_file

PARTS: tuple[str, ...] = ("data", "params", "code")
"""The parts of ``inputs_fingerprint``, in the order ``changed`` reports them."""

IGNORED_KEYS: dict[str, str] = {
    "tracking": "where MLflow records a run, not what is trained",
    "promote": "when a trained model replaces the one in production, not what is trained",
    "data.root": "where the data lies; the data fingerprint covers its content",
    "data.num_workers": "loader processes: speed only ('auto' also differs from machine to machine)",
    "train.out_dir": "where the checkpoints are written",
    "train.progress": "progress bar or log lines on the terminal",
    "train.log_every": "how often losses are logged to MLflow",
    "train.checkpoint_every": "how often last.pt is written (the resume point)",
    "train.device": "which device runs the same training ('auto' differs from machine to machine)",
    "evaluate.out_dir": "where the evaluation's drawings and files are written",
    "evaluate.metrics_file": "where the metrics are written",
    "evaluate.num_visualizations": "how many images are drawn",
    "evaluate.checkpoint": "which checkpoint an evaluation reads, not how a model is trained",
    "evaluate.batch_size": "images per evaluation batch: speed only",
}
"""Config keys (``section`` or ``section.key``) left out of ``params_fingerprint``, each with why:
they change where outputs go, how progress is shown or how fast a run goes, not the model."""

PLUGIN_GROUPS: tuple[str, ...] = ("densepipe.tasks", "densepipe.formats", "densepipe.commands")
"""Entry-point groups whose third-party distributions count as code."""

CODE_PACKAGES: tuple[str, ...] = ("pipeline", "plugins")
"""The project packages whose ``.py`` files ``code_fingerprint`` hashes."""

_CACHE_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class DataFingerprint:
    """What ``data_fingerprint`` found: ``kind`` ``dvc`` (``value`` is the md5 DVC recorded,
    ``<hex>.dir`` for a folder) or ``content`` (``value`` is a hex sha256). ``files`` and
    ``bytes`` count what was hashed (for ``dvc``: what DVC recorded, 0 where it recorded none)."""

    kind: Literal["dvc", "content"]
    value: str
    files: int
    bytes: int

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


# -- data -------------------------------------------------------------------------------------
def data_fingerprint(root: Path, *, cache_dir: Path | None = None) -> DataFingerprint:
    """The fingerprint of the dataset at ``root`` (relative paths are taken from the working
    folder).

    DVC's recorded hash when ``root`` is a DVC output: an ``outs`` entry of ``<root>.dvc`` whose
    ``path`` is ``root``, or of a stage in a ``dvc.lock`` found in the working folder or a parent
    (up to the first folder holding ``.dvc/`` or ``.git``) whose ``path`` (relative to the lock's
    folder and the stage's ``wdir``) is ``root``. DVC is not run: the hash is what was recorded
    at the last ``dvc add`` / ``dvc repro`` / ``dvc commit``, not a check of the working copy.
    A DVC file that cannot be read or parsed is passed over.

    Otherwise the content fingerprint: every file under ``root`` (names starting with ``.`` and
    ``__pycache__`` skipped; symbolic links to folders not followed, to files read), sorted by
    relative POSIX path; the value is the sha256 over the lines ``path \\0 size \\0 sha256 \\n``.
    A file's sha256 is reused from the cache in ``cache_dir`` (``default_cache_dir()``) while its
    path, size and mtime_ns are unchanged; a cache that cannot be read or written is ignored.

    Raises ``DataError`` when ``root`` does not exist or cannot be read (content only when it is
    not a folder)."""
    root = Path(root)
    if not root.exists():
        raise DataError(root, "data folder not found; run `densepipe prepare` or `dvc pull`, "
                              "or set data.root")
    recorded = dvc_recorded_hash(root)
    if recorded is not None:
        return recorded
    if not root.is_dir():
        raise DataError(root, "expected a data folder, found a file")
    return _content_fingerprint(root, cache_dir if cache_dir is not None else default_cache_dir())


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/densepipe/fingerprints`` (an absolute ``XDG_CACHE_HOME`` only, as the
    XDG spec says), else ``~/.cache/densepipe/fingerprints``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "densepipe" / "fingerprints"


def dvc_recorded_hash(root: Path) -> DataFingerprint | None:
    """The ``kind="dvc"`` fingerprint DVC recorded for ``root`` (see ``data_fingerprint``), or
    ``None`` when no ``.dvc`` file or ``dvc.lock`` lists it with an ``md5``."""
    target = Path(os.path.abspath(root))
    dvc_file = target.with_name(target.name + ".dvc")
    if dvc_file.is_file():
        spec = _read_yaml(dvc_file)
        if isinstance(spec, dict):
            found = _matching_out(spec.get("outs"), dvc_file.parent, target)
            if found is not None:
                return found
    for folder in _lock_folders(Path(os.path.abspath(Path.cwd()))):
        lock = folder / "dvc.lock"
        if not lock.is_file():
            continue
        spec = _read_yaml(lock)
        if not isinstance(spec, dict):
            continue
        stages = spec.get("stages") if "schema" in spec else spec  # schema 2.0; 1.0: top level
        if not isinstance(stages, dict):
            continue
        for stage in stages.values():
            if not isinstance(stage, dict):
                continue
            wdir = stage.get("wdir")
            base = folder / wdir if isinstance(wdir, str) else folder
            found = _matching_out(stage.get("outs"), base, target)
            if found is not None:
                return found
    return None


def _read_yaml(path: Path) -> Any:
    """``path`` parsed by ``yaml.safe_load``; ``None`` when it cannot be read or parsed."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def _lock_folders(start: Path) -> Iterable[Path]:
    """``start`` and its parents, up to and including the first that holds ``.dvc/`` or ``.git``
    (every parent when none does)."""
    for folder in (start, *start.parents):
        yield folder
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return


def _matching_out(outs: Any, base: Path, target: Path) -> DataFingerprint | None:
    """The fingerprint of the entry of a DVC ``outs`` list whose ``path`` (relative to ``base``)
    is ``target`` and that has an ``md5``; ``None`` when there is none."""
    if not isinstance(outs, list):
        return None
    for out in outs:
        if not isinstance(out, dict):
            continue
        path, md5 = out.get("path"), out.get("md5")
        if not isinstance(path, str) or not isinstance(md5, str) or not md5:
            continue
        if Path(os.path.normpath(base / path)) != target:
            continue
        size, nfiles = out.get("size"), out.get("nfiles")
        files = nfiles if isinstance(nfiles, int) else (0 if md5.endswith(".dir") else 1)
        return DataFingerprint("dvc", md5, files, size if isinstance(size, int) else 0)
    return None


def _hash_file(path: Path) -> str:
    """The hex sha256 of the file's bytes (a seam for tests counting reads)."""
    return sha256_file(path)


def _data_files(root: Path) -> list[tuple[str, Path]]:
    """``(relative POSIX path, path)`` of the files under ``root``, sorted by relative path;
    hidden names and ``__pycache__`` skipped, symlinked folders not entered."""
    found: list[tuple[str, Path]] = []
    pending: list[tuple[Path, str]] = [(root, "")]
    while pending:
        folder, prefix = pending.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith(".") or entry.name == "__pycache__":
                        continue
                    rel = prefix + entry.name
                    if entry.is_dir(follow_symlinks=False):
                        pending.append((Path(entry.path), rel + "/"))
                    elif entry.is_file():  # follows a link to a file; dangling links are skipped
                        found.append((rel, Path(entry.path)))
        except OSError as e:
            raise DataError(folder, f"cannot list the data folder: {e.strerror or e}") from None
    found.sort()
    return found


def _content_fingerprint(root: Path, cache_dir: Path) -> DataFingerprint:
    cache_file = cache_dir / (hashlib.sha256(str(root.resolve()).encode()).hexdigest() + ".json")
    cached = _read_cache(cache_file)
    fresh: dict[str, list[Any]] = {}
    digest = hashlib.sha256()
    total = 0
    for rel, path in _data_files(root):
        try:
            st = path.stat()
            hit = cached.get(rel)
            if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                sha = hit[2]
            else:
                sha = _hash_file(path)
        except OSError as e:
            raise DataError(path, f"cannot read the data file: {e.strerror or e}") from None
        fresh[rel] = [st.st_size, st.st_mtime_ns, sha]
        total += st.st_size
        digest.update(os.fsencode(rel) + b"\0" + str(st.st_size).encode() + b"\0"
                      + sha.encode() + b"\n")
    if fresh != cached:
        try:
            atomic_write_json(cache_file, {"version": _CACHE_VERSION, "root": str(root.resolve()),
                                           "files": fresh}, indent=None)
        except OSError:
            pass  # a cache that cannot be written only costs time on the next call
    return DataFingerprint("content", digest.hexdigest(), len(fresh), total)


def _read_cache(path: Path) -> dict[str, list[Any]]:
    """The valid entries ``{rel: [size, mtime_ns, sha256]}`` of the cache file; ``{}`` when it is
    missing, unreadable, corrupt or of another version."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        return {}
    files = data.get("files")
    if not isinstance(files, dict):
        return {}
    return {rel: entry for rel, entry in files.items()
            if isinstance(entry, list) and len(entry) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) for v in entry[:2])
            and isinstance(entry[2], str) and _SHA256.fullmatch(entry[2])}


# -- params -----------------------------------------------------------------------------------
def trained_params(cfg: Config) -> dict[str, Any]:
    """``cfg.model_dump(mode="json")`` without ``IGNORED_KEYS``: the config that
    ``params_fingerprint`` hashes."""
    tree = _without_ignored(cfg.model_dump(mode="json"))
    for source in tree.get("data", {}).get("sources", []):
        source.pop("root", None)  # as data.root: the data fingerprint covers its content
    return tree


def _without_ignored(tree: dict[str, Any]) -> dict[str, Any]:
    for key in IGNORED_KEYS:
        *parents, last = key.split(".")
        node: Any = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return tree


def params_fingerprint(cfg: Config) -> str:
    """The hex sha256 of ``trained_params(cfg)`` as canonical JSON (sorted keys, no spaces):
    equal for two configs that train the same model, whatever their outputs' paths, devices,
    logging and tracking settings."""
    text = json.dumps(trained_params(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# -- code -------------------------------------------------------------------------------------
def code_roots() -> list[Path]:
    """The folders of the installed ``pipeline`` and ``plugins`` packages (found without
    importing ``plugins``: the core imports no plugin)."""
    roots = []
    for name in CODE_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            roots.append(Path(spec.origin).parent)
    return roots


def plugin_distributions() -> list[str]:
    """``name==version`` of every distribution other than densepipe that provides an entry point
    in ``PLUGIN_GROUPS``, sorted."""
    found = set()
    for group in PLUGIN_GROUPS:
        for ep in importlib.metadata.entry_points(group=group):
            dist = ep.dist
            if dist is None:
                continue
            name = dist.metadata["Name"] or ""
            if re.sub(r"[-_.]+", "-", name).lower() == "densepipe":
                continue
            found.add(f"{name}=={dist.version}")
    return sorted(found)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def code_fingerprint(roots: Sequence[Path] | None = None) -> str:
    """The hex sha256 over, in this order: for each folder of ``roots`` (default
    ``code_roots()``), its ``.py`` files (``__pycache__`` skipped) sorted by path, as lines
    ``<folder name>/<relative path> \\0 sha256 \\n``; then ``plugin_distributions()``; then
    ``torch==<version>`` and ``torchvision==<version>`` (``absent`` when not installed).
    Equal copies of the packages give the same value wherever they lie."""
    digest = hashlib.sha256()
    for root in (code_roots() if roots is None else roots):
        root = Path(root)
        files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*.py")
                       if "__pycache__" not in p.relative_to(root).parts and p.is_file())
        for rel, path in files:
            digest.update(os.fsencode(f"{root.name}/{rel}") + b"\0"
                          + hashlib.sha256(path.read_bytes()).hexdigest().encode() + b"\n")
    for line in plugin_distributions():
        digest.update(f"plugin\0{line}\n".encode())
    for dist in ("torch", "torchvision"):
        digest.update(f"{dist}=={_version(dist)}\n".encode())
    return digest.hexdigest()


# -- together ---------------------------------------------------------------------------------
def inputs_fingerprint(cfg: Config, *, cache_dir: Path | None = None) -> dict[str, str]:
    """``{"data": "<kind>:<value>", "params": <hex>, "code": <hex>}`` for ``cfg`` (its
    ``data.root`` relative to the working folder; with ``data.sources``, ``sources:<hex>`` over
    every source's name and data fingerprint). Raises ``DataError`` when the data is missing."""
    if cfg.data.sources:
        parts = [[src.name, str(data_fingerprint(Path(src.root), cache_dir=cache_dir))]
                 for src in cfg.data.sources]
        data = "sources:" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    else:
        data = str(data_fingerprint(Path(cfg.data.root), cache_dir=cache_dir))
    return {"data": data, "params": params_fingerprint(cfg), "code": code_fingerprint()}


def changed(old: Mapping[str, str] | None, new: Mapping[str, str]) -> list[str]:
    """The parts of ``PARTS`` (in that order) whose values differ between ``old`` and ``new``:
    every part when ``old`` is ``None``; a part missing from either side counts as changed."""
    if old is None:
        return list(PARTS)
    return [part for part in PARTS
            if part not in old or part not in new or old[part] != new[part]]
