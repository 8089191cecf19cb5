"""Data loaders for training (endless, resumable) and evaluation (one ordered pass)."""

from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.context
import os
import random
import select
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.config import Config
from pipeline.data import build_transforms, collate
from pipeline.data.formats import default_formats
from pipeline.data.reader import LABEL_KINDS
from pipeline.data.sources import views
from pipeline.errors import ConfigError, PluginError
from pipeline.registry import default_registry


class ResumableRandomSampler(Sampler[tuple[int, int]]):
    """Endless random order as ``(index, position)`` pairs, for one rank of a global batch.

    The stream is the concatenation of epochs, epoch ``e`` being ``randperm(n)`` seeded by
    ``seed + e``; ``position`` counts samples from the start of training. Step ``s`` covers the
    positions ``[s * global_batch, (s + 1) * global_batch)``, of which rank ``r`` of ``world``
    takes the ``r``-th equal slice. ``start_step`` resumes, so a resumed run, and a run on any
    number of processes, sees exactly the samples of an uninterrupted single-process run."""

    def __init__(self, n: int, *, seed: int, global_batch: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} not divisible by {world_size} ranks")
        self.n, self.seed, self.start_step = n, seed, start_step
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self._perm: tuple[int, list[int]] | None = None

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._perm[1][offset]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        share = self.global_batch // self.world_size
        step = self.start_step
        while True:
            first = step * self.global_batch + self.rank * share
            for position in range(first, first + share):
                yield self._index(position), position
            step += 1

    def __len__(self) -> int:  # endless; DataLoader only needs it for len(loader)
        return 2**62


class SourceMixSampler(Sampler[tuple[int, int]]):
    """Endless ``(index, position)`` pairs over several datasets concatenated (``MixedSources``),
    one source per global batch (UberNet): step ``s`` draws source ``k`` with probability
    ``weights[k] / sum(weights)`` from a generator seeded by ``(seed, s)``, then takes that
    source's next ``global_batch`` samples of its own endless random order (as
    ``ResumableRandomSampler``), rank ``r`` the ``r``-th slice. Depends only on the step, so a
    resumed run, or one on any number of processes, sees the batches of an uninterrupted one."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], *, seed: int,
                 global_batch: int, start_step: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} not divisible by {world_size} ranks")
        self.offsets = [sum(sizes[:k]) for k in range(len(sizes))]
        self.streams = [ResumableRandomSampler(n, seed=seed + 7919 * k, global_batch=global_batch)
                        for k, n in enumerate(sizes)]
        self.weights = torch.tensor(list(weights), dtype=torch.float64)
        self.seed, self.start_step = seed, start_step
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size

    def source_of_step(self, step: int) -> int:
        """The source step ``step`` draws its batch from."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return int(torch.multinomial(self.weights, 1, generator=g))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        share = self.global_batch // self.world_size
        drawn = [0] * len(self.streams)  # batches each source gave before start_step
        for step in range(self.start_step):
            drawn[self.source_of_step(step)] += 1
        step = self.start_step
        while True:
            k = self.source_of_step(step)
            first = drawn[k] * self.global_batch + self.rank * share
            for offset in range(first, first + share):
                # the position seeds the augmentation: unique over the whole run
                yield (self.offsets[k] + self.streams[k]._index(offset),
                       step * self.global_batch + offset - first + self.rank * share)
            drawn[k] += 1
            step += 1

    def __len__(self) -> int:
        return 2**62


class MixedSources(Dataset):
    """Several training datasets concatenated (``data.sources``): index ``offsets[k] + i`` is
    sample ``i`` of source ``k``. ``card`` is the first source's (the model's)."""

    def __init__(self, datasets: Sequence[Dataset], names: Sequence[str], weights: Sequence[float]) -> None:
        self.datasets, self.names, self.weights = list(datasets), list(names), list(weights)
        self.sizes = [len(d) for d in self.datasets]  # type: ignore[arg-type]
        self.offsets = [sum(self.sizes[:k]) for k in range(len(self.sizes))]
        self.card = self.datasets[0].card  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return sum(self.sizes)

    def __getitem__(self, index: int) -> dict:
        for k in range(len(self.datasets) - 1, -1, -1):
            if index >= self.offsets[k]:
                return self.datasets[k][index - self.offsets[k]]
        raise IndexError(index)

    @property
    def label_kinds(self) -> tuple[str, ...]:
        """The kinds any source's samples carry (``loaded_kinds``)."""
        kinds = {k for d in self.datasets for k in loaded_kinds(d)}
        return tuple(k for k in LABEL_KINDS if k in kinds)


def loaded_kinds(dataset: Dataset) -> tuple[str, ...]:
    """The label kinds ``dataset``'s samples carry: those asked for that its split has
    (``loaded_kinds`` of densepipe's reader; a format without it: every kind of its split)."""
    return tuple(getattr(dataset, "loaded_kinds", None) or dataset.label_kinds)  # type: ignore[attr-defined]


CLASS_BASED_KINDS = ("semantic", "instances", "panoptic", "keypoints")
"""Label kinds whose values are the card's classes (or keypoints): sources sharing them must
share the card's taxonomy."""


class ClassMapped(Dataset):
    """A source whose semantic labels are mapped onto the model's classes through ``lut``
    (source class index -> model class index or 255; ``semantic_lut``), after its transforms."""

    def __init__(self, dataset: Dataset, lut: torch.Tensor) -> None:
        self.dataset, self.lut = dataset, lut

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        if isinstance(sample.get("semantic"), torch.Tensor):
            sample["semantic"] = self.lut[sample["semantic"].long()]
        return sample

    def __getattr__(self, name: str) -> Any:  # card, label_kinds, image_hw ... of the source
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def semantic_lut(source: Any, model: Any, class_map: dict[str, str | None] | str, *,
                 name: str) -> torch.Tensor:
    """The 256-entry table mapping source ``name``'s semantic class indices (its card
    ``source``) onto the model card's (``model``) by ``class_map`` (``{source class: model class
    or None}``, or a YAML/JSON file of it); unnamed classes and 255 map to 255. ``ConfigError``
    naming the source and the class for a name neither card has."""
    where = f"data.sources {name!r} class_map"
    if isinstance(class_map, str):
        path = Path(class_map)
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{where}: cannot read {path} ({e})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{where}: {path} holds no mapping of class names")
        where, class_map = f"{where} ({path})", loaded
    theirs = {n: i for i, n in enumerate(source.class_names)}
    ours = {n: i for i, n in enumerate(model.class_names)}
    lut = torch.full((256,), 255, dtype=torch.int64)
    for src, dst in class_map.items():
        if str(src) not in theirs:
            raise ConfigError(f"{where}: {src!r} is not one of its classes: "
                              f"{', '.join(list(theirs)[:12])}")
        if dst is not None and str(dst) not in ours:
            raise ConfigError(f"{where}: {src!r} -> {dst!r}, which is not one of the model's "
                              f"classes: {', '.join(list(ours)[:12])}")
        lut[theirs[str(src)]] = 255 if dst is None else ours[str(dst)]
    return lut


def check_same_taxonomy(datasets: Sequence[Dataset], names: Sequence[str]) -> None:
    """Refuse a source whose class-based labels (``CLASS_BASED_KINDS``) use other classes or
    keypoints than the first source's card (the model's); a ``ClassMapped`` source's semantic
    labels are the model's already. One ``ConfigError`` line naming both sources and the first
    difference."""
    first = datasets[0].card  # type: ignore[attr-defined]
    for ds, name in zip(datasets[1:], names[1:], strict=True):
        kinds = set(loaded_kinds(ds)) & set(CLASS_BASED_KINDS)
        if isinstance(ds, ClassMapped):
            kinds.discard("semantic")
        if not kinds:
            continue
        card = ds.card  # type: ignore[attr-defined]
        for what, of in (("classes", lambda c: list(c.class_names)),
                         ("thing classes", lambda c: list(c.thing_indices)),
                         ("keypoints", lambda c: [list(k.names) for k in c.keypoints])):
            mine, model = of(card), of(first)
            if mine != model:
                raise ConfigError(
                    f"data.sources {name!r}: its {', '.join(sorted(kinds))} labels use other "
                    f"{what} than {names[0]!r} (the model's): {mine[:6]} vs {model[:6]}; train "
                    f"only tasks without classes from it (its tasks: [depth, normals, ...]) or "
                    f"relabel it into {names[0]!r}'s classes")


class PositionSeeded(Dataset):
    """``dataset[index]`` with torch's CPU generator seeded by ``(seed, position)`` around it.

    Augmentation draws from torch's global generator (``pipeline.data.transforms``); seeding it
    per stream position makes each sample's augmentation independent of the number of processes,
    of loader workers and of where a run was resumed. The caller's generator state is restored."""

    def __init__(self, dataset: Dataset, *, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, position = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + position) % 2**63)
            return self.dataset[index]


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of ``n``: one pass split across ranks, no padding,
    so every image is evaluated exactly once."""

    def __init__(self, n: int, *, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, n, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SizeBatches(Sampler[list[int]]):
    """Batches of at most ``batch_size`` indices whose images have the same ``(H, W)``.

    Sizes are taken in order of first appearance and each size's images in input order, so the
    processing order does not depend on ``batch_size`` (and equals the input order when all the
    images have one size). Why not pad mixed sizes into one batch: the padded border enters the
    receptive field of the pixels near it, so an image's prediction would depend on the other
    images of its batch; grouping keeps every prediction identical to a batch of one."""

    def __init__(self, sizes: Sequence[tuple[int, int]], *, batch_size: int,
                 indices: Sequence[int] | None = None) -> None:
        """``indices``: the dataset indices ``sizes`` belong to (default ``0..len(sizes) - 1``)."""
        if batch_size < 1:
            raise ConfigError(f"batch size {batch_size}: expected 1 or more")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, s in zip(range(len(sizes)) if indices is None else indices, sizes, strict=True):
            groups.setdefault(tuple(s), []).append(i)  # type: ignore[arg-type]
        self.batches = [idx[k:k + batch_size] for idx in groups.values()
                        for k in range(0, len(idx), batch_size)]

    @property
    def order(self) -> list[int]:
        """The indices in processing order."""
        return [i for b in self.batches for i in b]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def worker_context() -> multiprocessing.context.BaseContext | None:
    """Start loader workers from a clean forkserver, not by forking this process: a fork inherits
    the threads and handlers of whatever runs the training (a Prefect flow's workers made forked
    loader workers exit with code 1 at shutdown), a forkserver child does not."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver") if "forkserver" in methods else None


def exit_when_gone(pid: int, *, poll_s: float = 0.5) -> threading.Thread:
    """Start a daemon thread that ends this process (``os._exit(1)``) as soon as process ``pid``
    has exited; returns the thread.

    For loader workers: they must not outlive the process that owns the loader, even when it is
    killed with SIGKILL. torch's own watchdog cannot tell: under the forkserver a worker's parent
    is the forkserver, which waits for every worker to close its "alive" pipe before it exits,
    while each worker waits for the forkserver (so a killed trainer left both running for good).
    Waits on a pidfd where the OS has one (Linux 5.3+; no polling), else polls every
    ``poll_s`` seconds. On Windows (where ``os.kill(pid, 0)`` would end ``pid``) it does nothing
    and returns an unstarted thread: workers there are ended by their pipes closing."""
    if os.name == "nt":
        return threading.Thread(target=lambda: None)
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # not Linux, or an old kernel
        pidfd = None

    def watch() -> None:
        if pidfd is not None:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            while not poller.poll():  # readable once the process has exited
                pass
            os._exit(1)
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # alive, under another user (a reused pid at worst)
                pass
            time.sleep(poll_s)

    thread = threading.Thread(target=watch, name=f"exit-when-{pid}-exits", daemon=True)
    thread.start()
    return thread


def _worker_init(worker_id: int, owner_pid: int | None = None) -> None:
    """Seed Python's ``random`` from torch's per-worker seed; exit with ``owner_pid`` (the process
    that created the loader) when given."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    if owner_pid is not None:
        exit_when_gone(owner_pid)


def _worker_init_fn() -> functools.partial:
    """``worker_init_fn`` for loaders made by this process: workers die with it."""
    return functools.partial(_worker_init, owner_pid=os.getpid())


def required_label_kinds(tasks: Iterable[str]) -> tuple[str, ...]:
    """The label kinds (``LABEL_KINDS``) the tasks named need: the union of ``Task.requires``
    over them and the tasks they enable (``depends_on``, resolved by the registry), in
    ``LABEL_KINDS`` order. Unknown task: the registry's ``ConfigError``."""
    needed = {k for task in default_registry().resolve(tasks) for k in task.requires}
    return tuple(k for k in LABEL_KINDS if k in needed)


def _label_kinds_or_all(tasks: Iterable[str]) -> tuple[str, ...] | None:
    """``required_label_kinds(tasks)``, or None (every kind) for tasks the default registry does
    not know (a trainer given its own registry)."""
    try:
        return required_label_kinds(tasks)
    except (ConfigError, PluginError):
        return None


def dataset_format(cfg: Config) -> tuple[Any, Any]:
    """``(format, options)``: the ``DatasetFormat`` named by ``data.source`` and its validated
    ``data.options`` (a ``ConfigError`` line for an unknown format or a bad option)."""
    fmt = default_formats().get(cfg.data.source)
    return fmt, fmt.parse_options(cfg.data.options)


def open_split(cfg: Config, split: str, *, label_kinds: Iterable[str] | None = None) -> Any:
    """Split ``split`` of ``data.root`` read by the ``data.source`` format, untransformed."""
    fmt, options = dataset_format(cfg)
    return fmt.open(Path(cfg.data.root), split, label_kinds=label_kinds, options=options)


def train_dataset(cfg: Config, *, tasks: Iterable[str] | None = None) -> Dataset:
    """The training split with train transforms, decoding only the labels ``tasks`` (default
    ``model.tasks``, the tasks training builds) need (``required_label_kinds``). Tasks the default
    registry does not know (a trainer given its own registry) decode every kind, as before.
    With ``data.sources``: a ``MixedSources`` of each source's split, each decoding the labels of
    its own ``tasks`` (default all), checked to share one taxonomy (``check_same_taxonomy``)."""
    wanted = list(cfg.model.tasks if tasks is None else tasks)
    parts = []
    for view in views(cfg):
        kinds = _label_kinds_or_all(wanted if view.tasks is None else view.tasks)
        ds = open_split(view.cfg, view.cfg.data.train_split, label_kinds=kinds)
        ds.transforms = build_transforms(train=cfg.data.augment, image_size=cfg.data.image_size,
                                         card=ds.card, scale=cfg.data.scale_range)
        parts.append((view, ds))
    if not cfg.data.sources:
        return parts[0][1]
    datasets, names = _mapped([d for _, d in parts], [v for v, _ in parts]), [v.name for v, _ in parts]
    check_same_taxonomy(datasets, names)
    return MixedSources(datasets, names, [v.weight for v, _ in parts])


def eval_dataset(cfg: Config, split: str | None = None, *,
                 tasks: Iterable[str] | None = None) -> Dataset:
    """Split ``split`` (default ``data.val_split``) with evaluation transforms. ``tasks``: decode
    only the labels these tasks need; None (default) decodes every label kind, since the model
    evaluated may be a registered one whose tasks differ from ``model.tasks``."""
    kinds = None if tasks is None else _label_kinds_or_all(tasks)
    ds = open_split(cfg, split or cfg.data.val_split, label_kinds=kinds)
    ds.transforms = build_transforms(train=False, image_size=cfg.data.image_size, card=ds.card)
    return ds


def eval_datasets(cfg: Config, *, tasks: Iterable[str] | None = None) -> dict[str, Dataset]:
    """``{source name: eval_dataset}`` of every source's evaluation split (``data.sources``), or
    ``{"": eval_dataset(cfg)}`` for the single dataset. ``tasks``: as ``eval_dataset``; a source
    with its own ``tasks`` decodes only those tasks' labels."""
    found = [(v, eval_dataset(v.cfg, tasks=v.tasks if v.tasks is not None else tasks))
             for v in views(cfg)]
    return dict(zip([v.name for v, _ in found],
                    _mapped([d for _, d in found], [v for v, _ in found]), strict=True))


def _mapped(datasets: list[Dataset], source_views: list[Any]) -> list[Dataset]:
    """Each source with a ``class_map`` wrapped in ``ClassMapped`` onto the first one's card."""
    model_card = datasets[0].card  # type: ignore[attr-defined]
    return [ClassMapped(d, semantic_lut(d.card, model_card, v.class_map, name=v.name))  # type: ignore[attr-defined]
            if v.class_map is not None else d for d, v in zip(datasets, source_views, strict=True)]


def train_loader(cfg: Config, dataset: Dataset, *, start_step: int, rank: int = 0,
                 world_size: int = 1) -> DataLoader:
    """Endless loader of this rank's share of each global batch (``train.batch_size``); for
    ``MixedSources``, each global batch from one source (``SourceMixSampler``)."""
    sampler: Sampler[tuple[int, int]]
    if isinstance(dataset, MixedSources):
        sampler = SourceMixSampler(dataset.sizes, dataset.weights, seed=cfg.train.seed,
                                   global_batch=cfg.train.batch_size, start_step=start_step,
                                   rank=rank, world_size=world_size)
    else:
        sampler = ResumableRandomSampler(len(dataset), seed=cfg.train.seed,  # type: ignore[arg-type]
                                         global_batch=cfg.train.batch_size, start_step=start_step,
                                         rank=rank, world_size=world_size)
    return DataLoader(PositionSeeded(dataset, seed=cfg.train.seed),
                      batch_size=cfg.train.batch_size // world_size, sampler=sampler,
                      num_workers=cfg.data.num_workers, collate_fn=collate, drop_last=True,
                      worker_init_fn=_worker_init_fn(),
                      # its own generator: creating the iterator draws a seed, which must not
                      # come from torch's global generator (a resumed run would be shifted)
                      generator=torch.Generator().manual_seed(cfg.train.seed * 1000003 + start_step),
                      persistent_workers=cfg.data.num_workers > 0,
                      multiprocessing_context=worker_context() if cfg.data.num_workers else None,
                      pin_memory=torch.cuda.is_available())


def eval_loader(cfg: Config, dataset: Dataset, *, batch_size: int, rank: int = 0,
                world_size: int = 1) -> DataLoader:
    """One pass at each image's own size; under DDP each rank takes every ``world_size``-th
    image. A batch holds images of one size only (``SizeBatches`` over the dataset's
    ``image_hw``), so labels stay at their original resolution, where the metrics are computed
    (the model resizes and pads the images: ``pipeline.nn.inference_size``)."""
    shard = ShardSampler(len(dataset), rank=rank, world_size=world_size)  # type: ignore[arg-type]
    sizes = [dataset.image_hw(i) for i in shard.indices]  # type: ignore[attr-defined]
    batches = SizeBatches(sizes, batch_size=batch_size, indices=shard.indices)
    return DataLoader(dataset, batch_sampler=batches,
                      num_workers=cfg.data.num_workers, collate_fn=collate,
                      worker_init_fn=_worker_init_fn(),
                      persistent_workers=cfg.data.num_workers > 0,
                      multiprocessing_context=worker_context() if cfg.data.num_workers else None)
