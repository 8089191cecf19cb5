"""``SampleDataset``: the map-style ``Dataset`` base every dataset format's split can build on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Sample = dict[str, Any]


class SampleDataset(torch.utils.data.Dataset):
    """Indexing for a split: ``dataset[i]`` is ``load(i)`` (a sample of the sample contract,
    untransformed) with ``transforms`` applied; negative indices count from the end, others out of
    range are an ``IndexError``. Subclasses implement ``__len__`` and ``load``."""

    transforms: Callable[[Sample], Sample] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> Sample:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"sample index {index} out of range (dataset has {n})")
        sample = self.load(index % n)
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample
