"""Data loaders for training (endless, resumable) and evaluation (one ordered pass)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.config import Config
from pipeline.data import build_transforms, collate, open_dataset


class ResumableRandomSampler(Sampler[int]):
    """Endless random order: epoch ``e`` is ``randperm(n)`` seeded by ``seed + e``.

    ``start`` is the number of indices already consumed (``step * batch_size``), so a resumed run
    sees exactly the samples an uninterrupted run would."""

    def __init__(self, n: int, *, seed: int, start: int = 0) -> None:
        self.n, self.seed, self.start = n, seed, start

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.n)
        while True:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            yield from perm[offset:]
            offset = 0
            epoch += 1

    def __len__(self) -> int:  # endless; DataLoader only needs it for len(loader)
        return 2**62


def worker_context() -> multiprocessing.context.BaseContext | None:
    """Start loader workers from a clean forkserver, not by forking this process: a fork inherits
    the threads and handlers of whatever runs the training (a Prefect flow's workers made forked
    loader workers exit with code 1 at shutdown), a forkserver child does not."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver") if "forkserver" in methods else None


def _worker_init(worker_id: int) -> None:
    import random

    seed = torch.initial_seed() % 2**32
    random.seed(seed)


def train_dataset(cfg: Config) -> Dataset:
    ds = open_dataset(cfg.data.root, cfg.data.train_split)
    ds.transforms = build_transforms(train=cfg.data.augment, image_size=cfg.data.image_size,
                                     card=ds.card)
    return ds


def eval_dataset(cfg: Config, split: str | None = None) -> Dataset:
    ds = open_dataset(cfg.data.root, split or cfg.data.val_split)
    ds.transforms = build_transforms(train=False, image_size=cfg.data.image_size, card=ds.card)
    return ds


def train_loader(cfg: Config, dataset: Dataset, *, start_step: int) -> DataLoader:
    sampler = ResumableRandomSampler(len(dataset), seed=cfg.train.seed,  # type: ignore[arg-type]
                                     start=start_step * cfg.train.batch_size)
    g = torch.Generator().manual_seed(cfg.train.seed * 1000003 + start_step)
    return DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler,
                      num_workers=cfg.data.num_workers, collate_fn=collate, drop_last=True,
                      worker_init_fn=_worker_init, generator=g,
                      persistent_workers=cfg.data.num_workers > 0,
                      multiprocessing_context=worker_context() if cfg.data.num_workers else None,
                      pin_memory=torch.cuda.is_available())


def eval_loader(cfg: Config, dataset: Dataset, *, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False,
                      num_workers=cfg.data.num_workers, collate_fn=collate,
                      persistent_workers=cfg.data.num_workers > 0,
                      multiprocessing_context=worker_context() if cfg.data.num_workers else None)
