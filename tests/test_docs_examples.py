"""The code examples of the manual (``docs/*.md``) and ``README.md``, checked for real.

Each fenced block is read as the site shows it (``--8<--`` snippet lines replaced by the file they
name) and checked by its language:

- ``bash``/``sh``/``console``: every ``densepipe`` command names a command that exists and only
  options that command accepts (the CLI as ``main()`` builds it, plugin commands included); every
  ``--set KEY=VALUE`` (and ``dvc exp run -S``) is a key and value ``load_config`` accepts; every
  ``make`` target is in the Makefile. The cheap read-only commands (``tasks``, ``formats``,
  ``config``) run for real in a temporary folder holding a copy of ``params.yaml``.
- ``python``: compiles; runs in a temporary folder unless ``NOT_RUN`` lists it with a reason
  (then its imports still run), so a new block is run by default.
- ``yaml``: parses; a block with a top-level config section (``data``, ``model``, ...) loads with
  ``load_config`` and passes ``check_config``, as ``densepipe train`` checks a params file.
- ``json`` and ``toml``: parse; a ``densepipe.*`` entry-point group is one densepipe reads.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import sys
import types
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT

PAGES = [*sorted((REPO_ROOT / "docs").glob("*.md")), REPO_ROOT / "README.md"]
SHELL = {"bash", "sh", "shell", "console"}
RUN_FOR_REAL = {"tasks", "formats", "config"}
"""``densepipe`` commands that only read: the examples using them are run, not just parsed."""

NOT_RUN: dict[tuple[str, str], str] = {
    ("docs/plugins.md", "...                      # build_head"):
        "an outline of the Task contract: `...` stands for the methods (the whole example, included "
        "below it on the page, runs)",
    ("docs/deploy.md", "ort.InferenceSession"):
        "needs model.onnx and model.json from `densepipe export` of a trained checkpoint, and a photo",
    ("docs/deploy.md", "mlflow.pyfunc.load_model"):
        "needs a registered model in an MLflow store at an absolute path, and a photo",
    ("docs/orchestration.md", "sweep_flow"):
        "trains the six runs of a sweep on a local Dask cluster (tests/test_prefect_flows.py runs sweeps)",
}
"""Python blocks that cannot run as they stand: (page, text the block contains) -> why. They are
still compiled and their imports run."""

ENTRY_POINT_GROUPS = {"densepipe.tasks", "densepipe.formats", "densepipe.commands", "densepipe.hooks"}
"""The entry-point groups densepipe reads (``pipeline.hookspecs``, ``pipeline.data.formats``,
``pipeline.cli``)."""


@dataclass(frozen=True)
class Block:
    """One fenced code block: its page (relative to the repository), the line of its opening
    fence, its language and its text (dedented, snippets included)."""

    page: str
    line: int
    lang: str
    text: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_SNIPPET = re.compile(r'^\s*--8<--\s+"([^"]+)"\s*$')


def read_blocks(path: Path) -> list[Block]:
    """The fenced blocks of the Markdown file ``path``."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        j = i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence)
                                      and not lines[j].strip().strip(fence[0])):
            j += 1
        body = []
        for raw in lines[i + 1:j]:
            snippet = _SNIPPET.match(raw)
            body.append((REPO_ROOT / snippet.group(1)).read_text() if snippet else raw[indent:])
        found.append(Block(str(path.relative_to(REPO_ROOT)), i + 1, lang, "\n".join(body) + "\n"))
        i = j + 1
    return found


ALL_BLOCKS = [b for page in PAGES for b in read_blocks(page)]


def blocks_of(*langs: str) -> list[Block]:
    return [b for b in ALL_BLOCKS if b.lang in langs]


# -- shell commands --------------------------------------------------------------------------------
def shell_lines(block: Block) -> list[str]:
    """The command lines of a shell block: continuations joined, a ``$ `` prompt stripped (in a
    ``console`` block only prompted lines are commands, the rest is output)."""
    joined: list[str] = []
    pending = ""
    for raw in block.text.splitlines():
        line = pending + raw
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        stripped = line.strip()
        if stripped.startswith("$ "):
            joined.append(stripped[2:])
        elif block.lang != "console" and stripped:
            joined.append(stripped)
    return joined


def tokens(line: str) -> list[str]:
    """Shell words of ``line`` without its comment (a whitespace split where quotes do not
    balance, e.g. an apostrophe in a ``<placeholder's text>``)."""
    try:
        return shlex.split(line, comments=True)
    except ValueError:
        return re.sub(r"(^|\s)#.*$", "", line).split()


@dataclass(frozen=True)
class Command:
    """A ``densepipe`` (or ``make``, ``dvc``) command of a block, ``args`` after the program."""

    where: str
    program: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {self.program} {' '.join(self.args)}"


def _expand(words: list[str], variables: dict[str, str]) -> list[str]:
    """``$NAME`` / ``${NAME}`` replaced by a variable the block set earlier (unquoted: split)."""
    out: list[str] = []
    for word in words:
        whole = re.fullmatch(r"\$\{?(\w+)\}?", word)
        if whole and whole.group(1) in variables:
            out.extend(tokens(variables[whole.group(1)]))
        else:
            out.append(re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), word))
    return out


def _is_densepipe(words: list[str], i: int) -> bool:
    word = words[i]
    return word == "densepipe" or word.endswith("/densepipe") or (
        word == "pipeline.cli" and i > 0 and words[i - 1] == "-m")


def commands(block: Block) -> list[Command]:
    """The ``densepipe``, ``make`` and ``dvc`` commands of a shell block; ``VAR=...`` lines set
    variables that later ``$VAR`` words expand to, ``VAR=x densepipe ...`` is a densepipe
    command."""
    variables: dict[str, str] = {}
    found: list[Command] = []
    for line in shell_lines(block):
        words = tokens(line)
        assigns = [w for w in words if re.match(r"^[A-Za-z_]\w*=", w)]
        if words and len(assigns) == len(words):
            variables.update(w.split("=", 1) for w in words)
            continue
        words = _expand(words, variables)
        for i in range(len(words)):
            if _is_densepipe(words, i):
                found.append(Command(str(block), "densepipe", tuple(_until_operator(words[i + 1:]))))
                break
        else:
            start = len(assigns) if words[:len(assigns)] == assigns else 0
            if words[start:start + 1] in (["make"], ["dvc"]):
                found.append(Command(str(block), words[start], tuple(_until_operator(words[start + 1:]))))
    return found


def _until_operator(words: list[str]) -> list[str]:
    """Words up to a shell operator (``|``, ``&&``, ``;``, a redirect); a ``|`` inside an
    optional ``[a | b]`` group separates alternatives instead."""
    out: list[str] = []
    depth = 0
    for word in words:
        if depth == 0 and word in {"|", "||", "&&", ";", ">", ">>", "2>", "<"}:
            break
        if word.startswith("[-") or depth:
            depth += word.count("[") - word.count("]")
        out.append(word)
    return out


def unbracket(args: tuple[str, ...] | list[str]) -> list[str]:
    """``args`` without the brackets of optional ``[--flag VALUE]`` groups (a YAML list in a value,
    ``model.tasks=[semantic]``, keeps its own)."""
    out: list[str] = []
    for word in args:
        word = word[1:] if word.startswith("[-") else word
        extra = word.count("]") - word.count("[")
        while extra > 0 and word.endswith("]"):
            word, extra = word[:-1], extra - 1
        out.append(word)
    return out


def options_and_sets(args: tuple[str, ...], set_flags: tuple[str, ...] = ("--set", "-s")
                     ) -> tuple[list[str], list[str]]:
    """The options (``--name``, ``-x``) among ``args`` and the values given to ``set_flags``."""
    plain = unbracket(args)
    options: list[str] = []
    sets: list[str] = []
    for i, word in enumerate(plain):
        if not re.match(r"^--?[A-Za-z]", word):
            continue
        name, eq, value = word.partition("=")
        options.append(name)
        if name in set_flags:
            sets.append(value if eq else plain[i + 1] if i + 1 < len(plain) else "")
    return options, sets


def without_optional(args: tuple[str, ...]) -> list[str]:
    """``args`` without the ``[--flag ...]`` groups (what the command is when run as shown)."""
    out: list[str] = []
    depth = 0
    for word in args:
        if word.startswith("[-") or depth:
            depth += word.count("[") - word.count("]")
            continue
        out.append(word)
    return out


@cache
def cli_options() -> dict[str, set[str]]:
    """``{command: the options it accepts}`` of ``densepipe`` as ``main()`` builds it: the core
    commands and those the ``densepipe.commands`` entry points add."""
    import typer

    from pipeline import cli

    cli._add_plugin_commands()
    group = typer.main.get_command(cli.app)
    return {name: {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}
            for name, cmd in group.commands.items()}  # type: ignore[attr-defined]


@cache
def make_targets() -> set[str]:
    text = (REPO_ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, flags=re.M))


SHELL_BLOCKS = blocks_of(*SHELL)
ALL_COMMANDS = [c for b in SHELL_BLOCKS for c in commands(b)]
DENSEPIPE = [c for c in ALL_COMMANDS if c.program == "densepipe"]


def test_the_examples_are_found() -> None:
    """The extraction sees the manual's examples (a parser that found nothing would pass every
    check below)."""
    assert len(SHELL_BLOCKS) >= 20 and len(DENSEPIPE) >= 40, (len(SHELL_BLOCKS), len(DENSEPIPE))
    assert {b.lang for b in ALL_BLOCKS} >= {"bash", "python", "yaml", "toml", "json"}
    assert any(c.args[:1] == ("train",) and "data.source=coco" in c.args for c in DENSEPIPE)  # README
    assert any("BrightnessTask" in b.text and "hookimpl" in b.text and "..." not in b.text
               for b in blocks_of("python")), "the plugin page's --8<-- include was not resolved"


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=str)
def test_densepipe_commands_use_real_commands_and_options(block: Block) -> None:
    """Each ``densepipe`` command of the block names an existing command and only options that
    command accepts."""
    available = cli_options()
    problems = []
    for cmd in commands(block):
        if cmd.program != "densepipe":
            continue
        plain = unbracket(cmd.args)
        name = next((a for a in plain if not a.startswith("-")), None)
        if name is None:
            continue  # `densepipe --help`
        if name not in available:
            problems.append(f"{cmd}: no command {name!r}; densepipe has {sorted(available)}")
            continue
        options, _ = options_and_sets(cmd.args)
        unknown = sorted(set(options) - available[name])
        if unknown:
            problems.append(f"{cmd}: `densepipe {name}` has no {unknown}; it takes "
                            f"{sorted(available[name])}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=str)
def test_set_overrides_name_real_keys(block: Block) -> None:
    """Every ``--set KEY=VALUE`` of a ``densepipe`` command (and ``-S`` of ``dvc exp run``, which
    writes params.yaml) is accepted by the config loader: the key exists, the value has its
    type."""
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    problems = []
    for cmd in commands(block):
        if cmd.program == "densepipe":
            _, sets = options_and_sets(cmd.args)
        elif cmd.program == "dvc" and cmd.args[:2] == ("exp", "run"):
            _, sets = options_and_sets(cmd.args, ("-S", "--set-param"))
        else:
            continue
        sets = [s for s in sets if ":" not in s.split("=", 1)[0]]  # dvc's FILE:KEY=VALUE
        try:
            load_config(None, sets)
        except ConfigError as e:
            problems.append(f"{cmd}: {e}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=str)
def test_make_targets_exist(block: Block) -> None:
    """Every ``make TARGET`` of the block is a target of the Makefile."""
    missing = [f"{cmd}: no target {word!r}" for cmd in commands(block) if cmd.program == "make"
               for word in cmd.args if "=" not in word and not word.startswith("-")
               and word not in make_targets()]
    assert not missing, "\n".join(missing)


def test_command_blocks_are_labelled() -> None:
    """A block showing ``densepipe`` commands is labelled as shell (``bash``), so it is checked
    here (and highlighted on the site)."""
    unlabelled = [str(b) for b in ALL_BLOCKS if not b.lang and any(
        line.strip().removeprefix("$ ").startswith("densepipe ") for line in b.text.splitlines())]
    assert not unlabelled, f"label these blocks ```bash: {unlabelled}"


def test_pip_extras_exist() -> None:
    """Every ``pip install 'densepipe[EXTRA]'`` shown names an extra of pyproject.toml."""
    tomllib = pytest.importorskip("tomllib")
    extras = set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
                 ["optional-dependencies"])
    shown = {(str(b), extra) for b in SHELL_BLOCKS for line in shell_lines(b) if "pip install" in line
             for word in tokens(line) for extra in re.findall(r"^densepipe\[([\w,-]+)\]$", word)}
    assert shown, "the manual shows no `pip install 'densepipe[...]'` (the deploy page does)"
    unknown = [f"{where}: densepipe[{extra}]" for where, extras_shown in shown
               for extra in extras_shown.split(",") if extra not in extras]
    assert not unknown, f"no such extra (pyproject.toml has {sorted(extras)}): {unknown}"


READ_ONLY_RUNS = sorted({tuple(without_optional(c.args)) for c in DENSEPIPE
                         if c.args and c.args[0] in RUN_FOR_REAL})


def test_read_only_commands_are_shown() -> None:
    """The manual shows ``tasks``, ``formats`` and ``config`` (so the runs below run them)."""
    assert {run[0] for run in READ_ONLY_RUNS} == RUN_FOR_REAL, READ_ONLY_RUNS


@pytest.mark.parametrize("args", READ_ONLY_RUNS, ids=" ".join)
def test_read_only_commands_run(args: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture) -> None:
    """``densepipe tasks``, ``formats`` and ``config ...`` as the manual shows them, run through
    ``main()`` (in this process: the same code as the ``densepipe`` script, without a new
    interpreter per command) in a folder holding the checkout's ``params.yaml``: they exit 0,
    and ``config`` prints the configuration with the example's ``--set`` values in it."""
    from pipeline.cli import main

    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["densepipe", *args])
    code: int | str | None = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert code in (0, None), out + err
    if args[0] != "config":
        assert args[0] in out or out.lstrip().startswith("["), out
        return
    printed = yaml.safe_load(out)
    for item in options_and_sets(args)[1]:
        key, value = item.split("=", 1)
        node: Any = printed
        for part in key.split("."):
            node = node[part]
        assert node == yaml.safe_load(value), f"{key}: printed {node!r}, the example set {value}"


# -- Python ------------------------------------------------------------------------------------------
PYTHON_BLOCKS = blocks_of("python", "py")


def not_run_reason(block: Block) -> str | None:
    reasons = [why for (page, marker), why in NOT_RUN.items()
               if page == block.page and marker in block.text]
    return reasons[0] if reasons else None


def test_not_run_list_is_current() -> None:
    """Each ``NOT_RUN`` entry matches exactly one block (an entry whose block changed or went away
    must not silently exempt another)."""
    for (page, marker), _ in NOT_RUN.items():
        hits = [b for b in PYTHON_BLOCKS if b.page == page and marker in b.text]
        assert len(hits) == 1, f"NOT_RUN entry ({page}, {marker!r}) matches {len(hits)} blocks"


def _exec(source: str, name: str) -> None:
    """Run ``source`` as the module ``name`` (registered while it runs, as an import would)."""
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        exec(compile(source, name, "exec"), module.__dict__)  # noqa: S102 - the manual's own code
    finally:
        sys.modules.pop(name, None)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=str)
def test_python_examples_run(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The block compiles and runs in an empty folder; a block ``NOT_RUN`` lists runs only its
    imports (the names it imports exist)."""
    code = compile(block.text, str(block), "exec")
    assert code is not None
    monkeypatch.chdir(tmp_path)
    name = f"docs_example_{Path(block.page).stem.replace('-', '_')}_{block.line}"
    if not_run_reason(block) is None:
        _exec(block.text, name)
        return
    imports = [node for node in ast.parse(block.text).body
               if isinstance(node, ast.Import | ast.ImportFrom)]
    assert imports or "..." in block.text, f"{block}: listed in NOT_RUN but nothing of it is checked"
    _exec(ast.unparse(ast.Module(body=imports, type_ignores=[])), name)


# -- YAML, JSON, TOML ---------------------------------------------------------------------------------
def _config_sections() -> set[str]:
    from pipeline.config import Config

    return set(Config.model_fields) | {"base"}


@pytest.mark.parametrize("block", blocks_of("yaml", "yml"), ids=str)
def test_yaml_examples_parse_and_config_fragments_validate(block: Block, tmp_path: Path) -> None:
    """The block is YAML; one with a config section loads as a params file over the defaults and
    passes the checks ``densepipe train`` runs before reading data (tasks, their options,
    backbone, data.source and its options)."""
    from pipeline import stages
    from pipeline.config import load_config

    tree = yaml.safe_load(block.text)
    if not (isinstance(tree, dict) and set(tree) & _config_sections()):
        return
    path = tmp_path / "fragment.yaml"
    path.write_text(block.text)
    stages.check_config(load_config(path))


@pytest.mark.parametrize("block", blocks_of("json"), ids=str)
def test_json_examples_parse(block: Block) -> None:
    json.loads(block.text)


@pytest.mark.parametrize("block", blocks_of("toml"), ids=str)
def test_toml_examples_parse_and_name_real_entry_point_groups(block: Block) -> None:
    tomllib = pytest.importorskip("tomllib")
    tree = tomllib.loads(block.text)
    groups = tree.get("project", {}).get("entry-points", {})
    unknown = sorted(g for g in groups if g.startswith("densepipe") and g not in ENTRY_POINT_GROUPS)
    assert not unknown, f"{block}: densepipe reads no entry-point group {unknown}"
