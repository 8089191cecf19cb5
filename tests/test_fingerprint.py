"""Fingerprints of a run's inputs (pipeline.fingerprint): data (DVC's recorded hash or the
folder's content, with a per-file hash cache), params without the keys that do not change what is
trained, code (sources, third-party plugins, torch versions), and which parts changed."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import BaseModel

import pipeline.fingerprint as fp
from pipeline.config import Config, config_from_dict, load_config
from pipeline.errors import DataError
from tests.plugin_dist import write_distribution


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data" / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(3):
        (root / "images" / f"{i}.png").write_bytes(bytes([i]) * (10 + i))
        (root / "labels" / f"{i}.png").write_bytes(b"L" * i)
    (root / "meta.json").write_text('{"classes": ["a", "b"]}\n')
    return root


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def hash_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files whose bytes ``data_fingerprint`` hashes from now on."""
    calls: list[Path] = []
    real = fp._hash_file

    def counting(path: Path) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(fp, "_hash_file", counting)
    return calls


def _value(root: Path, cache: Path) -> str:
    result = fp.data_fingerprint(root, cache_dir=cache)
    assert result.kind == "content"
    return result.value


# -- data: content ------------------------------------------------------------------------------
def test_content_fingerprint_is_stable_and_counts_files(dataset: Path, cache: Path) -> None:
    first = fp.data_fingerprint(dataset, cache_dir=cache)
    assert first.kind == "content" and len(first.value) == 64
    assert (first.files, first.bytes) == (7, 10 + 11 + 12 + 0 + 1 + 2 + 24)
    assert fp.data_fingerprint(dataset, cache_dir=cache) == first
    assert fp.data_fingerprint(dataset, cache_dir=cache / "other") == first  # cold cache
    assert str(first) == f"content:{first.value}"


def test_warm_cache_reads_no_file(dataset: Path, cache: Path, hash_calls: list[Path]) -> None:
    cold = _value(dataset, cache)
    assert len(hash_calls) == 7
    assert len(list(cache.glob("*.json"))) == 1
    hash_calls.clear()
    assert _value(dataset, cache) == cold
    assert hash_calls == []


def test_touch_rehashes_only_that_file_and_keeps_the_value(dataset: Path, cache: Path,
                                                            hash_calls: list[Path]) -> None:
    before = _value(dataset, cache)
    hash_calls.clear()
    target = dataset / "images" / "1.png"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert _value(dataset, cache) == before
    assert hash_calls == [target]


@pytest.mark.parametrize("change", ["byte", "same_size_byte", "rename", "add", "remove", "move"])
def test_content_changes_change_the_value(dataset: Path, cache: Path, change: str) -> None:
    before = _value(dataset, cache)
    img = dataset / "images" / "2.png"
    if change == "byte":
        img.write_bytes(img.read_bytes() + b"\0")
    elif change == "same_size_byte":  # same size, mtime kept: only a cache miss would notice
        st = img.stat()
        img.write_bytes(b"X" + img.read_bytes()[1:])
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    elif change == "rename":
        img.rename(dataset / "images" / "3.png")
    elif change == "add":
        (dataset / "labels" / "new.png").write_bytes(b"")
    elif change == "remove":
        (dataset / "labels" / "0.png").unlink()
    else:
        img.rename(dataset / "labels" / "2b.png")
        (dataset / "labels" / "2.png").rename(dataset / "images" / "2.png")
        (dataset / "labels" / "2b.png").rename(dataset / "labels" / "2.png")
    assert _value(dataset, cache) != before


def test_hidden_names_pycache_and_symlinked_folders_are_skipped(dataset: Path, cache: Path,
                                                                tmp_path: Path) -> None:
    before = _value(dataset, cache)
    (dataset / ".dvcignore").write_text("x\n")
    (dataset / "images" / ".DS_Store").write_bytes(b"junk")
    (dataset / "__pycache__").mkdir()
    (dataset / "__pycache__" / "m.pyc").write_bytes(b"junk")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "big.bin").write_bytes(b"0" * 100)
    (dataset / "linked_folder").symlink_to(elsewhere, target_is_directory=True)
    (dataset / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    assert _value(dataset, cache) == before
    (dataset / "linked_file.png").symlink_to(elsewhere / "big.bin")
    linked = fp.data_fingerprint(dataset, cache_dir=cache)
    assert linked.value != before and linked.files == 8


def test_corrupt_or_foreign_cache_is_ignored(dataset: Path, cache: Path,
                                             hash_calls: list[Path]) -> None:
    good = _value(dataset, cache)
    (cache_file,) = cache.glob("*.json")
    for text in ["{not json", '{"version": 1, "files": {"meta.json": [1, 2, "0000"]}}', "[]",
                 '{"version": 99, "files": {}}']:
        cache_file.write_text(text)
        hash_calls.clear()
        assert _value(dataset, cache) == good
        assert len(hash_calls) == 7
    cache_file.write_bytes(b"\xff\xfe garbage")
    assert _value(dataset, cache) == good
    assert json.loads(cache_file.read_text())["version"] == 1  # rewritten whole


def test_unwritable_cache_is_no_error(dataset: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert _value(dataset, blocker / "cache") == _value(dataset, tmp_path / "cache")


def test_default_cache_dir_follows_xdg(dataset: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fp.default_cache_dir() == tmp_path / "xdg" / "densepipe" / "fingerprints"
    fp.data_fingerprint(dataset)
    assert len(list((tmp_path / "xdg" / "densepipe" / "fingerprints").glob("*.json"))) == 1
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fp.default_cache_dir() == tmp_path / "home" / ".cache" / "densepipe" / "fingerprints"


def test_missing_root_is_one_data_error_line(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(DataError) as info:
        fp.data_fingerprint(tmp_path / "nope", cache_dir=cache)
    assert str(info.value).startswith(f"{tmp_path / 'nope'}: ") and "\n" not in str(info.value)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="expected a data folder"):
        fp.data_fingerprint(tmp_path / "file.txt", cache_dir=cache)


# -- data: DVC --------------------------------------------------------------------------------
DVC_FILE = """\
outs:
- md5: 02421319b5aaef62605124310d3c6b10.dir
  size: 5
  nfiles: 2
  hash: md5
  path: ds
"""
"""``data/ds.dvc`` as ``dvc add data/ds`` (DVC 3.67) writes it."""

DVC_LOCK = """\
schema: '2.0'
stages:
  prepare:
    cmd: densepipe prepare
    deps:
    - path: pipeline/stages.py
      hash: md5
      md5: cd1115154566f558c57e865f649e1d15
      size: 25298
    outs:
    - path: data/other
      hash: md5
      md5: 11111111111111111111111111111111.dir
      size: 3
      nfiles: 1
    - path: data/ds
      hash: md5
      md5: 0e23f18096eddf8f598b5c51a8d6e625.dir
      size: 63060
      nfiles: 7
"""
"""``dvc.lock`` as ``dvc repro`` (DVC 3.67) writes it."""


def test_dvc_file_next_to_root_gives_the_recorded_hash(dataset: Path, cache: Path,
                                                       hash_calls: list[Path]) -> None:
    (dataset.parent / "ds.dvc").write_text(DVC_FILE)
    result = fp.data_fingerprint(dataset, cache_dir=cache)
    assert result == fp.DataFingerprint("dvc", "02421319b5aaef62605124310d3c6b10.dir", 2, 5)
    assert hash_calls == [] and not cache.exists()


def test_dvc_file_for_another_path_or_broken_falls_back_to_content(dataset: Path,
                                                                   cache: Path) -> None:
    (dataset.parent / "ds.dvc").write_text(DVC_FILE.replace("path: ds", "path: elsewhere"))
    assert fp.data_fingerprint(dataset, cache_dir=cache).kind == "content"
    (dataset.parent / "ds.dvc").write_text("outs: [\n")
    assert fp.data_fingerprint(dataset, cache_dir=cache).kind == "content"


def test_dvc_lock_in_a_parent_up_to_the_repo_root(dataset: Path, cache: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path
    (repo / ".dvc").mkdir()
    (repo / "dvc.lock").write_text(DVC_LOCK)
    (repo / "sub").mkdir()
    expected = fp.DataFingerprint("dvc", "0e23f18096eddf8f598b5c51a8d6e625.dir", 7, 63060)
    monkeypatch.chdir(repo)
    assert fp.data_fingerprint(Path("data/ds"), cache_dir=cache) == expected
    monkeypatch.chdir(repo / "sub")  # the lock is found in a parent; root relative to the cwd
    assert fp.data_fingerprint(Path("../data/ds"), cache_dir=cache) == expected
    assert fp.data_fingerprint(dataset, cache_dir=cache) == expected
    cfg = config_from_dict({"data": {"root": "../data/ds"}})
    assert fp.inputs_fingerprint(cfg, cache_dir=cache)["data"] == f"dvc:{expected.value}"


def test_dvc_lock_beyond_the_repo_root_or_for_other_paths_is_not_used(
        dataset: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dvc.lock").write_text(DVC_LOCK)
    inner = tmp_path / "data"
    (inner / ".dvc").mkdir()  # data/ is its own DVC repo: the lock above it is not its
    monkeypatch.chdir(inner)
    assert fp.data_fingerprint(Path("ds"), cache_dir=cache).kind == "content"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.lock").write_text(DVC_LOCK.replace("path: data/ds", "path: data/ds2"))
    assert fp.data_fingerprint(Path("data/ds"), cache_dir=cache).kind == "content"


def test_dvc_lock_stage_wdir(dataset: Path, cache: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    lock = DVC_LOCK.replace("    cmd:", "    wdir: data\n    cmd:").replace("path: data/ds", "path: ds")
    (tmp_path / ".git").mkdir()
    (tmp_path / "dvc.lock").write_text(lock)
    monkeypatch.chdir(tmp_path)
    assert fp.data_fingerprint(Path("data/ds"), cache_dir=cache).value.startswith("0e23f180")


# -- params -----------------------------------------------------------------------------------
def _config(**sections: dict[str, object]) -> Config:
    return config_from_dict(dict(sections))


def test_params_change_with_what_is_trained_only() -> None:
    base = fp.params_fingerprint(_config())
    assert base == fp.params_fingerprint(_config()) and len(base) == 64
    assert fp.params_fingerprint(_config(train={"lr": 0.01})) != base
    assert fp.params_fingerprint(_config(model={"tasks": ["semantic", "depth"]})) != base
    assert fp.params_fingerprint(_config(data={"synthetic": {"seed": 1}})) != base
    assert fp.params_fingerprint(_config(train={"out_dir": "elsewhere", "device": "cpu"})) == base
    assert fp.params_fingerprint(_config(tracking={"uri": "http://mlflow:5000",
                                                   "enabled": False})) == base
    assert fp.params_fingerprint(_config(data={"root": "/mnt/data", "num_workers": "auto"})) == base
    assert fp.params_fingerprint(load_config(None, ["evaluate.batch_size=2"])) == base
    assert fp.params_fingerprint(_config(promote={"min_gain": 0.05})) == base


def _field(key: str) -> bool:
    model: type[BaseModel] | None = Config
    for part in key.split("."):
        if model is None or part not in model.model_fields:
            return False
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return True


def test_ignored_keys_are_real_config_keys_with_reasons() -> None:
    assert not _field("train.nope") and not _field("train.lr.x") and _field("train.lr")
    unknown = [key for key in fp.IGNORED_KEYS if not _field(key)]
    assert unknown == []
    assert all(reason.strip() for reason in fp.IGNORED_KEYS.values())
    trained = fp.trained_params(_config())
    for key in fp.IGNORED_KEYS:
        *parents, last = key.split(".")
        node = trained
        for part in parents:
            node = node[part]
        assert last not in node, key


# -- code -------------------------------------------------------------------------------------
def _copy_code(dest: Path) -> list[Path]:
    roots = []
    for root in fp.code_roots():
        shutil.copytree(root, dest / root.name, ignore=shutil.ignore_patterns("__pycache__"))
        roots.append(dest / root.name)
    return roots


def test_code_fingerprint_is_stable_and_follows_the_plugin_sources(tmp_path: Path) -> None:
    assert [r.name for r in fp.code_roots()] == ["pipeline", "plugins"]
    installed = fp.code_fingerprint()
    assert installed == fp.code_fingerprint() and len(installed) == 64
    roots = _copy_code(tmp_path / "copy")
    assert fp.code_fingerprint(roots) == installed  # same bytes, same names, anywhere
    (roots[1] / "semantic" / "__pycache__").mkdir(exist_ok=True)
    (roots[1] / "semantic" / "__pycache__" / "stale.py").write_text("x = 1\n")
    (roots[1] / "semantic" / "notes.txt").write_text("not code\n")
    assert fp.code_fingerprint(roots) == installed
    task = roots[1] / "semantic" / "task.py"
    task.write_bytes(task.read_bytes() + b"\n")
    assert fp.code_fingerprint(roots) != installed


def test_code_fingerprint_names_moved_files(tmp_path: Path) -> None:
    roots = _copy_code(tmp_path / "copy")
    before = fp.code_fingerprint(roots)
    (roots[1] / "semantic" / "task.py").rename(roots[1] / "semantic" / "task2.py")
    assert fp.code_fingerprint(roots) != before


def test_third_party_plugin_versions_count_densepipe_does_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert any(ep.dist is not None and ep.dist.metadata["Name"] == "densepipe"
               for ep in md.entry_points(group="densepipe.tasks"))
    assert not any(line.startswith("densepipe==") for line in fp.plugin_distributions())
    roots = _copy_code(tmp_path / "copy")
    before = fp.code_fingerprint(roots)
    site = write_distribution(tmp_path / "site", dist="densepipe-fancy", module="densepipe_fancy",
                              source="", entry_name="fancy", group="densepipe.formats")
    monkeypatch.syspath_prepend(str(site))
    assert "densepipe-fancy==0.1.0" in fp.plugin_distributions()
    assert fp.code_fingerprint(roots) != before


def test_torch_versions_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    roots = _copy_code(tmp_path / "copy")
    before = fp.code_fingerprint(roots)
    real: Callable[[str], str] = fp._version
    monkeypatch.setattr(fp, "_version", lambda d: "9.9.9" if d == "torchvision" else real(d))
    assert fp.code_fingerprint(roots) != before


def test_no_torch_at_import() -> None:
    code = "import sys, pipeline.fingerprint; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- together ---------------------------------------------------------------------------------
def test_inputs_fingerprint_parts(dataset: Path, cache: Path) -> None:
    cfg = _config(data={"root": str(dataset)})
    parts = fp.inputs_fingerprint(cfg, cache_dir=cache)
    assert list(parts) == ["data", "params", "code"]
    assert parts["data"] == f"content:{fp.data_fingerprint(dataset, cache_dir=cache).value}"
    assert parts["params"] == fp.params_fingerprint(cfg)
    assert parts["code"] == fp.code_fingerprint()


def test_changed_names_parts_in_order() -> None:
    new = {"data": "content:1", "params": "p", "code": "c"}
    assert fp.changed(None, new) == ["data", "params", "code"]
    assert fp.changed(dict(new), new) == []
    assert fp.changed({**new, "code": "old", "data": "dvc:x"}, new) == ["data", "code"]
    assert fp.changed({"params": "p", "code": "c"}, new) == ["data"]
    assert fp.changed({}, new) == ["data", "params", "code"]
    assert fp.changed({**new, "extra": "ignored"}, new) == []
