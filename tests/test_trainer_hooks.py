"""The training loop's own hooks (``pipeline.engine.train_loop.HookBase``): the order of their
calls, their state across a resume, and tracking as a hook that a run without a tracker lacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import load_config
from pipeline.engine.checkpoint import load_checkpoint
from pipeline.engine.train_loop import HookBase
from pipeline.engine.trainer import MLflowTracking, train
from tests.conftest import tiny_overrides

BUILT_IN = ["LRScheduler", "PluginHooks", "ProgressLogger", "PeriodicEvaluation", "Checkpointer",
            "EarlyStopping"]


def _cfg(data: Path, out: Path, **extra: object):
    values = {"train.steps": 2, "train.eval_every": 2, "train.checkpoint_every": 2,
              "train.log_every": 1, "data.image_size": 32, **extra}
    return load_config(None, tiny_overrides(data, out, None, **{k.replace(".", "__"): v
                                                              for k, v in values.items()}))


class Recorder(HookBase):
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.hooks: list[str] = []

    def before_train(self) -> None:
        self.hooks = [type(h).__name__ for h in self.trainer.hooks]
        self.calls.append(("before_train", self.trainer.step))

    def before_step(self, batch: dict[str, Any]) -> None:
        self.calls.append(("before_step", self.trainer.step))

    def after_step(self) -> None:
        assert "loss" in self.trainer.row
        self.calls.append(("after_step", self.trainer.step))

    def before_evaluation(self) -> None:
        self.calls.append(("before_evaluation", self.trainer.step))

    def after_evaluation(self, metrics: dict[str, float]) -> None:
        assert metrics is self.trainer.state.metrics
        self.calls.append(("after_evaluation", self.trainer.step))

    def on_checkpoint(self, payload: dict[str, Any], path: Path) -> None:
        self.calls.append(("on_checkpoint", payload["step"], path.name))

    def after_train(self) -> None:
        self.calls.append(("after_train", self.trainer.step))

    def close(self) -> None:
        self.calls.append(("close", self.trainer.step))


class Counter(HookBase):
    """Counts steps across resumes: entry ``counter`` of ``last.pt``."""

    def __init__(self) -> None:
        self.steps = 0
        self.loaded: dict[str, Any] | None = None

    def after_step(self) -> None:
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"counter": {"steps": self.steps}}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        self.loaded = checkpoint["counter"]
        self.steps = self.loaded["steps"]


class FakeTracker:
    def __init__(self) -> None:
        self.run_id: str | None = None
        self.calls: list[str] = []

    def start(self, *, run_id: str | None = None, run_name: str | None = None,
              tags: dict[str, str] | None = None) -> str:
        self.calls.append("start")
        self.run_id = run_id or "run-1"
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        self.calls.append("log_params")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.calls.append(f"log_metrics {step} {sorted({k.split('/')[0] for k in metrics})}")

    def set_tags(self, tags: dict[str, str]) -> None:
        self.calls.append("set_tags")


def test_a_hook_sees_the_calls_in_order_and_no_tracker_means_no_tracking_hook(
        tiny_dataset: Path, tmp_path: Path) -> None:
    rec = Recorder()
    result = train(_cfg(tiny_dataset, tmp_path), trainer_hooks=[rec])
    assert result.step == 2
    assert rec.calls == [("before_train", 0), ("before_step", 0), ("after_step", 1),
                         ("before_step", 1), ("after_step", 2),
                         ("before_evaluation", 2), ("after_evaluation", 2),
                         ("on_checkpoint", 2, "best.pt"), ("on_checkpoint", 2, "last.pt"),
                         ("after_train", 2), ("close", 2)]
    # the extra hook sits after the loggers, before evaluation; no tracker: no MLflowTracking
    assert rec.hooks == [*BUILT_IN[:3], "Recorder", *BUILT_IN[3:]]


def test_hook_state_survives_a_resume_and_tracking_is_a_hook(tiny_dataset: Path,
                                                            tmp_path: Path) -> None:
    first, tracker = Counter(), FakeTracker()
    train(_cfg(tiny_dataset, tmp_path), trainer_hooks=[MLflowTracking(tracker), first])
    assert tracker.calls == ["start", "log_params", "log_metrics 1 ['train']",
                             "log_metrics 2 ['train']", "log_metrics 2 ['val']", "set_tags"]
    out = tmp_path / "train"
    assert load_checkpoint(out / "last.pt")["counter"] == {"steps": 2}
    assert "counter" not in load_checkpoint(out / "best.pt")  # a hook's state is resume state

    again = Counter()  # resumed: its state comes back from last.pt, and goes on
    result = train(_cfg(tiny_dataset, tmp_path, **{"train.steps": 3}), trainer_hooks=[again])
    assert again.loaded == {"steps": 2} and again.steps == 3 and result.step == 3
    assert load_checkpoint(out / "last.pt")["counter"] == {"steps": 3}
