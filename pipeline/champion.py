"""Champion and challenger: which registered model version is in production, whether a newly
trained one replaces it, and moving the alias that says so.

The champion is the version the registered model's alias ``promote.alias`` (``champion``) points
to; ``models:/<name>@champion`` resolves to it wherever a model URI is read (``predict --model``,
``evaluate --model``, a served pyfunc that follows the alias). A version records what it was
trained from (tags ``densepipe.inputs.data`` / ``.params`` / ``.code``, from
``pipeline.fingerprint``) and which data its ``metric.*`` tags were measured on
(``densepipe.eval.data``), so a scheduled run can tell that nothing changed, and a comparison
re-evaluates the champion only when the validation data changed.

The rule (``compare``, ``promote`` section of the config): the challenger is promoted when there
is no champion, or when its primary metric is better than the champion's by more than
``min_gain`` (relative) and no other enabled task's main metric is worse by more than
``tolerance`` (relative), each in its metric's direction (``Task.lower_is_better``).

Every alias move (a promotion, ``densepipe promote --version N``, ``--rollback``) is an MLflow run
named ``promote`` with the versions and the reason, and is pushed onto the registered model's tag
``densepipe.<alias>.history`` (a JSON list of versions), which ``--rollback`` pops.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageDraw

from pipeline.errors import ConfigError, TrackingError
from pipeline.tracking import Tracker

Goal = Literal["max", "min"]
INPUTS_TAG = "densepipe.inputs.{part}"
"""Model-version tag: the fingerprint of one input part (data, params, code) it was trained from."""
EVAL_DATA_TAG = "densepipe.eval.data"
"""Model-version tag: the data fingerprint its ``metric.*`` tags were measured on."""
DECISION_TAG = "densepipe.decision"
"""Model-version tag of a challenger: ``promoted`` or ``kept`` (the champion stayed)."""
COMPARED_TAG = "densepipe.compared_with"
"""Model-version tag of a challenger: the champion version it was compared with (or ``none``)."""
HISTORY_TAG = "densepipe.{alias}.history"
"""Registered-model tag: JSON list of the versions the alias pointed to, oldest first."""
METRIC_TAG = "metric."
"""Prefix of the model-version tags holding its metrics (written by ``stages.register``)."""
INPUT_PARTS = ("data", "params", "code")


@dataclass(frozen=True)
class Champion:
    """The version an alias points to, with what it recorded."""

    version: str
    metrics: dict[str, float]
    inputs: dict[str, str]
    eval_data: str | None

    @classmethod
    def from_tags(cls, version: str, tags: Mapping[str, str]) -> Champion:
        metrics = {}
        for key, value in tags.items():
            if key.startswith(METRIC_TAG):
                try:
                    metrics[key[len(METRIC_TAG):]] = float(value)
                except ValueError:
                    continue
        inputs = {p: tags[INPUTS_TAG.format(part=p)] for p in INPUT_PARTS
                  if INPUTS_TAG.format(part=p) in tags}
        return cls(version, metrics, inputs, tags.get(EVAL_DATA_TAG))


@dataclass(frozen=True)
class MetricRow:
    """One metric of the comparison. ``change``: relative, in the metric's direction (0.05 = the
    challenger is 5 % better); the absolute difference when the champion's value is 0; None when
    either side lacks the metric."""

    metric: str
    role: Literal["primary", "guard"]
    goal: Goal
    champion: float | None
    challenger: float | None
    ok: bool
    why: str = ""

    @property
    def change(self) -> float | None:
        if self.champion is None or self.challenger is None:
            return None
        sign = -1.0 if self.goal == "min" else 1.0
        diff = sign * (self.challenger - self.champion)
        return diff / abs(self.champion) if self.champion != 0 else diff


@dataclass(frozen=True)
class Comparison:
    """The side-by-side comparison and the decision."""

    challenger_version: str
    champion_version: str | None
    rows: tuple[MetricRow, ...] = field(default_factory=tuple)
    promote: bool = True
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"challenger": self.challenger_version, "champion": self.champion_version,
                "promote": self.promote, "reason": self.reason,
                "rows": [{"metric": r.metric, "role": r.role, "goal": r.goal,
                          "champion": r.champion, "challenger": r.challenger,
                          "change": r.change, "ok": r.ok} for r in self.rows]}


def compare(challenger: Mapping[str, float], champion: Champion | None, *, challenger_version: str,
            primary: str, guards: Iterable[str], goals: Mapping[str, Goal], min_gain: float,
            tolerance: float) -> Comparison:
    """Apply the promotion rule to ``challenger``'s metrics against ``champion`` (``None``: no
    champion yet, promoted). ``primary``: the metric that must improve by more than ``min_gain``
    (relative); ``guards``: the other metrics (each enabled task's main metric) that may be worse
    by at most ``tolerance`` (relative); ``goals``: direction per metric (default ``max``).

    A metric the champion does not report cannot be lost (ok); one the challenger does not report
    fails. Raises ``ConfigError`` when ``challenger`` lacks the primary metric."""
    if primary not in challenger or not math.isfinite(challenger[primary]):
        raise ConfigError(f"promote.primary_metric {primary!r}: the challenger's evaluation does not "
                          f"report it; reported: {', '.join(sorted(challenger)) or 'nothing'}")
    if champion is None:
        rows = tuple(MetricRow(m, role, goals.get(m, "max"), None, challenger.get(m), True,
                               "no champion")
                     for m, role in [(primary, "primary"), *((g, "guard") for g in guards if g != primary)])
        return Comparison(challenger_version, None, rows, True, "no champion yet: the first model "
                          "trained becomes the champion")
    rows_list = [_row(primary, "primary", goals.get(primary, "max"), champion.metrics.get(primary),
                      challenger.get(primary), min_gain=min_gain, tolerance=tolerance)]
    rows_list += [_row(g, "guard", goals.get(g, "max"), champion.metrics.get(g), challenger.get(g),
                       min_gain=min_gain, tolerance=tolerance)
                  for g in dict.fromkeys(guards) if g != primary]
    failed = [r for r in rows_list if not r.ok]
    if failed:
        reason = "kept the champion: " + "; ".join(f"{r.metric} {r.why}" for r in failed)
    else:
        reason = f"promoted: {rows_list[0].metric} {rows_list[0].why}" + (
            f", no main metric worse by more than {tolerance:.1%}" if len(rows_list) > 1 else "")
    return Comparison(challenger_version, champion.version, tuple(rows_list), not failed, reason)


def _row(metric: str, role: Literal["primary", "guard"], goal: Goal, champion: float | None,
         challenger: float | None, *, min_gain: float, tolerance: float) -> MetricRow:
    if challenger is None or not math.isfinite(challenger):
        return MetricRow(metric, role, goal, champion, challenger, False, "is not reported by the challenger")
    if champion is None:
        return MetricRow(metric, role, goal, champion, challenger, True, "(the champion has no value)")
    change = MetricRow(metric, role, goal, champion, challenger, True).change or 0.0
    if role == "primary":
        ok, why = change > min_gain, f"{_pct(change)} vs the champion (needs more than {_pct(min_gain)})"
    else:
        ok, why = change >= -tolerance, (f"{_pct(change)} vs the champion (at most {tolerance:.1%} "
                                         f"worse allowed)")
    return MetricRow(metric, role, goal, champion, challenger, ok, why)


def _pct(x: float) -> str:
    return f"{x:+.2%}"


# -- the registry --------------------------------------------------------------------------------
def champion_of(tracker: Tracker, name: str, alias: str) -> Champion | None:
    """The version ``alias`` points to, or None (no such registered model or alias)."""
    client = tracker.client
    try:
        version = client.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - MlflowException RESOURCE_DOES_NOT_EXIST: no champion yet
        return None
    return Champion.from_tags(str(version.version), version.tags or {})


def tag_version(tracker: Tracker, name: str, version: str, tags: Mapping[str, str]) -> None:
    for key, value in tags.items():
        tracker.client.set_model_version_tag(name, version, key, str(value))


def metric_tags(metrics: Mapping[str, float]) -> dict[str, str]:
    """``metric.<task/name>`` tags of the headline metrics, as ``stages.register`` writes them."""
    return {f"{METRIC_TAG}{k}": f"{v:.6g}" for k, v in metrics.items() if k.count("/") == 1}


def history(tracker: Tracker, name: str, alias: str) -> list[str]:
    """The versions ``alias`` pointed to, oldest first (the registered model's history tag)."""
    tags = tracker.client.get_registered_model(name).tags or {}
    try:
        value = json.loads(tags.get(HISTORY_TAG.format(alias=alias), "[]"))
    except json.JSONDecodeError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def move_alias(tracker: Tracker, name: str, alias: str, version: str, *, reason: str,
               push: bool = True, parent_run_id: str | None = None) -> dict[str, str | None]:
    """Point ``alias`` of ``name`` at ``version`` (which must exist), record the move as an MLflow
    run named ``promote`` (params: model, alias, from, to; tag ``densepipe.reason``) and, with
    ``push``, append ``version`` to the history. Returns ``{"from", "to", "run_id"}``."""
    client = tracker.client
    try:
        client.get_model_version(name, version)
    except Exception:  # noqa: BLE001 - MlflowException: no such version
        raise TrackingError(f"--version {version}: registered model {name!r} has no such version in "
                            f"{tracker.uri}") from None
    before = champion_of(tracker, name, alias)
    previous = before.version if before else None
    mover = Tracker(tracker.cfg, parent_run_id=parent_run_id)  # its own run; ``tracker``'s stays
    with mover.running(run_name="promote", tags={"densepipe.stage": "promote",
                                                  "densepipe.reason": reason[:5000]}):
        client.set_registered_model_alias(name, alias, version)
        past = history(tracker, name, alias)
        if push and (not past or past[-1] != version):
            past.append(version)
        client.set_registered_model_tag(name, HISTORY_TAG.format(alias=alias), json.dumps(past))
        mover.log_params({"promote.model": name, "promote.alias": alias,
                          "promote.from": previous or "none", "promote.to": version})
    return {"from": previous, "to": version, "run_id": mover.run_id}


def rollback(tracker: Tracker, name: str, alias: str, *, parent_run_id: str | None = None
             ) -> dict[str, str | None]:
    """Point ``alias`` back at the version it pointed to before the current one (popping the
    history). ``TrackingError`` when there is nothing to roll back to."""
    past = history(tracker, name, alias)
    current = champion_of(tracker, name, alias)
    if current is not None and past and past[-1] == current.version:
        past = past[:-1]
    if not past:
        raise TrackingError(f"--rollback: {name}@{alias} has no earlier version to go back to "
                            f"(history {HISTORY_TAG.format(alias=alias)} is empty)")
    target = past[-1]
    tracker.client.set_registered_model_tag(name, HISTORY_TAG.format(alias=alias), json.dumps(past))
    return move_alias(tracker, name, alias, target, reason=f"rollback from version "
                      f"{current.version if current else 'none'}", push=False,
                      parent_run_id=parent_run_id)


# -- the report ----------------------------------------------------------------------------------
def comparison_markdown(cmp: Comparison, *, name: str, alias: str) -> str:
    """A markdown table of ``cmp`` with the decision on top."""
    champ = f"champion v{cmp.champion_version}" if cmp.champion_version else "champion (none)"
    verdict = (f"**promoted** `{name}` v{cmp.challenger_version} to `@{alias}`" if cmp.promote
               else f"**kept** `@{alias}` on v{cmp.champion_version}; challenger "
                    f"v{cmp.challenger_version} stays registered")
    lines = [verdict, "", cmp.reason, "", f"| metric | role | {champ} | challenger "
             f"v{cmp.challenger_version} | change | ok |", "|---|---|---|---|---|---|"]
    for r in cmp.rows:
        lines.append(f"| {r.metric} ({'lower' if r.goal == 'min' else 'higher'} is better) | "
                     f"{r.role} | {_num(r.champion)} | {_num(r.challenger)} | "
                     f"{'' if r.change is None else _pct(r.change)} | {'yes' if r.ok else 'no'} |")
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def comparison_chart(cmp: Comparison, path: Path) -> Path:
    """A bar chart (PNG) per compared metric: champion (grey) and challenger (green when ok, red
    otherwise), each metric scaled to its larger value. Returns ``path``."""
    rows = [r for r in cmp.rows if r.challenger is not None]
    width, bar_h, pad, label_w = 640, 18, 10, 260
    height = pad + len(rows) * (2 * bar_h + pad) + pad + 16
    image = Image.new("RGB", (width, max(height, 60)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((pad, pad // 2), f"champion v{cmp.champion_version or '-'} (grey) vs challenger "
              f"v{cmp.challenger_version}", fill="black")
    y = pad + 16
    for r in rows:
        top = max(abs(r.challenger or 0.0), abs(r.champion or 0.0)) or 1.0
        draw.text((pad, y + bar_h // 2), r.metric[:40], fill="black")
        for value, colour in ((r.champion, (150, 150, 150)),
                              (r.challenger, (40, 150, 60) if r.ok else (200, 50, 50))):
            if value is not None:
                length = int((width - label_w - 80) * abs(value) / top)
                draw.rectangle([label_w, y, label_w + max(length, 1), y + bar_h - 2], fill=colour)
                draw.text((label_w + length + 4, y + 2), f"{value:.4f}", fill="black")
            y += bar_h
        y += pad
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
