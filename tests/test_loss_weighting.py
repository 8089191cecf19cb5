"""Multi-task loss weighting (pipeline.engine.loss_weighting) on a toy problem: a shared
``Linear(4, 8)`` + tanh and one linear head per task, regressing random data. Each method is
checked against its paper: fixed sums, uncertainty's optimum exp(-s) = 1/(bL), DWA's eq. 7,
GradNorm's gradient-norm balancing; plus absent tasks, state_dict resume, the builder's errors and
agreement across distributed ranks."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.engine.loss_weighting import LossWeighting, build_loss_weighting
from pipeline.errors import ConfigError

TASKS = ("a", "b")


class Toy(nn.Module):
    """Shared ``Linear(4, 8)`` + tanh, one ``Linear(8, 1)`` head per task; MSE per task."""

    def __init__(self, tasks: tuple[str, ...], *, seed: int, noise: dict[str, float] | None = None,
                 n: int = 64) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=gen)
        self.y = {}
        for t in tasks:
            clean = torch.tanh(self.x @ torch.randn(4, 1, generator=gen))
            self.y[t] = clean + (noise or {}).get(t, 0.05) * torch.randn(n, 1, generator=gen)
        torch.manual_seed(seed)
        self.shared = nn.Linear(4, 8)
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in tasks})

    def losses(self, scale: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.shared(self.x))
        return {t: (scale or {}).get(t, 1.0) * (head(h) - self.y[t]).square().mean()
                for t, head in self.heads.items()}


def _train(toy: Toy, weighting: LossWeighting, steps: int, *, lr: float, adam: bool = False,
           scale: dict[str, float] | None = None, absent: tuple[str, ...] = ()) -> list[dict[str, float]]:
    """``steps`` optimizer steps on the weighted total; returns the per-step detached losses."""
    params = list(toy.parameters()) + list(weighting.parameters())
    opt = torch.optim.Adam(params, lr=lr) if adam else torch.optim.SGD(params, lr=lr)
    history = []
    for _ in range(steps):
        losses = {t: v for t, v in toy.losses(scale).items() if t not in absent}
        opt.zero_grad()
        total = weighting.combine(losses, shared_parameters=list(toy.shared.parameters()))
        total.backward()
        opt.step()
        values = {t: v.item() for t, v in losses.items()}
        weighting.after_step(values)
        history.append(values)
    return history


def _build(method: str, tasks: tuple[str, ...] = TASKS, base: dict[str, float] | None = None,
           **options: object) -> LossWeighting:
    return build_loss_weighting(method, tasks=tasks, base_weights=base or {}, **options)


# ---------------------------------------------------------------------------------------------
# fixed


def test_fixed_total_is_base_weighted_sum() -> None:
    toy = Toy(TASKS, seed=0)
    weighting = _build("fixed", base={"a": 0.5, "b": 3.0})
    losses = toy.losses()
    total = weighting.combine(losses)
    assert total.item() == (0.5 * losses["a"] + 3.0 * losses["b"]).item()
    assert weighting.weights() == {"a": 0.5, "b": 3.0}
    assert list(weighting.parameters()) == []
    assert _build("fixed").weights() == {"a": 1.0, "b": 1.0}  # base weights default to 1


# ---------------------------------------------------------------------------------------------
# uncertainty (Kendall et al. 2018)


def test_uncertainty_gradient_reaches_log_variance() -> None:
    weighting = _build("uncertainty", base={"a": 2.0, "b": 1.0}, init=0.5)
    losses = {"a": torch.tensor(0.3, requires_grad=True), "b": torch.tensor(4.0, requires_grad=True)}
    total = weighting.combine(losses)
    expected = math.exp(-0.5) * 2.0 * 0.3 + 0.5 + math.exp(-0.5) * 4.0 + 0.5
    assert total.item() == pytest.approx(expected, rel=1e-6)
    total.backward()
    s = weighting.log_variance
    # d/ds (exp(-s) b L + s) = 1 - exp(-s) b L
    assert s["a"].grad.item() == pytest.approx(1 - math.exp(-0.5) * 2.0 * 0.3, rel=1e-6)
    assert s["b"].grad.item() == pytest.approx(1 - math.exp(-0.5) * 4.0, rel=1e-6)
    assert losses["a"].grad.item() == pytest.approx(2.0 * math.exp(-0.5), rel=1e-6)
    assert weighting.weights() == pytest.approx({"a": 2.0 * math.exp(-0.5), "b": math.exp(-0.5)})


def test_uncertainty_optimum_is_inverse_loss() -> None:
    """With the losses held fixed, s_t converges to the paper's optimum exp(-s_t) = 1 / (b_t L_t)."""
    weighting = _build("uncertainty", base={"a": 1.0, "b": 2.0})
    losses = {"a": torch.tensor(0.2), "b": torch.tensor(3.0)}
    opt = torch.optim.Adam(weighting.parameters(), lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        weighting.combine(losses).backward()
        opt.step()
    w = weighting.weights()  # b_t exp(-s_t) -> 1 / L_t
    assert w["a"] * 0.2 == pytest.approx(1.0, abs=1e-2)
    assert w["b"] * 3.0 == pytest.approx(1.0, abs=1e-2)


def test_uncertainty_noisier_task_gets_smaller_weight() -> None:
    toy = Toy(TASKS, seed=1, noise={"a": 0.3, "b": 2.0})
    weighting = _build("uncertainty")
    _train(toy, weighting, 150, lr=0.05, adam=True)
    w = weighting.weights()
    assert w["b"] < w["a"] / 5
    final = {t: v.item() for t, v in toy.losses().items()}
    for t in TASKS:  # exp(-s_t) within 15 % of 1 / L_t at the current losses
        assert w[t] * final[t] == pytest.approx(1.0, rel=0.15), t


# ---------------------------------------------------------------------------------------------
# DWA (Liu et al. 2019, eq. 7)


def _eq7(ratios: dict[str, float], temperature: float) -> dict[str, float]:
    z = sum(math.exp(r / temperature) for r in ratios.values())
    return {t: len(ratios) * math.exp(r / temperature) / z for t, r in ratios.items()}


def test_dwa_weights_are_one_for_the_first_two_windows() -> None:
    weighting = _build("dwa", base={"a": 1.0, "b": 0.5}, window=3)
    for step in range(6):
        assert weighting.weights() == {"a": 1.0, "b": 0.5}, step
        weighting.after_step({"a": 4.0 / (step + 1), "b": 2.0})
    assert weighting.weights() != {"a": 1.0, "b": 0.5}  # window 3 uses windows 1 and 2


def test_dwa_stalling_task_gets_the_larger_weight_eq7() -> None:
    weighting = _build("dwa", base={"a": 1.0, "b": 0.5}, window=2, temperature=2.0)
    for a, b in [(5.0, 2.0), (3.0, 2.0), (1.5, 2.1), (0.5, 1.9)]:  # window means a: 4, 1; b: 2, 2
        weighting.after_step({"a": a, "b": b})
    w = _eq7({"a": 1.0 / 4.0, "b": 2.0 / 2.0}, 2.0)
    assert w["b"] > w["a"]
    assert weighting.weights() == pytest.approx({"a": w["a"], "b": 0.5 * w["b"]}, rel=1e-12)
    assert sum(weighting.weights()[t] / base for t, base in [("a", 1.0), ("b", 0.5)]) == pytest.approx(2.0)
    losses = {"a": torch.tensor(0.7), "b": torch.tensor(1.3)}
    assert weighting.combine(losses).item() == pytest.approx(w["a"] * 0.7 + 0.5 * w["b"] * 1.3, rel=1e-6)


def test_dwa_window_mean_counts_only_present_steps() -> None:
    weighting = _build("dwa", window=3, temperature=1.0)
    steps = [{"a": 2.0, "b": 9.0}, {"a": 2.0}, {"a": 2.0},    # b: mean 9 (one step), not 3
             {"a": 1.0}, {"a": 1.0, "b": 4.5}, {"a": 1.0}]    # b: 4.5; a: 2 -> 1
    for row in steps:
        weighting.after_step(row)
    assert weighting.weights() == pytest.approx(_eq7({"a": 0.5, "b": 0.5}, 1.0), rel=1e-12)
    assert weighting.weights() == pytest.approx({"a": 1.0, "b": 1.0})


def test_dwa_state_dict_resumes_bit_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    values = (torch.rand(20, 2, generator=gen, dtype=torch.float64) + 0.1).tolist()
    rows = [{"a": a, "b": b} for a, b in values]
    rows[8].pop("b")
    first = _build("dwa", window=3)
    for row in rows[:7]:  # two windows closed, one step into the third
        first.after_step(row)
    resumed = _build("dwa", window=3)
    resumed.load_state_dict(first.state_dict())
    fresh = _build("dwa", window=3)
    for row in rows[7:]:
        first.after_step(row)
        resumed.after_step(row)
        fresh.after_step(row)
        assert resumed.weights() == first.weights()
    assert fresh.weights() != first.weights()
    losses = {"a": torch.tensor(0.3), "b": torch.tensor(0.6)}
    assert resumed.combine(losses).item() == first.combine(losses).item()


# ---------------------------------------------------------------------------------------------
# GradNorm (Chen et al. 2018)


def test_gradnorm_weight_gradient_matches_the_paper() -> None:
    toy = Toy(TASKS, seed=2)
    weighting = _build("gradnorm", base={"a": 1.0, "b": 2.0}, alpha=1.5)
    shared = list(toy.shared.parameters())
    with torch.no_grad():
        weighting.task_weight["a"].fill_(0.8)
        weighting.task_weight["b"].fill_(1.2)
    weighting.initial_loss.copy_(torch.tensor([0.9, 0.3], dtype=torch.float64))  # L(0) as if seen earlier
    losses = toy.losses()
    total = weighting.combine(losses, shared_parameters=shared)
    assert total.item() == pytest.approx(0.8 * losses["a"].item() + 2.0 * 1.2 * losses["b"].item(), rel=1e-6)
    g = {t: torch.cat([p.flatten() for p in torch.autograd.grad(losses[t], shared, retain_graph=True)]).norm()
         .item() for t in TASKS}
    big_g = {"a": 0.8 * g["a"], "b": 1.2 * g["b"]}
    tilde = {"a": losses["a"].item() / 0.9, "b": losses["b"].item() / 0.3}
    mean_tilde = (tilde["a"] + tilde["b"]) / 2
    mean_g = (big_g["a"] + big_g["b"]) / 2
    for t in TASKS:
        target = mean_g * (tilde[t] / mean_tilde) ** 1.5
        expected = math.copysign(g[t], big_g[t] - target)  # d|w g - target|/dw, target constant
        assert weighting.task_weight[t].grad.item() == pytest.approx(expected, rel=1e-5), t
    grad_a = weighting.task_weight["a"].grad.item()
    total.backward()  # the graph survived the per-task gradient passes; w gets nothing from total
    assert weighting.task_weight["a"].grad.item() == grad_a
    assert toy.shared.weight.grad is not None


def test_gradnorm_first_loss_is_the_reference() -> None:
    toy = Toy(TASKS, seed=3)
    weighting = _build("gradnorm")
    first = {t: v.item() for t, v in toy.losses().items()}
    _train(toy, weighting, 5, lr=0.05)
    assert weighting.initial_loss.tolist() == pytest.approx([first["a"], first["b"]], rel=1e-6)


def test_gradnorm_task_with_bigger_gradients_loses_weight() -> None:
    toy = Toy(TASKS, seed=0)
    weighting = _build("gradnorm")
    _train(toy, weighting, 1, lr=0.01, scale={"b": 10.0})
    w1 = weighting.weights()
    assert w1["b"] < 1.0 < w1["a"]
    assert sum(w1.values()) == pytest.approx(2.0, abs=1e-6)
    _train(toy, weighting, 10, lr=0.01, scale={"b": 10.0})
    w = weighting.weights()
    assert w["b"] < w1["b"] and w["a"] > w1["a"]
    assert sum(w.values()) == pytest.approx(2.0, abs=1e-6)


def test_gradnorm_slower_task_gets_the_larger_weight() -> None:
    """Task b is noise-dominated (256 points, 8 hidden units: the noise cannot be fitted), so its
    loss ratio L/L(0) stays higher: its weight ends larger."""
    toy = Toy(TASKS, seed=0, noise={"a": 0.05, "b": 1.0}, n=256)
    weighting = _build("gradnorm", alpha=1.5)
    history = _train(toy, weighting, 100, lr=0.2)
    tilde = {t: history[-1][t] / history[0][t] for t in TASKS}
    w = weighting.weights()
    assert tilde["b"] > 3 * tilde["a"]
    assert w["b"] > 5 * w["a"]
    assert sum(w.values()) == pytest.approx(2.0, abs=1e-6)


def test_gradnorm_needs_the_shared_layer() -> None:
    weighting = _build("gradnorm")
    assert weighting.needs_shared_parameters
    assert not any(_build(m).needs_shared_parameters for m in ("fixed", "uncertainty", "dwa"))
    with pytest.raises(ConfigError, match="gradnorm needs the last shared layer"):
        weighting.combine(Toy(TASKS, seed=0).losses())


# ---------------------------------------------------------------------------------------------
# builder and absent tasks


@pytest.mark.parametrize(("method", "options", "message"), [
    ("softmax", {}, r"train\.loss_weighting\.method: unknown method 'softmax'; allowed: fixed, uncertainty, "
                    r"dwa, gradnorm"),
    ("dwa", {"temprature": 2.0}, r"options: unknown option 'temprature' for method 'dwa'; allowed: window, "
                                 r"temperature"),
    ("fixed", {"alpha": 1.0}, r"unknown option 'alpha' for method 'fixed'; allowed: none"),
    ("dwa", {"window": 0}, r"train\.loss_weighting\.options\.window: expected an integer >= 1"),
    ("dwa", {"window": 2.5}, r"options\.window: expected an integer"),
    ("dwa", {"temperature": 0}, r"options\.temperature: expected a finite number > 0"),
    ("gradnorm", {"alpha": -1.0}, r"options\.alpha: expected a finite number >= 0"),
    ("uncertainty", {"init": float("nan")}, r"options\.init: expected a finite number"),
])
def test_build_rejects_bad_config(method: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _build(method, **options)


def test_build_rejects_bad_base_weights() -> None:
    with pytest.raises(ConfigError, match=r"model\.loss_weights\.b: expected a finite number >= 0"):
        _build("fixed", base={"b": -1.0})
    with pytest.raises(ConfigError, match=r"loss_weights\.a: uncertainty weighting needs a weight > 0"):
        _build("uncertainty", base={"a": 0.0})
    assert _build("fixed", base={"a": 2.0, "other": 5.0}).weights() == {"a": 2.0, "b": 1.0}


@pytest.mark.parametrize("method", ["fixed", "uncertainty", "dwa", "gradnorm"])
def test_absent_task_keeps_its_weight(method: str) -> None:
    """Task c has no labels in the last step: its weight is untouched, even by SGD momentum on a
    zero (not None) gradient left by ``zero_grad(set_to_none=False)``."""
    tasks = ("a", "b", "c")
    toy = Toy(tasks, seed=4)
    weighting = _build(method, tasks=tasks, **({"window": 2} if method == "dwa" else {}))
    params = list(toy.parameters()) + list(weighting.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    shared = list(toy.shared.parameters())
    history = []
    for step in range(5):
        losses = toy.losses({"b": 5.0})
        if step == 4:
            del losses["c"]
        before = weighting.weights()
        opt.zero_grad(set_to_none=False)
        total = weighting.combine(losses, shared_parameters=shared)
        total.backward()
        opt.step()
        weighting.after_step({t: v.item() for t, v in losses.items()})
        history.append((before, weighting.weights()))
    before, after = history[-1]
    assert after["c"] == before["c"]
    if method in ("uncertainty", "gradnorm"):
        assert after["a"] != before["a"] and after["b"] != before["b"]  # the present tasks did move
        assert history[-2][0]["c"] != history[-2][1]["c"]  # and c moved while it was present
    if method == "gradnorm":
        assert sum(after.values()) == pytest.approx(3.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# distributed: two gloo ranks with different data agree on the weights


def _rank_main(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        dwa = _build("dwa", window=2)
        rows = [[{"a": 4.0, "b": 4.0}, {"a": 2.0, "b": 4.0}, {"a": 1.0, "b": 3.0}, {"a": 1.0, "b": 3.0}],
                [{"a": 6.0, "b": 2.0}, {"a": 4.0, "b": 2.0}, {"a": 3.0}, {"a": 3.0}]]  # no b in window 1
        for row in rows[rank]:
            dwa.after_step(row)
        toy = Toy(TASKS, seed=10 + rank)  # different data and initialisation per rank
        gradnorm = _build("gradnorm")
        _train(toy, gradnorm, 3, lr=0.05, scale={"b": 10.0} if rank else None)
        uncertainty = _build("uncertainty")
        losses = {"a": torch.tensor(1.0 + rank), "b": torch.tensor(2.0)}
        if rank == 1:
            del losses["b"]
        uncertainty.combine(losses).backward()
        with_grad = [t for t in TASKS if uncertainty.log_variance[t].grad is not None]
        torch.save({"dwa": dwa.weights(), "gradnorm": gradnorm.weights(),
                    "initial": gradnorm.initial_loss.tolist(), "uncertainty_grads": with_grad},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed (gloo)")
@pytest.mark.slow
def test_distributed_ranks_compute_identical_weights(tmp_path: Path) -> None:
    # spawn, not fork: a pytest-xdist worker holds threads, and a forked rank of it once exited
    # with code 1 on a loaded 2-core machine; spawn costs the ranks a fresh import (a few s)
    ctx = mp.start_processes(_rank_main, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 60
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail("the two ranks did not finish within 60 s")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0 == r1
    # window means over both ranks: a 4 then 2; b 3 then 3 (window 1 only from rank 0, which has it)
    assert r0["dwa"] == pytest.approx(_eq7({"a": 0.5, "b": 1.0}, 2.0), rel=1e-12)
    assert r0["gradnorm"] != {"a": 1.0, "b": 1.0}
    assert sum(r0["gradnorm"].values()) == pytest.approx(2.0, abs=1e-6)
    # b is absent on rank 1, yet both ranks hold a gradient for s_b (0 on rank 1), as the trainer's
    # per-parameter gradient averaging needs
    assert r0["uncertainty_grads"] == ["a", "b"]
