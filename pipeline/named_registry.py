"""One small name -> object registry for the pluggable building blocks (backbones, decoders,
upsamplers, dense and regression losses, loss weightings).

A :class:`NamedRegistry` is a read-only ``Mapping`` (``name in REG``, ``sorted(REG)``, ``REG[name]``)
that adds entries through ``@REG.register("name")`` or ``REG.add("name", obj)`` (a second entry
under one name is a ``ValueError``), looks them up with ``REG.lookup(name)`` (a one-line
``ConfigError`` ``"[<what>: ]unknown <kind> 'x'; allowed: a, b, c"`` for an unknown name) and
reads the keyword options an entry takes from its signature (``REG.options(name)``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from pipeline.errors import ConfigError

T = TypeVar("T")

_KEYWORD_KINDS = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class NamedRegistry(Mapping[str, T], Generic[T]):
    """Named entries of one kind (callables: builders, loss functions or classes).

    Args:
        kind: the noun in messages (``"decoder"``, ``"dense loss"``).
        what: prefix of the unknown-name error (``"train.loss_weighting.method"``); none if empty.
        sort: list names sorted (default) or in registration order in :attr:`names` and errors.
        allowed_suffix: appended to the allowed names of the unknown-name error.
        positional: parameters the caller passes positionally; never options.
        required: keywords the caller always passes: every entry must accept them (checked when
            added, unless it takes ``**kwargs``); never options.
        keyword_only: options are keyword-only parameters only (else positional-or-keyword too).
        entries: initial ``{name: obj}``.
    """

    def __init__(self, kind: str, *, what: str = "", sort: bool = True, allowed_suffix: str = "",
                 positional: Iterable[str] = (), required: Iterable[str] = (),
                 keyword_only: bool = False, entries: Mapping[str, T] | None = None) -> None:
        self.kind, self.what, self.sort, self.allowed_suffix = kind, what, sort, allowed_suffix
        self.positional, self.required = tuple(positional), tuple(required)
        self.keyword_only = keyword_only
        self._entries: dict[str, T] = {}
        for name, obj in (entries or {}).items():
            self.add(name, obj)

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` under ``name``; ``ValueError`` if taken or missing a required keyword."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        missing = [key for key in self.required if not _accepts_keyword(obj, key)]
        if missing:
            raise ValueError(f"{self.kind} {name!r} must accept keyword arguments {', '.join(missing)}")
        self._entries[name] = obj
        return obj

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda obj: self.add(name, obj)

    @property
    def names(self) -> list[str]:
        return sorted(self._entries) if self.sort else list(self._entries)

    def lookup(self, name: str) -> T:
        """The entry ``name``; one-line ``ConfigError`` listing the allowed names if unknown."""
        if name not in self._entries:
            prefix = f"{self.what}: " if self.what else ""
            raise ConfigError(f"{prefix}unknown {self.kind} {name!r}; "
                              f"allowed: {', '.join(self.names)}{self.allowed_suffix}")
        return self._entries[name]

    def options(self, name: str) -> list[str]:
        """Keyword options entry ``name`` takes beyond the positional and required ones, in
        signature order."""
        kinds = _KEYWORD_KINDS[:1] if self.keyword_only else _KEYWORD_KINDS
        fixed = {*self.positional, *self.required}
        params = inspect.signature(self.lookup(name)).parameters.values()
        return [p.name for p in params if p.kind in kinds and p.name not in fixed]

    def copy(self) -> NamedRegistry[T]:
        """An independent registry with the same settings and entries (e.g. for tests)."""
        return NamedRegistry(self.kind, what=self.what, sort=self.sort,
                             allowed_suffix=self.allowed_suffix, positional=self.positional,
                             required=self.required, keyword_only=self.keyword_only,
                             entries=self._entries)

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"NamedRegistry({self.kind!r}, names={self.names})"


def _accepts_keyword(obj: Any, key: str) -> bool:
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):  # no signature to read: trust it
        return True
    return any(p.kind is p.VAR_KEYWORD or (p.name == key and p.kind in _KEYWORD_KINDS) for p in params)


__all__ = ["NamedRegistry"]
