"""One source of defaults: the code (``pipeline/config.py``, each task's ``Options``) holds them;
``params.yaml`` is the demo's experiment on top. Every value of ``params.yaml`` that differs from
the code's default must say so on its line (``# ...; default <the code's value>``), and per-task
head options carry a comment saying why; anything else restated there must equal the code. So
the demo's deviations are listed, explained and checked in one place, and a changed code default
or an edited ``params.yaml`` value that nobody explained fails here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Config, flatten

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def _lines_by_key(text: str) -> dict[str, str]:
    """``"section.key"`` -> the YAML line defining it (block-style mappings, 2-space indent)."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        body = line.split("#", 1)[0].rstrip()
        if not body.strip() or ":" not in body:
            continue
        indent = len(line) - len(line.lstrip())
        key = body.strip().split(":", 1)[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [key])
        out[path] = line
        stack.append((indent, key))
    return out


def _leaves(tree: dict[str, Any], keys: set[str], prefix: str = "") -> dict[str, Any]:
    """``tree`` flattened down to the config's own keys (a dict-valued key such as
    ``model.loss_weights`` is one leaf)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if path in keys or not isinstance(v, dict):
            out[path] = v
        else:
            out.update(_leaves(v, keys, path + "."))
    return out


def _render(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": ")).replace('"', "")


def test_params_yaml_differs_from_the_code_only_where_it_says_so() -> None:
    text = PARAMS.read_text()
    lines = _lines_by_key(text)
    code = flatten(Config().model_dump(mode="json"))
    yml = yaml.safe_load(text)
    ours = _leaves(yml, set(code))
    heads = {f"model.heads.{t}": v for t, v in (yml["model"].get("heads") or {}).items()}
    ours.pop("model.heads", None)
    problems = []
    for key, value in ours.items():
        assert key in code, f"params.yaml: {key} is no config key"
        default = code[key]
        if value == default or (isinstance(default, list) and value == list(default)):
            continue
        line = lines.get(key, "")
        if f"default {_render(default)}" not in line.split("#", 1)[-1]:
            problems.append(f"{key}: {value!r} (code default {_render(default)}): its line must say "
                            f"'default {_render(default)}' and why")
    for key in heads:
        if "#" not in lines.get(key, ""):
            problems.append(f"{key}: a demo choice of head options without a comment saying why")
    assert problems == [], "\n".join(problems)


def test_every_param_dvc_yaml_names_is_in_params_yaml() -> None:
    """DVC refuses a stage whose params.yaml lacks a param it lists ("Parameters ... are missing
    from 'params.yaml'"), so every key (or section) a stage lists is written in params.yaml."""
    spec = yaml.safe_load((PARAMS.parent / "dvc.yaml").read_text())
    params = yaml.safe_load(PARAMS.read_text())
    missing = []
    for name, stage in spec["stages"].items():
        for entry in stage.get("params", []):
            key = entry if isinstance(entry, str) else next(iter(entry))
            node = params
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    missing.append(f"{name}: {key}")
                    break
                node = node[part]
    assert not missing, f"dvc.yaml params not in params.yaml: {missing}"
