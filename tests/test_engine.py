"""The training engine as real runs use it: kill -9 and resume, DDP on gloo, non-finite losses,
early stopping, lifecycle hooks (entry point + EMA), loss weighting in the loop, precision."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import load_config
from pipeline.engine.checkpoint import load_checkpoint
from pipeline.engine.loaders import ResumableRandomSampler
from pipeline.engine.trainer import train
from pipeline.errors import ConfigError, DensepipeError
from pipeline.hookspecs import hookimpl
from pipeline.registry import TaskRegistry
from tests.conftest import REPO_ROOT, tiny_overrides
from tests.plugin_dist import write_distribution

MULTI = {"model.tasks": "[semantic,depth]",
         "model.heads": "{semantic: {conv_dims: 16}, depth: {conv_dims: 16}}"}


def _cfg(data: Path, out: Path, **extra: object):
    values = {**MULTI, "model.fpn_channels": 16, **extra}
    return load_config(None, tiny_overrides(data, out, None, **{k.replace(".", "__"): v
                                                              for k, v in values.items()}))


def _params_file(data: Path, out: Path, path: Path, **extra: object) -> Path:
    """A params.yaml for a subprocess run (the same tiny run as ``_cfg``)."""
    cfg = _cfg(data, out, **extra)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# -- sampling --------------------------------------------------------------------------------------
def test_ranks_split_each_global_batch_and_resume_continues_the_stream() -> None:
    one = ResumableRandomSampler(10, seed=3, global_batch=4)
    it = iter(one)
    stream = [next(it) for _ in range(12)]  # 3 steps, crossing an epoch boundary at position 10
    assert [p for _, p in stream] == list(range(12))
    assert sorted(i for i, _ in stream[:10]) == list(range(10))  # an epoch is a permutation
    ranks = [iter(ResumableRandomSampler(10, seed=3, global_batch=4, rank=r, world_size=2))
             for r in range(2)]
    two = []
    for _ in range(3):  # each step: rank 0 takes the first half of the global batch, rank 1 the rest
        two += [next(ranks[0]) for _ in range(2)] + [next(ranks[1]) for _ in range(2)]
    assert two == stream
    resumed = iter(ResumableRandomSampler(10, seed=3, global_batch=4, start_step=2))
    assert [next(resumed) for _ in range(4)] == stream[8:12]


# -- crash-safe resume ----------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_then_rerun_equals_the_uninterrupted_run(tiny_dataset: Path, tmp_path: Path) -> None:
    steps = 10
    extra = {"train.steps": steps, "train.checkpoint_every": 1, "train.eval_every": 4,
             "train.deterministic": True, "train.ema.decay": 0.9}
    whole = _params_file(tiny_dataset, tmp_path / "whole", tmp_path / "whole.yaml", **extra)
    proc = _cli("train", "--params", str(whole), cwd=tmp_path)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()  # type: ignore[union-attr]

    killed = _params_file(tiny_dataset, tmp_path / "killed", tmp_path / "killed.yaml", **extra)
    last = tmp_path / "killed" / "train" / "last.pt"
    proc = _cli("train", "--params", str(killed), cwd=tmp_path)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if last.exists() and load_checkpoint(last)["step"] >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = load_checkpoint(last)["step"]
    assert 4 <= stopped_at < steps
    rerun = _cli("train", "--params", str(killed), cwd=tmp_path)
    assert rerun.wait(timeout=300) == 0, rerun.stdout.read()  # type: ignore[union-attr]

    a, b = load_checkpoint(tmp_path / "whole/train/last.pt"), load_checkpoint(last)
    assert a["step"] == b["step"] == steps
    _assert_bit_equal(a["model"], b["model"])
    _assert_bit_equal(a["model_ema"], b["model_ema"])
    assert a["metrics"] == b["metrics"]
    assert a["hooks"]["ema"]["updates"] == b["hooks"]["ema"]["updates"] == steps


# -- DDP ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(
        tiny_dataset: Path, tmp_path: Path) -> None:
    """torchrun --nproc_per_node=2 on CPU: each process takes half of the global batch of 4; the
    weights after 3 steps equal the single-process run's. GroupNorm in the backbone and heads, so
    no statistic depends on how the batch is split (BatchNorm would need SyncBatchNorm, CUDA
    only), no augmentation cropping so per-image losses are means over equal pixel counts, and SGD
    (Adam divides by the gradient's own size, which turns float rounding in near-zero gradients
    into steps of size lr)."""
    extra = {"train.steps": 3, "train.batch_size": 4, "train.eval_every": 3,
             "model.backbone_norm": "gn", "data.augment": False, "train.clip_grad_norm": "null",
             "train.optimizer": "sgd", "train.lr": 0.05,
             "model.heads": "{semantic: {conv_dims: 16, norm: GN}, depth: {conv_dims: 16, norm: GN}}"}
    single = _params_file(tiny_dataset, tmp_path / "one", tmp_path / "one.yaml", **extra)
    proc = _cli("train", "--params", str(single), cwd=tmp_path)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()  # type: ignore[union-attr]

    double = _params_file(tiny_dataset, tmp_path / "two", tmp_path / "two.yaml", **extra)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--standalone", "-m", "pipeline.cli", "train", "--params", str(double)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    one = load_checkpoint(tmp_path / "one/train/last.pt")
    two = load_checkpoint(tmp_path / "two/train/last.pt")
    assert two["world_size"] == 2 and two["step"] == one["step"] == 3
    worst = max(float((one["model"][k].float() - two["model"][k].float()).abs().max())
                for k in one["model"])
    assert worst < 1e-5, worst
    # evaluation shards merged across ranks: the same metrics as one process over all images
    for key, value in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert not list((tmp_path / "two" / "train").glob("*.tmp*"))
    assert run.stdout.count("trained to step 3") == 1  # only rank 0 reports


# -- non-finite losses ----------------------------------------------------------------------------
class _NaNAfter:
    """Wraps the semantic loss to be NaN from step ``k`` on (a planted fault)."""

    def __init__(self, k: int) -> None:
        self.k, self.calls = k, 0

    def install(self, registry: TaskRegistry) -> None:
        task = registry.get("semantic")
        original = task.losses

        def losses(output, batch, *, options):
            self.calls += 1
            terms = original(output, batch, options=options)
            if self.calls >= self.k:
                terms = {k: v * float("nan") for k, v in terms.items()}
            return terms

        task.losses = losses  # type: ignore[method-assign]


def test_planted_nan_stops_with_task_term_and_step_and_keeps_the_checkpoint(
        tiny_dataset: Path, tmp_path: Path) -> None:
    registry = TaskRegistry()
    _NaNAfter(4).install(registry)
    cfg = _cfg(tiny_dataset, tmp_path, **{"train.steps": 6, "train.checkpoint_every": 2})
    with pytest.raises(DensepipeError) as err:
        train(cfg, registry=registry)
    message = str(err.value)
    assert "non-finite loss at step 4: semantic/ce = nan" in message
    assert str(tmp_path / "train" / "last.pt") in message
    kept = load_checkpoint(tmp_path / "train" / "last.pt")  # intact and loadable
    assert kept["step"] == 2
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_skip_nonfinite_counts_and_keeps_weights_finite(tiny_dataset: Path, tmp_path: Path) -> None:
    registry = TaskRegistry()
    _NaNAfter(3).install(registry)
    cfg = _cfg(tiny_dataset, tmp_path, **{"train.steps": 4, "train.skip_nonfinite": True})
    result = train(cfg, registry=registry)
    assert result.step == 4 and result.skipped_nonfinite == 2
    ckpt = load_checkpoint(result.last)
    assert ckpt["skipped_nonfinite"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert result.losses[-1] == {"skipped_nonfinite": 2.0}


# -- early stopping and best.pt -------------------------------------------------------------------
@pytest.mark.slow
def test_early_stopping_stops_and_a_rerun_does_not_continue(tiny_dataset: Path, tmp_path: Path) -> None:
    # lr 1e-9 and frozen backbone norms (no running statistics moving in train mode): nothing
    # improves, so patience 2 stops at the 3rd evaluation (steps 1, 2, 3)
    cfg = _cfg(tiny_dataset, tmp_path, **{"train.steps": 20, "train.eval_every": 1,
                                           "model.backbone_norm": "frozen_bn",
                                           "train.lr": 1e-9, "train.early_stopping.patience": 2,
                                           "train.early_stopping.min_delta": 0.01})
    result = train(cfg)
    assert result.stopped_early and result.step == 3
    ckpt = load_checkpoint(result.last)
    assert ckpt["early_stopping"] == {"best": ckpt["early_stopping"]["best"], "bad_evals": 2,
                                      "stopped": True}
    again = train(cfg)
    assert again.step == 3 and again.stopped_early


@pytest.mark.slow
def test_best_checkpoint_follows_a_lower_is_better_metric(tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_dataset, tmp_path, **{"train.steps": 4, "train.eval_every": 1,
                                           "train.best_metric": "depth/rmse"})
    result = train(cfg)
    best = load_checkpoint(result.best)
    assert best["best_value"] == pytest.approx(best["metrics"]["depth/rmse"])
    assert best["best_value"] <= result.metrics["depth/rmse"]


# -- hooks ----------------------------------------------------------------------------------------
HOOK_PLUGIN = '''
import json, os
from pipeline.hookspecs import hookimpl

def _log(event, **data):
    with open(os.environ["HOOK_LOG"], "a") as f:
        f.write(json.dumps({"event": event, **data}) + "\\n")

@hookimpl
def densepipe_train_start(state):
    _log("start", step=state.step, resumed=state.resumed_from is not None)

@hookimpl
def densepipe_after_step(state, losses):
    _log("step", step=state.step, loss=losses["loss"])

@hookimpl
def densepipe_after_evaluation(state, metrics):
    _log("eval", step=state.step, mIoU=metrics["semantic/mIoU"])

@hookimpl
def densepipe_on_checkpoint(state, payload, path):
    payload["hooks"]["steplog"] = {"step": state.step}
    _log("ckpt", step=state.step, name=path.name)
'''


def test_hook_plugin_from_an_entry_point_is_called(tiny_dataset: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    folder = write_distribution(tmp_path / "site", dist="densepipe-steplog", module="densepipe_steplog",
                                source=HOOK_PLUGIN, entry_name="steplog", group="densepipe.hooks")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("HOOK_LOG", str(tmp_path / "hooks.jsonl"))
    cfg = _cfg(tiny_dataset, tmp_path, **{"train.steps": 3, "train.eval_every": 2,
                                           "train.checkpoint_every": 3})
    train(cfg)
    events = [json.loads(line) for line in (tmp_path / "hooks.jsonl").read_text().splitlines()]
    kinds = [(e["event"], e["step"]) for e in events]
    assert kinds[0] == ("start", 0)
    assert [s for k, s in kinds if k == "step"] == [1, 2, 3]
    assert [s for k, s in kinds if k == "eval"] == [2, 3]
    assert ("ckpt", 3) in kinds
    assert load_checkpoint(tmp_path / "train" / "last.pt")["hooks"]["steplog"] == {"step": 3}

    disabled = _cfg(tiny_dataset, tmp_path / "off", **{"train.steps": 1,
                                                         "train.disabled_hooks": "[steplog]"})
    before = len(events)
    train(disabled)
    assert len((tmp_path / "hooks.jsonl").read_text().splitlines()) == before


def test_hook_plugin_that_fails_to_import_is_named(tiny_dataset: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_distribution(tmp_path / "site", dist="densepipe-broken", module="densepipe_broken",
                                source="import not_a_module\n", entry_name="broken",
                                group="densepipe.hooks")
    monkeypatch.syspath_prepend(str(folder))
    with pytest.raises(DensepipeError, match=r"training hook broken = densepipe_broken: import failed: "
                                             r"ModuleNotFoundError"):
        train(_cfg(tiny_dataset, tmp_path, **{"train.steps": 1}))


def test_ema_is_the_average_of_the_weights_and_used_for_evaluation(tiny_dataset: Path,
                                                                  tmp_path: Path) -> None:
    seen: list[dict[str, torch.Tensor]] = []

    class Recorder:
        @hookimpl
        def densepipe_train_start(self, state):
            seen.append({k: v.clone() for k, v in state.model.state_dict().items()})

        @hookimpl
        def densepipe_after_step(self, state):
            seen.append({k: v.clone() for k, v in state.model.state_dict().items()})

    cfg = _cfg(tiny_dataset, tmp_path, **{"train.steps": 3, "train.ema.decay": 0.5,
                                           "train.ema.warmup": False})
    train(cfg, hooks=[("recorder", Recorder())])
    ckpt = load_checkpoint(tmp_path / "train" / "last.pt")
    key = "heads.depth.predictor.weight" if "heads.depth.predictor.weight" in ckpt["model"] else \
        next(k for k, v in ckpt["model"].items() if v.is_floating_point() and k.startswith("heads"))
    # the recorder runs before or after the EMA's own update; either way seen[0] is the start
    avg = seen[0][key]
    for weights in seen[1:4]:
        avg = 0.5 * avg + 0.5 * weights[key]
    assert torch.allclose(ckpt["model_ema"][key], avg, atol=1e-6)
    assert torch.equal(ckpt["model"][key], seen[3][key])  # the raw weights, for resuming
    assert not torch.equal(ckpt["model_ema"][key], ckpt["model"][key])


# -- loss weighting and precision in the loop -----------------------------------------------------
@pytest.mark.parametrize("method", ["uncertainty", "dwa", "gradnorm"])
def test_each_weighting_runs_in_the_loop_and_logs_its_weights(tiny_dataset: Path, tmp_path: Path,
                                                              method: str) -> None:
    options = "{window: 1}" if method == "dwa" else "{}"
    cfg = _cfg(tiny_dataset, tmp_path, **{"train.steps": 4, "train.loss_weighting.method": method,
                                           "train.loss_weighting.options": options})
    result = train(cfg)
    weights = [(r["weight/semantic"], r["weight/depth"]) for r in result.losses]
    assert len(weights) == 4 and all(w > 0 for pair in weights for w in pair)
    assert weights[-1] != weights[0], f"{method} never changed its weights: {weights}"
    state = load_checkpoint(result.last)["loss_weighting"]
    assert state, "the weighting's state is checkpointed for resume"


def test_precision_settings(tiny_dataset: Path, tmp_path: Path) -> None:
    bf16 = train(_cfg(tiny_dataset, tmp_path, **{"train.steps": 2, "train.precision": "bf16"}))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in bf16.losses)
    with pytest.raises(ConfigError, match="train.precision=fp16 needs a CUDA device"):
        train(_cfg(tiny_dataset, tmp_path / "fp16", **{"train.steps": 1, "train.precision": "fp16"}))
    with pytest.raises(ConfigError, match="train.batch_size=3 must be divisible"):
        from pipeline.engine.distributed import DistEnv, per_rank_batch

        per_rank_batch(3, DistEnv(rank=0, world_size=2))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_build_optimizer_uses_the_fused_kernel_with_the_default_arithmetic(optimizer: str) -> None:
    from pipeline.engine.trainer import build_optimizer

    cfg = load_config(None, [f"train.optimizer={optimizer}", "train.lr=0.01", "train.weight_decay=0.1"])
    torch.manual_seed(0)  # float64: the two kernels round alike to far below the update's size
    fused_model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).double()
    plain_model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).double()
    plain_model.load_state_dict(fused_model.state_dict())
    start = fused_model[0].weight.detach().clone()
    fused = build_optimizer(cfg, fused_model)
    assert fused.defaults["fused"] is True
    assert [g["weight_decay"] for g in fused.param_groups] == [0.1, 0.0]  # conv weight; biases, BN
    plain = build_optimizer(cfg, plain_model)
    plain.defaults["fused"] = None
    for group in plain.param_groups:
        group["fused"] = None  # torch's default implementation, for reference
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for _ in range(3):
        for model, opt in ((fused_model, fused), (plain_model, plain)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert (fused_model[0].weight - start).abs().max() > 1e-3  # the steps moved the weights


def test_build_optimizer_falls_back_where_the_fused_kernel_is_not_supported() -> None:
    from pipeline.engine.trainer import build_optimizer

    cfg = load_config(None, ["train.optimizer=adamw"])
    model = torch.nn.Linear(2, 2, device="meta")
    assert build_optimizer(cfg, model).defaults["fused"] is None
