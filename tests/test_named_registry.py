"""The one name -> object registry behind backbones, decoders, upsamplers, losses and weightings."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.named_registry import NamedRegistry


def _b(*, size: int, depth: int = 1) -> tuple[int, int]:
    return size, depth


def _a(x: int, *, size: int, scale: float = 1.0) -> tuple[int, float]:
    return size, scale


def test_register_lookup_names_and_mapping() -> None:
    reg: NamedRegistry = NamedRegistry("widget", required=("size",))
    reg.register("b")(_b)
    assert reg.add("a", _a) is _a
    assert reg.names == ["a", "b"] and list(reg) == ["b", "a"] and "a" in reg and len(reg) == 2
    assert reg.lookup("a") is _a and reg["b"] is _b and dict(reg) == {"b": _b, "a": _a}
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.add("a", _b)
    with pytest.raises(ValueError, match="widget 'c' must accept keyword arguments size"):
        reg.add("c", lambda *, depth: depth)
    copy = reg.copy()
    copy.add("d", _b)
    assert "d" not in reg and copy.names == ["a", "b", "d"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "unknown widget 'z'; allowed: a, b"),
    ({"what": "model.widget", "sort": False, "allowed_suffix": ", w:<name>"},
     "model.widget: unknown widget 'z'; allowed: b, a, w:<name>"),
])
def test_unknown_name_is_one_line_config_error(kwargs: dict, message: str) -> None:
    reg: NamedRegistry = NamedRegistry("widget", entries={"b": _b, "a": _a}, **kwargs)
    with pytest.raises(ConfigError) as info:
        reg.lookup("z")
    assert str(info.value) == message


def test_options_from_signature() -> None:
    reg: NamedRegistry = NamedRegistry("widget", positional=("x",), required=("size",),
                                       entries={"a": _a, "b": _b})
    assert reg.options("a") == ["scale"] and reg.options("b") == ["depth"]
    assert NamedRegistry("widget", keyword_only=True, entries={"a": _a}).options("a") == ["size", "scale"]
    assert NamedRegistry("widget", entries={"a": _a}).options("a") == ["x", "size", "scale"]
