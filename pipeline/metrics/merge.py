"""Helpers for ``Evaluator.merge``: combining the accumulated state of evaluators that each saw one
shard of the data (e.g. one DDP rank each), so that the merged ``compute()`` equals one pass.

- ``check_mergeable(into, other)``: ``TypeError`` unless ``other`` is exactly ``into``'s class.
- ``check_same_options(into, other, names)``: ``ValueError`` naming the first attribute that differs
  (shards must be evaluated with the same options).
- ``add_sums(into, other, names)``: ``into.<name> += other.<name>`` for running sums: numbers, numpy
  arrays and torch tensors (in place, same shape), dicts of those (key by key, same keys) and lists
  or tuples of numbers (element by element, same length). ``other`` is never modified.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch


def check_mergeable(into: object, other: object) -> None:
    """``TypeError`` (one line, naming both classes) unless ``type(other) is type(into)``."""
    if type(other) is not type(into):
        raise TypeError(f"cannot merge a {type(other).__name__} into a {type(into).__name__}: "
                        f"merge needs another {type(into).__name__}")


def check_same_options(into: object, other: object, names: Iterable[str]) -> None:
    """``ValueError`` naming the first of ``names`` whose value differs between the two objects."""
    for name in names:
        mine, theirs = getattr(into, name), getattr(other, name)
        if mine != theirs:
            raise ValueError(f"cannot merge {type(other).__name__} with {name}={theirs!r} into one "
                             f"with {name}={mine!r}: shards must share their options")


def _sum(mine: Any, theirs: Any, where: str) -> Any:
    """``mine + theirs`` for one running sum (arrays and tensors updated in place)."""
    if isinstance(mine, np.ndarray | torch.Tensor):
        if tuple(mine.shape) != tuple(theirs.shape):
            raise ValueError(f"{where}: cannot add shape {tuple(theirs.shape)} to {tuple(mine.shape)}")
        mine += theirs
        return mine
    if isinstance(mine, dict):
        if mine.keys() != theirs.keys():
            raise ValueError(f"{where}: keys {sorted(theirs)} differ from {sorted(mine)}")
        return {k: _sum(v, theirs[k], f"{where}[{k!r}]") for k, v in mine.items()}
    if isinstance(mine, list | tuple):
        if len(mine) != len(theirs):
            raise ValueError(f"{where}: cannot add {len(theirs)} values to {len(mine)}")
        pairs = enumerate(zip(mine, theirs, strict=True))
        return type(mine)(_sum(a, b, f"{where}[{i}]") for i, (a, b) in pairs)
    return mine + theirs


def add_sums(into: object, other: object, names: Iterable[str]) -> None:
    """``into.<name> += other.<name>`` for each of ``names`` (see the module doc for the types)."""
    for name in names:
        setattr(into, name, _sum(getattr(into, name), getattr(other, name), name))
