"""`prepare` replaces only a folder it provably rendered; outputs get the usual umask modes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import stages
from pipeline.config import load_config
from pipeline.data.synthetic import write_synthetic_dataset
from pipeline.data.synthetic.ownership import MARKER
from pipeline.errors import OutputError
from pipeline.io import atomic_path, atomic_write_json, atomic_write_text
from tests.conftest import REPO_ROOT, one_error_line

TINY = {"num_train": 1, "num_val": 1, "image_size": 32}


def _prepare(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    over = [a for o in ("data.synthetic.num_train=1", "data.synthetic.num_val=1",
                        "data.synthetic.image_size=32", *overrides) for a in ("--set", o)]
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "prepare", "--params",
                           str(REPO_ROOT / "params.yaml"), *over], capture_output=True, text=True,
                          cwd=cwd)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_prepare_refuses_user_folders_and_keeps_their_files(tmp_path: Path, monkeypatch) -> None:
    """A user's folder, a COCO folder (synthetic source by mistake), the working folder, a git
    checkout and the home folder are refused with one line; every file in them survives."""
    project = tmp_path / "project"
    (project / "mine").mkdir(parents=True)
    (project / "mine" / "notes.txt").write_text("precious")
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "annotations" / "instances_train2017.json").write_text("{}")
    checkout = tmp_path / "checkout"
    (checkout / ".git").mkdir(parents=True)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export A=1")
    before = {p: _tree(p) for p in (project, coco, checkout, home)}

    # through the command: exit code 2 and one `error:` line
    line = one_error_line(_prepare(project, "data.root=mine"))
    assert "mine: holds files densepipe did not write" in line and "data.root" in line

    monkeypatch.chdir(project)
    monkeypatch.setenv("HOME", str(home))

    def refusal(root: str | Path) -> str:
        over = [f"data.root={root}", "data.synthetic.num_train=1", "data.synthetic.num_val=1",
                "data.synthetic.image_size=32"]
        with pytest.raises(OutputError) as caught:
            stages.prepare(load_config(None, over))
        assert "\n" not in str(caught.value)
        return str(caught.value)

    assert str(coco) in refusal(coco) and "data.source=folder" in refusal(coco)
    assert "it is the working folder" in refusal(project)
    assert "it is the working folder" in refusal(".")
    assert "git checkout" in refusal(checkout)
    assert "it is your home folder" in refusal(home)
    assert "it holds your home folder" in refusal(tmp_path)
    assert "it is the filesystem root" in refusal("/")
    assert {p: _tree(p) for p in before} == before
    assert sorted(p.name for p in project.iterdir()) == ["mine"]


def test_own_render_is_replaced_until_the_user_changes_it(tmp_path: Path) -> None:
    root = tmp_path / "synthetic"
    root.mkdir()  # an empty folder may be rendered into
    write_synthetic_dataset(root, seed=0, **TINY)
    marker = json.loads((root / MARKER).read_text())
    assert marker["state"] == "complete" and marker["params"]["seed"] == 0
    first = (root / "images" / "train" / "000001.png").read_bytes()
    write_synthetic_dataset(root, seed=1, **TINY)  # our own render: replaced
    assert (root / "images" / "train" / "000001.png").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]  # no .old / .tmp left

    (root / "images" / "train" / "my_photo.jpg").write_bytes(b"user data")
    with pytest.raises(OutputError, match=r"changed since densepipe rendered it \(16 files now, 15 when"):
        write_synthetic_dataset(root, seed=2, **TINY)
    assert (root / "images" / "train" / "my_photo.jpg").read_bytes() == b"user data"


def test_files_added_during_a_render_and_links_are_never_lost(tmp_path: Path, monkeypatch) -> None:
    """The ownership check is repeated at the swap: a file copied in while rendering survives; a
    link added to a render makes it the user's; a linked data.root and an older, unsealed render
    are refused with one line."""
    from pipeline.data.synthetic import ownership

    root = tmp_path / "synthetic"
    write_synthetic_dataset(root, seed=0, **TINY)
    seal = ownership.write_rendering_marker

    def user_copies_a_file_meanwhile(tmp: Path) -> None:
        seal(tmp)
        (root / "copied_meanwhile.txt").write_text("mine")

    monkeypatch.setattr(ownership, "write_rendering_marker", user_copies_a_file_meanwhile)
    with pytest.raises(OutputError, match="changed since densepipe rendered it"):
        write_synthetic_dataset(root, seed=1, **TINY)
    monkeypatch.undo()
    assert (root / "copied_meanwhile.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]  # old put back, tmp removed

    (root / "copied_meanwhile.txt").unlink()
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputError, match="changed since densepipe rendered it"):
        write_synthetic_dataset(root, seed=1, **TINY)
    (root / "link").unlink()

    (tmp_path / "linked").symlink_to(root)
    with pytest.raises(OutputError, match=r"linked: data.root is a symbolic link \(to "):
        write_synthetic_dataset(tmp_path / "linked", seed=1, **TINY)
    (root / MARKER).unlink()
    with pytest.raises(OutputError, match="rendered by an older densepipe"):
        write_synthetic_dataset(root, seed=1, **TINY)


def test_stale_render_of_a_killed_writer_is_removed(tmp_path: Path) -> None:
    """A render killed mid-way leaves `.synthetic.<random>.tmp`; the next render removes it when
    its writer is dead, and leaves a live writer's and an unmarked folder alone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    import socket

    def leftover(name: str, pid: int | None) -> Path:
        folder = tmp_path / name
        (folder / "images").mkdir(parents=True)
        if pid is not None:
            (folder / MARKER).write_text(json.dumps({
                "format": "densepipe-synthetic-marker/1", "state": "rendering", "pid": pid,
                "host": socket.gethostname()}))
        return folder

    stale = leftover(".synthetic.abc123.tmp", int(dead.stdout))
    live = leftover(".synthetic.def456.tmp", os.getpid())
    unmarked = leftover(".synthetic.user.tmp", None)
    write_synthetic_dataset(tmp_path / "synthetic", seed=0, **TINY)
    assert not stale.exists() and live.exists() and unmarked.exists()


def test_outputs_get_umask_modes(tmp_path: Path) -> None:
    """Files and folders written atomically are 0644 / 0755 under umask 022 (not mkstemp's 0600)."""
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_json(tmp_path / "b.json", {"a": 1})
        with atomic_path(tmp_path / "c.pt") as tmp:  # checkpoints, torch.save's target
            tmp.write_bytes(b"x")
        write_synthetic_dataset(tmp_path / "synthetic", seed=0, **TINY)
    finally:
        os.umask(old)
    for path in (tmp_path / "a.txt", tmp_path / "b.json", tmp_path / "c.pt",
                 tmp_path / "synthetic" / "meta.json",
                 tmp_path / "synthetic" / "annotations" / "instances_train.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE((tmp_path / "synthetic").stat().st_mode) == 0o755


@pytest.mark.slow
def test_prepare_of_a_user_folder_reports_every_problem_in_one_line(tmp_path: Path) -> None:
    """`prepare --set data.source=folder` reads the images it lists: a missing and a truncated
    image are both named, with the count, before any training; the folder is not written."""
    root = tmp_path / "mine"
    write_synthetic_dataset(root, seed=0, num_train=3, num_val=1, image_size=32)
    (root / "images" / "train" / "000001.png").unlink()
    png = root / "images" / "train" / "000002.png"
    png.write_bytes(png.read_bytes()[:60])
    before = _tree(root)
    line = one_error_line(_prepare(tmp_path, "data.source=folder", f"data.root={root}"))
    assert "2 problems in split 'train'" in line
    assert "000001.png: file missing" in line and "000002.png: truncated or corrupt" in line
    assert _tree(root) == before
