"""Dense label kinds: per-pixel label maps that the reader, the transforms and ``collate`` handle
without knowing them by name.

A dense label kind is a map aligned with the image (``HxW`` or ``CxHxW``): the built-ins are
``semantic``, ``depth`` and ``normals``. A new task that needs another per-pixel label (optical
flow, boundaries from files, ...) registers its kind next to the task, in the same plugin module
(the ``densepipe.tasks`` entry-point group), and no core code changes:

- the ``folder`` format (densepipe's layout) reads ``<root>/<kind>/<split>/<image stem><suffix>``
  with the kind's ``decode``, and reports the kind in ``label_kinds`` when such a file exists;
- the transforms resample it with nearest neighbour, crop/pad it with ``unknown``, mirror it
  (then ``on_flip``), and a zooming scale-crop calls ``on_zoom``;
- ``collate`` stacks it, fills samples lacking it with ``unknown`` and sets ``has[kind]``;
- ``Task.requires`` may name it.

The structured kinds ``instances``, ``keypoints`` and ``panoptic`` (boxes, per-instance masks,
segment lists) are not dense kinds: they keep their dedicated code in the reader and transforms.

Registering a kind (plugin author's contract)::

    # my_package/my_task.py  (listed under [project.entry-points."densepipe.tasks"])
    import numpy as np
    import torch
    from pipeline.data.label_kinds import DenseLabelKind
    from pipeline.data.reader import read_png
    from pipeline.hookspecs import hookimpl

    def decode_boundary(path, hw, options):
        arr, _mode = read_png(path, "boundary PNG")    # DataError naming the file if unreadable
        return arr                                     # HxW uint8: 0, 1, 255 = unknown

    BOUNDARY = DenseLabelKind("boundary", channels=0, dtype=torch.uint8, unknown=255,
                              decode=decode_boundary)

    @hookimpl
    def densepipe_register_label_kinds():
        return [BOUNDARY]

    @hookimpl
    def densepipe_register_tasks():
        return [BoundaryTask()]                        # requires = ("boundary",)

Rules: kind names are unique across built-ins and plugins (a second provider of a name is an
error naming both; see ``pipeline.registry.TaskRegistry``); ``decode`` returns an array of the
kind's shape at the image's size ``hw`` (the reader checks it and raises a ``DataError`` naming
the file otherwise) and is converted to ``dtype``; the functions must be module-level (a dataset
is pickled into DataLoader workers, which find plugin kinds through the entry points again).

This module imports no torch at import time (``import pipeline.data.formats`` stays light).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import error_line
from pipeline.hookspecs import LoadedPlugins, load_task_plugins
from pipeline.data.card import IGNORE_INDEX

# Imports inside functions: torch, and the reader (which imports this module), when a kind is
# built or decoded: `import pipeline.data.formats` stays light.

if TYPE_CHECKING:
    import numpy as np
    import torch

STRUCTURED_KINDS = ("instances", "panoptic", "keypoints")
"""Label kinds with their own code (not dense maps): instances (+ keypoints inside them), panoptic."""
BUILTIN_PROVIDER = "pipeline.data.label_kinds (built in)"

_RESERVED = frozenset(("image", "image_id", "file_name", "meta", "has", "image_ids", "file_names",
                       "images", "annotations"))  # sample/batch keys, layout folders
Decoder = Callable[[Path, "tuple[int, int] | None", Mapping[str, Any]], "np.ndarray"]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _no_zoom(t: torch.Tensor, factor: float) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class DenseLabelKind:
    """One dense (per-pixel) label kind: how it is decoded, transformed and batched.

    ``interpolation`` is ``"nearest"`` for every label kind: resampling picks one source pixel
    (pixel-centre rule), never blends neighbours, so no made-up class index, depth between a
    foreground and a background surface, or half-length normal appears along an edge."""

    name: str
    """The sample key, the layout's folder name (``<root>/<name>/<split>/``) and what
    ``Task.requires`` names."""
    dtype: torch.dtype
    """dtype of the sample tensor (``decode``'s array is converted to it)."""
    unknown: float | int
    """Value meaning "no label": fills padding of crops and samples of a batch lacking the map."""
    decode: Decoder
    """``decode(path, hw, options) -> np.ndarray``: one label file for an image of size ``hw``
    (None: any), as ``HxW`` (``channels == 0``) or ``CxHxW``. ``options``: the dataset's reading
    options, ``card`` (the ``DatasetCard``), ``depth_encoding``, ``semantic_values`` (the
    ``folder`` format's ``data.options``); a decoder reads what it needs. Raises ``DataError``
    naming the file for a bad file."""
    channels: int = 0
    """0: an ``HxW`` map; C: a ``CxHxW`` map."""
    file_suffixes: tuple[str, ...] | Callable[[Mapping[str, Any]], tuple[str, ...]] = (".png",)
    """Suffixes of its files, the first found per image stem wins; or a function of the reading
    options (depth: by ``depth_encoding``)."""
    on_flip: Callable[[torch.Tensor], torch.Tensor] = _identity
    """Applied to the map after it was mirrored left-right (normals: negate x). Default: as is."""
    on_zoom: Callable[[torch.Tensor, float], torch.Tensor] = _no_zoom
    """``on_zoom(t, factor)`` after ``RandomScaleCrop`` zoomed by ``factor`` (> 1: the scene looks
    closer; depth is divided by it). Default: as is."""
    interpolation: str = "nearest"
    """Always ``"nearest"`` (see the class doc); anything else is refused."""

    def __post_init__(self) -> None:
        if not self.name or not self.name.isidentifier():
            raise ValueError(f"label kind name must be an identifier, got {self.name!r}")
        if self.name in STRUCTURED_KINDS or self.name in _RESERVED:
            raise ValueError(f"label kind name {self.name!r} is reserved")
        if self.interpolation != "nearest":
            raise ValueError(f"label kind {self.name!r}: interpolation must be 'nearest' (labels "
                             f"are never blended), got {self.interpolation!r}")
        if self.channels < 0:
            raise ValueError(f"label kind {self.name!r}: channels must be >= 0")

    def suffixes(self, options: Mapping[str, Any]) -> tuple[str, ...]:
        """The file suffixes for these reading options."""
        s = self.file_suffixes
        return tuple(s(options)) if callable(s) else tuple(s)


# ------------------------------------------------------------------------------------------------
# built-in kinds (decoders live in pipeline.data.reader; imported when called)
# ------------------------------------------------------------------------------------------------
def _decode_semantic(path: Path, hw: tuple[int, int] | None, options: Mapping[str, Any]) -> np.ndarray:
    from pipeline.data.reader import read_label, semantic_classes

    sem = read_label(path, "semantic", hw)
    return semantic_classes(sem, path, options["card"],
                            semantic_values=options.get("semantic_values", "index"))


def _decode_depth(path: Path, hw: tuple[int, int] | None, options: Mapping[str, Any]) -> np.ndarray:
    from pipeline.data.reader import read_depth

    return read_depth(path, hw, options.get("depth_encoding", "mm"))


def _depth_suffixes(options: Mapping[str, Any]) -> tuple[str, ...]:
    from pipeline.data.reader import _DEPTH_SUFFIXES

    return _DEPTH_SUFFIXES[options.get("depth_encoding", "mm")]


def _decode_normals(path: Path, hw: tuple[int, int] | None, options: Mapping[str, Any]) -> np.ndarray:
    from pipeline.data.reader import _decode_normals as decode
    from pipeline.data.reader import read_label

    return decode(read_label(path, "normals", hw))


def _depth_zoom(t: torch.Tensor, factor: float) -> torch.Tensor:
    return t / factor  # unknown (0) stays 0


def _normals_flip(t: torch.Tensor) -> torch.Tensor:
    import torch

    return t * torch.tensor([-1.0, 1.0, 1.0], dtype=t.dtype).view(3, 1, 1) + 0.0


_BUILTIN: dict[str, DenseLabelKind] | None = None
BUILTIN_DENSE_NAMES = ("semantic", "depth", "normals")


def builtin_dense_kinds() -> dict[str, DenseLabelKind]:
    """``semantic`` (int64 HxW class indices, 255 unknown), ``depth`` (float32 HxW metres, 0
    unknown, divided by the zoom), ``normals`` (float32 3xHxW, 0 unknown, x negated on a flip)."""
    global _BUILTIN
    if _BUILTIN is None:
        import torch

        kinds = (
            DenseLabelKind("semantic", dtype=torch.int64, unknown=IGNORE_INDEX,
                           decode=_decode_semantic),
            DenseLabelKind("depth", dtype=torch.float32, unknown=0.0, decode=_decode_depth,
                           file_suffixes=_depth_suffixes, on_zoom=_depth_zoom),
            DenseLabelKind("normals", channels=3, dtype=torch.float32, unknown=0.0,
                           decode=_decode_normals, on_flip=_normals_flip),
        )
        _BUILTIN = {k.name: k for k in kinds}
    return _BUILTIN


def collect_dense_kinds(provided: Sequence[tuple[str, Sequence[Any]]]
                        ) -> tuple[dict[str, DenseLabelKind], dict[str, str]]:
    """Merge the built-ins with ``provided`` (``(provider, kinds)`` per plugin, in order).

    Returns ``(kinds, errors)``: the usable kinds by name, built-ins first; ``errors``: provider
    -> one line for each plugin whose kinds are refused (not a ``DenseLabelKind``, or a name
    already provided: the line names both providers; the first provider keeps the name)."""
    kinds: dict[str, DenseLabelKind] = dict(builtin_dense_kinds())
    owner = dict.fromkeys(kinds, BUILTIN_PROVIDER)
    errors: dict[str, str] = {}
    for provider, found in provided:
        for kind in found:
            if not isinstance(kind, DenseLabelKind):
                errors[provider] = f"{kind!r} is not a pipeline.data.label_kinds.DenseLabelKind"
                break
            if kind.name in kinds:
                errors[provider] = (f"label kind {kind.name!r} of {provider} is already provided "
                                    f"by {owner[kind.name]}")
                continue
            kinds[kind.name] = kind
            owner[kind.name] = provider
    return kinds, errors


# ------------------------------------------------------------------------------------------------
# the process's kinds (the task registry's plugins)
# ------------------------------------------------------------------------------------------------
def plugin_label_kinds(loaded: LoadedPlugins
                       ) -> tuple[dict[str, DenseLabelKind], list[tuple[str, str, str, str]]]:
    """The dense kinds of the built-ins and of ``loaded``'s plugins (``collect_dense_kinds``), and
    ``(plugin name, provider, entry point, one-line error)`` for each plugin whose hook raised or
    whose kinds are refused."""
    provided: list[tuple[str, list[Any]]] = []
    plugin_of: dict[str, tuple[str, str]] = {}  # entry point -> (plugin name, provider)
    failures: list[tuple[str, str, str, str]] = []
    for impl in loaded.pm.hook.densepipe_register_label_kinds.get_hookimpls():
        provider, where = loaded.where(impl.plugin_name)
        plugin_of[where] = (impl.plugin_name, provider)
        try:
            provided.append((where, list(impl.function() or [])))
        except Exception as e:  # noqa: BLE001 - reported per plugin
            failures.append((impl.plugin_name, provider, where,
                             f"densepipe_register_label_kinds failed: {error_line(e)}"))
    kinds, errors = collect_dense_kinds(provided)
    failures += [(*plugin_of[where], where, error) for where, error in errors.items()]
    return kinds, failures


_process_kinds: dict[str, DenseLabelKind] | None = None


def dense_kinds() -> Mapping[str, DenseLabelKind]:
    """Every registered dense kind by name: the built-ins, then those of the ``densepipe.tasks``
    plugins in registration order (loaded once per process; ``densepipe tasks`` names a plugin
    whose kinds are refused)."""
    global _process_kinds
    if _process_kinds is None:
        _process_kinds = plugin_label_kinds(load_task_plugins())[0]
    return _process_kinds


def dense_kind(name: str) -> DenseLabelKind | None:
    """The registered dense kind ``name``, or None (a structured kind, or no such kind). A
    built-in is found without loading the plugins."""
    kind = builtin_dense_kinds().get(name)
    if kind is not None or name in STRUCTURED_KINDS:
        return kind
    return dense_kinds().get(name)


BUILTIN_LABEL_KINDS = ("semantic", "instances", "panoptic", "depth", "normals", "keypoints")
"""The built-in label kinds, in ``LABEL_KINDS`` order."""


def label_kinds() -> tuple[str, ...]:
    """Every label kind a sample may carry, in a stable order: the built-ins (semantic, instances,
    panoptic, depth, normals, keypoints), then the plugins' dense kinds in registration order."""
    return BUILTIN_LABEL_KINDS + tuple(k for k in dense_kinds() if k not in BUILTIN_LABEL_KINDS)


def ordered(kinds: Iterable[str]) -> tuple[str, ...]:
    """``kinds`` in ``LABEL_KINDS`` order, unknown names dropped (the plugins are asked only when
    a name is no built-in one)."""
    kinds = set(kinds)
    order = BUILTIN_LABEL_KINDS if kinds <= set(BUILTIN_LABEL_KINDS) else label_kinds()
    return tuple(k for k in order if k in kinds)


class KindsView(Sequence[str]):
    """A read-only tuple-like view that asks the registry on every use (``LABEL_KINDS``,
    ``DENSE_KEYS``...): a plugin's kind is in it once its plugin is registered."""

    def __init__(self, names: Callable[[], tuple[str, ...]], doc: str) -> None:
        self._names = names
        self.__doc__ = doc

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __getitem__(self, i: Any) -> Any:
        return self._names()[i]

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, (tuple, list, KindsView)) else other)

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        return repr(self._names())


class UnknownValues(Mapping[str, Any]):
    """``{dense kind: unknown value}`` of the registered dense kinds (``UNKNOWN_VALUE``)."""

    def __getitem__(self, name: str) -> Any:
        kind = dense_kind(name)
        if kind is None:
            raise KeyError(name)
        return kind.unknown

    def __iter__(self) -> Iterator[str]:
        return iter(dense_kinds())

    def __len__(self) -> int:
        return len(dense_kinds())


LABEL_KINDS = KindsView(label_kinds, "Every label kind a sample may carry (``label_kinds()``).")
DENSE_KINDS = KindsView(lambda: tuple(dense_kinds()), "The registered dense kinds' names.")

__all__ = ["BUILTIN_DENSE_NAMES", "BUILTIN_LABEL_KINDS", "DENSE_KINDS", "LABEL_KINDS", "STRUCTURED_KINDS",
           "DenseLabelKind", "KindsView", "UnknownValues", "builtin_dense_kinds",
           "collect_dense_kinds", "dense_kind", "dense_kinds", "label_kinds", "ordered",
           "plugin_label_kinds"]
