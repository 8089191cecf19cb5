"""The promotion rule and its report (``pipeline.champion``), without a registry: what an operator
reads in the comparison table and what decides a promotion."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.champion import Champion, compare, comparison_chart, comparison_markdown
from pipeline.errors import ConfigError
from tests.conftest import REPO_ROOT

GOALS = {"semantic/mIoU": "max", "depth/abs_rel": "min", "instance/segm_AP": "max"}
GUARDS = ["semantic/mIoU", "depth/abs_rel", "instance/segm_AP"]


def _champion(**metrics: float) -> Champion:
    return Champion("3", dict(metrics), {"data": "content:a", "params": "p", "code": "c"}, "content:a")


def _rule(challenger: dict[str, float], champion: Champion | None, **rule: float):
    return compare(challenger, champion, challenger_version="4", primary="semantic/mIoU",
                   guards=GUARDS, goals=GOALS, min_gain=rule.get("min_gain", 0.0),
                   tolerance=rule.get("tolerance", 0.02))


CHAMP = {"semantic/mIoU": 0.50, "depth/abs_rel": 0.20, "instance/segm_AP": 0.30}


def test_no_champion_promotes_the_first_model() -> None:
    cmp = _rule(CHAMP, None)
    assert cmp.promote and cmp.champion_version is None and "no champion" in cmp.reason


def test_better_primary_and_no_guard_worse_beyond_tolerance_promotes() -> None:
    challenger = {"semantic/mIoU": 0.55, "depth/abs_rel": 0.203, "instance/segm_AP": 0.297}
    cmp = _rule(challenger, _champion(**CHAMP))
    assert cmp.promote, cmp.reason
    rows = {r.metric: r for r in cmp.rows}
    assert rows["semantic/mIoU"].role == "primary" and rows["semantic/mIoU"].change == pytest.approx(0.10)
    # lower is better for abs_rel: 0.203 vs 0.200 is 1.5 % worse, within the 2 % tolerance
    assert rows["depth/abs_rel"].change == pytest.approx(-0.015) and rows["depth/abs_rel"].ok


def test_a_primary_that_does_not_improve_by_min_gain_keeps_the_champion() -> None:
    challenger = {**CHAMP, "semantic/mIoU": 0.505}  # +1 %
    assert _rule(challenger, _champion(**CHAMP)).promote
    cmp = _rule(challenger, _champion(**CHAMP), min_gain=0.02)
    assert not cmp.promote
    assert cmp.reason.startswith("kept the champion: semantic/mIoU +1.00% vs the champion")


def test_equal_primary_is_no_improvement() -> None:
    assert not _rule(dict(CHAMP), _champion(**CHAMP)).promote


def test_negative_min_gain_accepts_a_slightly_worse_primary() -> None:
    challenger = {**CHAMP, "semantic/mIoU": 0.497}  # -0.6 %
    assert not _rule(challenger, _champion(**CHAMP)).promote
    assert _rule(challenger, _champion(**CHAMP), min_gain=-0.01).promote


def test_a_task_worse_beyond_tolerance_keeps_the_champion_in_its_direction() -> None:
    challenger = {**CHAMP, "semantic/mIoU": 0.60, "depth/abs_rel": 0.21}  # abs_rel 5 % worse
    cmp = _rule(challenger, _champion(**CHAMP))
    assert not cmp.promote
    assert "depth/abs_rel -5.00% vs the champion (at most 2.0% worse allowed)" in cmp.reason
    # a lower abs_rel is better: the same 5 % the other way passes
    assert _rule({**challenger, "depth/abs_rel": 0.19}, _champion(**CHAMP)).promote


def test_a_metric_the_challenger_lost_fails_and_one_the_champion_lacks_passes() -> None:
    lost = {"semantic/mIoU": 0.6, "depth/abs_rel": 0.2}
    cmp = _rule(lost, _champion(**CHAMP))
    assert not cmp.promote and "instance/segm_AP is not reported by the challenger" in cmp.reason
    new_task = _rule({**CHAMP, "semantic/mIoU": 0.6}, _champion(**{"semantic/mIoU": 0.5}))
    assert new_task.promote


def test_a_champion_at_zero_compares_absolute_differences() -> None:
    cmp = _rule({**CHAMP, "semantic/mIoU": 0.1}, _champion(**{**CHAMP, "semantic/mIoU": 0.0}))
    assert cmp.rows[0].change == pytest.approx(0.1) and cmp.promote


def test_the_primary_metric_must_be_reported() -> None:
    with pytest.raises(ConfigError, match=r"promote.primary_metric 'semantic/mIoU': the challenger"):
        _rule({"depth/abs_rel": 0.2}, _champion(**CHAMP))


def test_markdown_names_the_decision_versions_and_directions() -> None:
    challenger = {**CHAMP, "semantic/mIoU": 0.60, "depth/abs_rel": 0.21}
    text = comparison_markdown(_rule(challenger, _champion(**CHAMP)), name="densepipe", alias="champion")
    assert text.startswith("**kept** `@champion` on v3; challenger v4 stays registered")
    assert "| metric | role | champion v3 | challenger v4 | change | ok |" in text
    assert "| depth/abs_rel (lower is better) | guard | 0.2000 | 0.2100 | -5.00% | no |" in text
    assert "| semantic/mIoU (higher is better) | primary | 0.5000 | 0.6000 | +20.00% | yes |" in text


def test_chart_draws_a_red_bar_for_a_failed_metric_only(tmp_path: Path) -> None:
    kept = _rule({**CHAMP, "semantic/mIoU": 0.60, "depth/abs_rel": 0.21}, _champion(**CHAMP))
    promoted = _rule({**CHAMP, "semantic/mIoU": 0.60}, _champion(**CHAMP))

    def red_pixels(path: Path) -> int:
        rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return int(((rgb[..., 0] == 200) & (rgb[..., 1] == 50) & (rgb[..., 2] == 50)).sum())

    assert red_pixels(comparison_chart(kept, tmp_path / "kept.png")) > 100
    assert red_pixels(comparison_chart(promoted, tmp_path / "promoted.png")) == 0
    assert Image.open(tmp_path / "kept.png").size[1] > 3 * 2 * 18  # a pair of bars per metric


def _cli_error(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> str:
    """``densepipe ARGV`` through main(): exit code 2 and one ``error:`` line on stderr."""
    from pipeline.cli import main

    monkeypatch.setattr(sys, "argv", ["densepipe", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(("argv", "expected"), [
    (["promote"], "error: promote: give --version N or --rollback (one of them)"),
    (["promote", "--version", "2", "--rollback"], "error: promote: give --version N or --rollback"),
    (["promote", "--version", "v2"], "error: --version 'v2': expected a registered version number, e.g. 3"),
    (["promote", "--version", "2", "--set", "tracking.enabled=false"],
     "error: promote: tracking.enabled is false; the champion alias lives in the MLflow model registry"),
    (["retrain", "--set", "tracking.enabled=false"], "error: retrain: tracking.enabled is false"),
    (["serve", "--interval", "60", "--set", "tracking.enabled=false"],
     "error: serve --flow retrain: tracking.enabled is false"),
    (["serve", "--interval", "60", "--flow", "nightly"],
     "error: --flow 'nightly': expected retrain or pipeline"),
    (["config", "--set", "promote.tolerance=-1"], "promote.tolerance"),
    (["config", "--set", "promote.alias=my alias"], "promote.alias"),
])
def test_retraining_commands_refuse_bad_input_in_one_line(argv: list[str], expected: str, tmp_path: Path,
                                                          monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    assert expected in _cli_error(argv, monkeypatch, capsys)
    assert not (tmp_path / "mlflow.db").exists()  # refused before anything was tracked
