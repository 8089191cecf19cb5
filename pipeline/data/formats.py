"""Dataset formats: how a dataset as published on disk becomes densepipe samples.

``data.source`` names a registered ``DatasetFormat``; ``data.options`` holds its options
(validated by the format's ``Options`` model, like ``model.heads.<task>`` for tasks). A format
reads the official layout unchanged (no conversion step) and yields samples of the sample
contract (``pipeline.data.sample``). Formats are plugins, found through the ``densepipe.formats``
entry-point group exactly like tasks::

    # my_package/my_format.py
    from pipeline.data.formats import DatasetFormat
    from pipeline.hookspecs import hookimpl

    class MyFormat(DatasetFormat):
        name = "myformat"
        summary = "my lab's folders: rgb/*.jpg + labels/*.png"

        def open(self, root, split, *, label_kinds=None, options):
            return MyDataset(root, split, label_kinds)   # a SplitDataset

    @hookimpl
    def densepipe_register_dataset_formats():
        return [MyFormat()]

    # pyproject.toml
    [project.entry-points."densepipe.formats"]
    myformat = "my_package.my_format"

Built in: ``synthetic`` (rendered by ``prepare``), ``folder`` (densepipe's layout, or a COCO 2017
folder), ``coco``; the ``plugins.formats`` package adds the public datasets' layouts.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import pluggy
from pydantic import BaseModel, ConfigDict

from pipeline.data.label_kinds import BUILTIN_LABEL_KINDS
from pipeline.data.label_kinds import LABEL_KINDS as _LABEL_KINDS
from pipeline.errors import ConfigError, DataError, PluginError, error_line
from pipeline.config import validated_options
from PIL import Image
from pipeline import hookspecs

# Imports inside functions: pipeline.data.check imports this module, `densepipe formats` loads no
# torch, and the check is no dep of the train stage.

FORMATS_ENTRY_POINT_GROUP = "densepipe.formats"
LABEL_KINDS = _LABEL_KINDS
"""Every label kind a sample may carry (``pipeline.data.sample``): a view of the registry
(``pipeline.data.label_kinds``), the built-ins then the plugins' dense kinds."""

__all__ = ["LABEL_KINDS", "DatasetFormat", "FormatRegistry", "NoFormatOptions", "SplitDataset",
           "check_samples", "default_formats", "image_hw", "image_ids_of", "numeric_stems",
           "wanted_label_kinds"]


class NoFormatOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@runtime_checkable
class SplitDataset(Protocol):
    """What ``DatasetFormat.open`` returns: one split as a map-style torch ``Dataset``.

    ``dataset[i]`` is sample ``i`` (``pipeline.data.sample``) with ``transforms`` applied (the
    loaders set ``transforms`` after opening); images are ``uint8 3xHxW`` upright (EXIF
    orientation applied: ``pipeline.data.reader.read_image``), labels at the image's size."""

    card: Any
    """The ``DatasetCard``: class list (index space of semantic maps and instance labels)."""
    image_ids: list[int]
    """COCO image id of each sample, in sample order (unique)."""
    label_kinds: tuple[str, ...]
    """The label kinds (``LABEL_KINDS``) this split has on disk (what training may use)."""
    loaded_kinds: tuple[str, ...]
    """Those of them its samples carry (the ``label_kinds`` asked for at ``open``)."""
    transforms: Callable[[dict[str, Any]], dict[str, Any]] | None

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...

    def image_hw(self, index: int) -> tuple[int, int]:
        """Sample ``index``'s upright (H, W) before transforms, without decoding the pixels
        (evaluation batches images of one size: ``pipeline.engine.loaders``)."""
        ...


class DatasetFormat(ABC):
    """One on-disk dataset format. Stateless: options arrive with every call."""

    name: ClassVar[str]
    """The ``data.source`` value that selects it."""
    summary: ClassVar[str] = ""
    """One line for ``densepipe formats``: what layout it reads."""
    Options: ClassVar[type[BaseModel]] = NoFormatOptions
    """Pydantic model of ``data.options`` for this format (extra keys forbidden)."""

    def parse_options(self, raw: dict[str, Any] | None) -> BaseModel:
        """``data.options`` validated; a bad key or value is one ``ConfigError`` line."""
        return validated_options(self.Options, raw, key="data.options",
                                 owner=f"options of data.source {self.name}")

    @abstractmethod
    def open(self, root: Path, split: str, *, label_kinds: Iterable[str] | None = None,
             options: BaseModel) -> SplitDataset:
        """Split ``split`` of the dataset at ``root``. ``label_kinds``: decode only these (None:
        every kind the split has). A missing folder or file is a ``DataError`` naming it and
        saying what this format expects there."""

    def split_label_kinds(self, root: Path, split: str, *,
                          options: BaseModel) -> tuple[str, ...] | None:
        """The label kinds split ``split`` has, cheaply (before training: ``check_labels``);
        None when ``root`` is not a dataset of this format. Default: ``open(...).label_kinds``."""
        try:
            return tuple(self.open(root, split, options=options).label_kinds)
        except DataError:
            return None

    def ready(self, root: Path, *, options: BaseModel) -> bool:
        """Whether ``prepare`` has nothing to make (a published dataset: the folder exists)."""
        return root.is_dir()

    def check(self, root: Path, splits: Sequence[str], *, options: BaseModel,
              workers: int | None = None) -> dict[str, Any]:
        """``prepare``'s check of a folder: open each split and decode every sample (all label
        kinds), collecting every problem into one ``DataError`` (count and the first few).
        Returns ``{"root", "images": {split: n}, "splits": {split: {"images", "label_kinds"}}}``."""
        return check_samples(self, root, splits, options=options, workers=workers)


def check_samples(fmt: DatasetFormat, root: Path, splits: Sequence[str], *, options: BaseModel,
                  workers: int | None = None) -> dict[str, Any]:
    """The default ``DatasetFormat.check`` (see there); problems are reported as
    ``pipeline.data.check`` reports the folder format's."""
    from pipeline.data.check import raise_if_problems

    workers = workers or min(8, os.cpu_count() or 1)
    problems: dict[str, list[str]] = {}
    out: dict[str, dict[str, Any]] = {}
    for split in splits:
        errs = problems.setdefault(split, [])
        try:
            ds = fmt.open(root, split, options=options)
        except DataError as e:
            errs.append(str(e))
            continue
        if len(ds) == 0:
            errs.append(f"split '{split}' has no images")

        def one(i: int, ds: SplitDataset = ds) -> str | None:
            try:
                ds[i]
            except DataError as e:
                return str(e)
            return None

        with ThreadPoolExecutor(max_workers=workers) as pool:
            errs.extend(p for p in pool.map(one, range(len(ds))) if p)
        out[split] = {"images": len(ds), "label_kinds": list(ds.label_kinds)}
    raise_if_problems(root, problems)
    return {"root": str(root), "images": {s: v["images"] for s, v in out.items()}, "splits": out}


def wanted_label_kinds(label_kinds: Iterable[str] | None) -> frozenset[str]:
    """``open``'s ``label_kinds`` checked against ``LABEL_KINDS`` (None: all of them); a string
    or an unknown kind is a ``ValueError``."""
    if label_kinds is None:
        return frozenset(LABEL_KINDS)
    if isinstance(label_kinds, str):
        raise ValueError(f"label_kinds must be a collection of label kinds, got the string "
                         f"{label_kinds!r} (write ({label_kinds!r},))")
    wanted = frozenset(label_kinds)
    unknown = sorted(wanted - set(BUILTIN_LABEL_KINDS))  # plugins' kinds: ask the registry
    if unknown:
        unknown = sorted(wanted - set(LABEL_KINDS))
    if unknown:
        raise ValueError(f"unknown label kind(s) {', '.join(map(repr, unknown))}: expected some "
                         f"of {', '.join(LABEL_KINDS)}")
    return wanted


def numeric_stems(stems: Sequence[str]) -> bool:
    """Whether every file stem is an integer and no two are the same integer."""
    return all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems)


def image_ids_of(stems: Sequence[str]) -> list[int]:
    """COCO image ids of files named by ``stems`` (in sample order), the rule every folder-reading
    format follows: the stems themselves when ``numeric_stems``, else 1..N in order."""
    return [int(s) for s in stems] if numeric_stems(stems) else list(range(1, len(stems) + 1))


def image_hw(path: str | os.PathLike[str]) -> tuple[int, int]:
    """The upright (H, W) of an image file from its header (EXIF orientations 5-8 swap the
    sides), without decoding the pixels. ``DataError`` naming the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except FileNotFoundError as e:
        raise DataError(Path(path), "image file not found") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(Path(path), f"not an image file PIL can read ({e})") from e
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------
class FormatRegistry:
    """The dataset formats of this process: the ``densepipe.formats`` entry points (built-ins
    included) plus ``plugins`` given directly. A plugin that fails to import or register is
    recorded (``failed``: name -> one line) and named when its format is asked for."""

    def __init__(self, *, entry_points: bool = True, plugins: Iterable[Any] = ()) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.formats: dict[str, DatasetFormat] = {}
        self.failed: dict[str, str] = {}
        if entry_points:
            for ep in hookspecs.unique_entry_points(FORMATS_ENTRY_POINT_GROUP):
                try:
                    plugin = ep.load()
                    if not self.pm.is_registered(plugin):
                        self.pm.register(plugin, name=f"format:{ep.name}")
                except Exception as e:  # noqa: BLE001 - reported when the format is asked for
                    self.failed[ep.name] = f"{ep.name} = {ep.value}: {error_line(e)}"
        for i, plugin in enumerate(plugins):
            if not self.pm.is_registered(plugin):  # also found through its entry point
                self.pm.register(plugin, name=getattr(plugin, "__name__", None) or f"format-{i}")
        for impl in self.pm.hook.densepipe_register_dataset_formats.get_hookimpls():
            try:
                found = list(impl.function() or [])
                for fmt in found:
                    if not isinstance(fmt, DatasetFormat) or not getattr(fmt, "name", None):
                        raise PluginError(f"{fmt!r} is not a named pipeline.data.formats.DatasetFormat")
            except Exception as e:  # noqa: BLE001 - reported per plugin
                self.failed[impl.plugin_name] = error_line(e)
                continue
            for fmt in found:
                if fmt.name in self.formats:
                    self.failed[fmt.name] = (f"{impl.plugin_name}: data.source name {fmt.name!r} "
                                             "already taken")
                    continue
                self.formats[fmt.name] = fmt

    @property
    def names(self) -> list[str]:
        return sorted(self.formats)

    def get(self, name: str) -> DatasetFormat:
        if name in self.formats:
            return self.formats[name]
        if name in self.failed:
            raise PluginError(f"data.source {name!r} is unusable: {self.failed[name]}")
        raise ConfigError(f"data.source: unknown dataset format {name!r}; allowed: "
                          f"{', '.join(self.names) or 'none'}")


_default: FormatRegistry | None = None


def default_formats() -> FormatRegistry:
    """The process-wide format registry (entry points loaded once)."""
    global _default
    if _default is None:
        _default = FormatRegistry()
    return _default
