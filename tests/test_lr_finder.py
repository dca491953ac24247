from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot.cli import main
from batchpilot.errors import BadInputError
from batchpilot.measure._lr_range import (
    DEFAULT_METHOD,
    debiased_ema,
    default_smoothing,
    find_lr,
    lr_schedule,
    stability_edge,
    verification_candidates,
)
from batchpilot.measure._lr_suggest import METHODS
from batchpilot.plots.lr_find import plot_lr_find
from batchpilot.task import Task

F64 = torch.float64


def _mse(model: nn.Module, batch: Any) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def _sse(model: nn.Module, batch: Any) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch[0]), batch[1], reduction="sum")


def _sgd(params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr)


def _quadratic(d: int, n: int = 64) -> tuple[Task, float]:
    """Noise-free linear regression in float64 and its stable-lr bound 2 / λ_max(Hessian)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=F64) * torch.tensor([3.0, 1.0, 0.5][:d], dtype=F64)
    y = x @ torch.randn(d, 1, generator=g, dtype=F64)
    hessian = 2.0 / n * x.T @ x  # of mean((x w - y)^2)
    bound = 2.0 / torch.linalg.eigvalsh(hessian).max().item()
    task = Task(
        model=lambda: nn.Linear(d, 1, bias=False).double(),
        train_data=TensorDataset(x, y),
        loss=_mse,
        optimizer=_sgd,
    )
    return task, bound


def _regression(reduction: str = "mean", n: int = 512) -> Task:
    """A small float64 MLP regression without BatchNorm: accumulation must not change a thing."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g, dtype=F64)
    y = x[:, :1] - 0.5 * x[:, 1:2] + 0.05 * torch.randn(n, 1, generator=g, dtype=F64)

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)).double()

    return Task(
        model=model,
        train_data=TensorDataset(x, y),
        val_data=TensorDataset(x[:128], y[:128]),
        loss=_mse if reduction == "mean" else _sse,
        optimizer=_sgd,
        reduction=reduction,  # type: ignore[arg-type]
    )


# ------------------------------------------------------------------------ smoothing, schedule


def test_first_smoothed_point_is_the_first_loss() -> None:
    smoothed = debiased_ema([3.0, 1.0, 2.0], 0.98)
    assert smoothed[0] == pytest.approx(3.0)
    # The second point is the weighted mean of both losses, weights 0.98 : 1.
    assert smoothed[1] == pytest.approx((0.98 * 0.02 * 3.0 + 0.02 * 1.0) / (1 - 0.98**2))
    # Lightning divides by 1 - β^(k+1) with k already counting the point: half the loss.
    lightning_first = 0.02 * 3.0 / (1 - 0.98**2)
    assert lightning_first == pytest.approx(3.0 / 1.98)


def test_schedule_and_default_smoothing() -> None:
    lrs = lr_schedule(1e-6, 10.0, 100)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(10.0)
    assert np.allclose(lrs[1:] / lrs[:-1], (1e7) ** (1 / 99))
    assert np.allclose(np.diff(lr_schedule(0.1, 1.0, 10, "linear")), 0.1)
    assert default_smoothing(100) == pytest.approx(0.9)
    assert default_smoothing(5) == 0.0


# ------------------------------------------------------------------ a problem with an answer


def test_quadratic_turns_and_stops_where_theory_says() -> None:
    task, bound = _quadratic(d=1)
    result = find_lr(
        task, micro_batch=64, min_lr=bound / 1000, max_lr=bound * 100, steps=100, repeats=1
    )
    run = result.runs[0]
    lrs, losses = np.array(run.lrs), np.array(run.losses)
    assert run.smoothed[0] == run.losses[0]
    # Full-batch GD on a quadratic: each step multiplies the loss by (1 - lr λ)^2, so the point
    # of every lr below 2/λ is lower than the one before, and every point above it higher. A
    # point paired with the wrong step's lr would show the turn one lr early.
    falls = np.diff(losses) < 0
    assert falls[lrs[1:] < bound].all()
    assert not falls[lrs[1:] > bound].any()
    assert (lrs > bound).any()
    # The test stops only after the bound; without smoothing, within three steps of it.
    assert result.diverged_at is not None and result.diverged_at > bound
    unsmoothed = find_lr(
        task,
        micro_batch=64,
        min_lr=bound / 1000,
        max_lr=bound * 100,
        steps=100,
        repeats=1,
        smoothing=0.0,
    )
    step = (1e5) ** (1 / 99)
    assert unsmoothed.diverged_at is not None
    assert bound < unsmoothed.diverged_at <= bound * step**3


def test_quadratic_in_several_dimensions_never_stops_before_the_bound() -> None:
    task, bound = _quadratic(d=3)
    result = find_lr(
        task, micro_batch=64, min_lr=bound / 1000, max_lr=bound * 100, steps=80, repeats=1
    )
    lrs, losses = np.array(result.lrs), np.array(result.losses)
    assert (np.diff(losses)[lrs[1:] < bound] < 0).all()
    assert result.diverged_at is not None and result.diverged_at > bound
    assert result.suggestion is not None and result.suggestion < bound


# --------------------------------------------------------------- batches, losses, param groups


def test_accumulation_gives_the_curve_of_the_global_batch() -> None:
    task = _regression()
    options: dict[str, Any] = {"min_lr": 1e-4, "max_lr": 30.0, "steps": 50, "repeats": 1}
    accumulated = find_lr(task, micro_batch=32, accumulation_steps=4, **options)
    whole = find_lr(task, micro_batch=128, **options)
    assert accumulated.global_batch == whole.global_batch == 128
    points = min(len(accumulated.losses), len(whole.losses))
    assert points > 25
    assert np.allclose(accumulated.losses[:points], whole.losses[:points], rtol=1e-6)
    assert accumulated.suggestions == whole.suggestions
    # Not dividing the micro-losses by the accumulation steps would be a 4× larger lr: different.
    four_times = find_lr(task, micro_batch=128, **{**options, "min_lr": 4e-4, "max_lr": 120.0})
    assert not np.allclose(four_times.losses[:25], whole.losses[:25], rtol=1e-3)


def test_sum_reduced_loss_is_the_mean_loss_at_a_batch_times_smaller_lr() -> None:
    options: dict[str, Any] = {"steps": 50, "repeats": 1}
    mean = find_lr(_regression("mean"), micro_batch=64, min_lr=1e-3, max_lr=30.0, **options)
    summed = find_lr(
        _regression("sum"),
        micro_batch=16,
        accumulation_steps=4,
        min_lr=1e-3 / 64,
        max_lr=30.0 / 64,
        **options,
    )
    points = min(len(mean.losses), len(summed.losses))
    assert points > 25
    # Points are per-sample mean losses whatever the reduction.
    assert np.allclose(summed.losses[:points], mean.losses[:points], rtol=1e-6)
    assert summed.reduction == "sum"


class RecordingSGD(torch.optim.SGD):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[list[float]] = []

    def step(self, closure: Any = None) -> Any:
        self.seen.append([group["lr"] for group in self.param_groups])
        return super().step(closure)


def test_every_parameter_group_keeps_its_ratio() -> None:
    base = _regression()
    made: list[RecordingSGD] = []

    def optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
        body, head = list(params)[:2], list(params)[2:]
        made.append(RecordingSGD([{"params": body, "lr": lr}, {"params": head, "lr": lr * 0.1}]))
        return made[-1]

    task = Task(model=base.model, train_data=base.train_data, loss=base.loss, optimizer=optimizer)
    result = find_lr(task, micro_batch=64, min_lr=1e-4, max_lr=1.0, steps=20, repeats=1)
    seen = np.array(made[0].seen)
    assert len(seen) == 20
    assert np.allclose(seen[:, 0], lr_schedule(1e-4, 1.0, 20))
    assert np.allclose(seen[:, 1], 0.1 * seen[:, 0])
    assert np.allclose(result.lrs, seen[: len(result.lrs), 0])


# ------------------------------------------------------------------------ divergence, no descent


def test_divergence_stop_keeps_the_points_before_it() -> None:
    task = _regression()
    result = find_lr(task, micro_batch=64, min_lr=1e-3, max_lr=1e4, steps=80, repeats=1)
    run = result.runs[0]
    assert run.diverged_at is not None and len(run.losses) < 80
    schedule = lr_schedule(1e-3, 1e4, 80)
    assert run.diverged_at == pytest.approx(schedule[len(run.losses)])
    best = np.minimum.accumulate(run.smoothed)
    assert (np.array(run.smoothed) <= 4.0 * best + 1e-12).all()


def test_non_finite_loss_stops_the_test() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 3, generator=g) * 100.0
    task = Task(
        model=lambda: nn.Linear(3, 1),
        train_data=TensorDataset(x, x.sum(dim=1, keepdim=True)),
        loss=_mse,
        optimizer=_sgd,
    )
    result = find_lr(
        task,
        micro_batch=64,
        min_lr=1e-6,
        max_lr=1e6,
        steps=60,
        repeats=1,
        divergence_factor=math.inf,
    )
    assert result.diverged_at is not None and len(result.losses) < 60
    assert all(math.isfinite(value) for value in result.losses)
    json.dumps(result.to_dict())


def test_flat_loss_has_no_suggestion_but_a_message() -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(512, 4, generator=g), torch.randn(512, 1, generator=g)

    def flat(model: nn.Module, batch: Any) -> torch.Tensor:
        # The parameters do not change the loss; the batches do: flat, noisy.
        return (batch[1] ** 2).mean() + 0.0 * model(batch[0]).sum()

    task = Task(
        model=lambda: nn.Linear(4, 1),
        train_data=TensorDataset(x, y),
        loss=flat,
        optimizer=_sgd,
    )
    for seed in range(2):
        result = find_lr(task, micro_batch=16, steps=100, repeats=2, seed=seed)
        assert result.suggestion is None
        assert result.suggestions == dict.fromkeys(METHODS, None)
        assert result.message is not None and result.message.startswith("no descent found")


# ------------------------------------------------------------------------ repeats, state, API


def test_repeats_are_reproducible_and_spread_summarises_them() -> None:
    task = _regression()
    first = find_lr(task, micro_batch=32, min_lr=1e-4, max_lr=100.0, steps=40, repeats=3, seed=5)
    again = find_lr(task, micro_batch=32, min_lr=1e-4, max_lr=100.0, steps=40, repeats=3, seed=5)
    assert first.losses == again.losses and first.suggestions == again.suggestions
    assert [run.seed for run in first.runs] == [5, 6, 7]
    assert first.runs[0].losses != first.runs[1].losses
    points = len(first.lrs)
    mean = np.mean([run.losses[:points] for run in first.runs], axis=0)
    assert np.allclose(first.losses, mean)
    for method in METHODS:
        values = [run.suggestions[method] for run in first.runs]
        assert all(value is not None for value in values)
        assert first.spread[method]["median"] == pytest.approx(float(np.median(values)))
        assert first.spread[method]["q1"] <= first.spread[method]["median"]  # type: ignore[operator]
    assert first.method == DEFAULT_METHOD and first.suggestion == first.suggestions[DEFAULT_METHOD]


def _user_setup() -> tuple[Task, nn.Module, torch.optim.Optimizer]:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 4, generator=g)
    y = x[:, :1] - x[:, 1:2] + 0.1 * torch.randn(256, 1, generator=g)

    def model() -> nn.Module:
        return nn.Sequential(
            nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1)
        )

    task = Task(
        model=model,
        train_data=TensorDataset(x, y),
        loss=_mse,
        optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr),
    )
    torch.manual_seed(0)
    user_model = model()
    user_optimizer = torch.optim.Adam(
        [
            {"params": list(user_model.parameters())[:4], "lr": 1e-3},
            {"params": list(user_model.parameters())[4:], "lr": 5e-4},
        ]
    )
    for start in (0, 32, 64):  # a few real steps: Adam state, BatchNorm statistics
        user_optimizer.zero_grad()
        _mse(user_model, (x[start : start + 32], y[start : start + 32])).backward()
        user_optimizer.step()
    _mse(user_model, (x[:32], y[:32])).backward()  # pending gradients
    user_model[3].eval()  # a mixed train/eval state must come back as it was
    return task, user_model, user_optimizer


def test_user_model_and_optimizer_are_restored_bitwise() -> None:
    task, model, optimizer = _user_setup()
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    flags = [m.training for m in model.modules()]
    opt_state = copy.deepcopy(optimizer.state_dict())
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())

    result = find_lr(
        task, micro_batch=32, model=model, optimizer=optimizer, steps=30, repeats=2, max_lr=1.0
    )

    assert len(result.runs) == 2 and len(result.lrs) > 10
    assert result.runs[0].losses != result.runs[1].losses  # different data orders
    for key, value in model.state_dict().items():
        assert torch.equal(value, tensors[key]), key  # weights and BatchNorm statistics
    for p, g in zip(model.parameters(), grads, strict=True):
        assert p.grad is not None and torch.equal(p.grad, g)
    assert [m.training for m in model.modules()] == flags
    restored = optimizer.state_dict()
    assert restored["param_groups"] == opt_state["param_groups"]
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 5e-4]
    for index, state in opt_state["state"].items():
        for name, value in state.items():
            assert torch.equal(restored["state"][index][name], value), (index, name)
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert np.array_equal(np.random.get_state()[1], rng[1])
    assert random.getstate() == rng[2]


def test_user_model_without_optimizer_is_restored_too() -> None:
    task, model, _ = _user_setup()
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    result = find_lr(task, micro_batch=32, model=model, steps=20, repeats=1, max_lr=1.0)
    assert len(result.losses) > 5
    assert all(torch.equal(v, tensors[k]) for k, v in model.state_dict().items())


def test_fresh_task_runs_leave_the_global_rng_alone() -> None:
    torch.manual_seed(9)
    before = torch.get_rng_state()
    find_lr(_regression(), micro_batch=64, steps=15, repeats=1)
    assert torch.equal(torch.get_rng_state(), before)


def test_verification_trains_the_rules_and_a_ladder_below_the_edge() -> None:
    task = _regression()
    result = find_lr(
        task,
        micro_batch=64,
        min_lr=1e-4,
        max_lr=100.0,
        steps=40,
        repeats=1,
        verify_steps=15,
        verify_seeds=2,
        verify_final_seeds=4,
    )
    check = result.verification
    assert check is not None and check.split == "val" and check.seeds == 2
    edge = stability_edge(result)
    assert result.diverged_at is not None and edge == result.diverged_at
    first_round = verification_candidates(result)
    # The ladder: the five largest powers of 2 at least √2 below the edge.
    ladder = sorted(lr for name, lr in first_round.items() if "edge/" in name)
    top = 2.0 ** math.floor(math.log2(edge / math.sqrt(2)))
    assert ladder == [top / 2**k for k in range(4, -1, -1)]
    assert top <= edge / math.sqrt(2) < 2 * top
    # Each rule's suggestion, rounded to the nearest power of √2.
    for name, lr in result.suggestions.items():
        assert lr is not None
        snapped = next(v for k, v in first_round.items() if name in k.split(" & "))
        assert math.log2(snapped) * 2 == round(math.log2(snapped) * 2)
        assert abs(math.log2(snapped / lr)) <= 0.25 + 1e-9
    tried = {c.lr: c for c in check.candidates}
    assert set(first_round.values()) <= set(tried)
    # Scores are medians over seeds.
    for c in tried.values():
        if not c.diverged:
            assert c.loss == pytest.approx(float(np.median(c.losses)))
            assert c.mean_loss == pytest.approx(float(np.mean(c.losses)))
    # Successive halving: the three best of round one got a second seed; refinements got both.
    singles = [c for c in tried.values() if len(c.losses) == 1]
    seeded = [c for c in tried.values() if len(c.losses) >= 2]
    firsts = sorted(
        (c for c in tried.values() if c.lr in set(first_round.values())), key=lambda c: c.losses[0]
    )
    finite_firsts = [c for c in firsts if math.isfinite(c.losses[0])]
    assert {c.lr for c in finite_firsts[:3]} <= {c.lr for c in seeded}
    assert all(c.lr in set(first_round.values()) for c in singles)
    refined = [c for c in tried.values() if c.lr not in set(first_round.values())]
    assert refined and all(c.lr < edge and len(c.losses) >= 2 for c in refined)
    # Tie-break: the leader on two seeds and the rivals whose median lies below its worst seed
    # went on to four seeds.
    two = sorted(
        (c for c in seeded if all(math.isfinite(x) for x in c.losses[:2])),
        key=lambda c: (float(np.median(c.losses[:2])), c.lr),
    )
    leader, reach = two[0], max(two[0].losses[:2])
    rivals = [c for c in two[1:3] if float(np.median(c.losses[:2])) < reach]
    finals = [c for c in tried.values() if len(c.losses) == 4]
    assert {c.lr for c in finals} == ({leader.lr} | {c.lr for c in rivals} if rivals else set())
    assert all(len(c.losses) in (1, 2, 4) for c in tried.values())
    # The winner: the lowest median among the candidates trained with the most seeds.
    pool = [c for c in (finals or seeded) if not c.diverged]
    best = min(pool, key=lambda c: c.loss)
    assert check.final_seeds == (4 if finals else None)
    assert check.best_lr == best.lr and set(check.best_methods) == set(best.methods)
    assert check.runs == sum(len(c.losses) for c in tried.values())
    assert result.suggestion == best.lr
    assert json.loads(json.dumps(result.to_dict()))["verification"]["best_lr"] == best.lr


def test_verification_answers_when_the_curve_shows_no_descent() -> None:
    # spiral sits on a plateau for 60 steps: no descent, but the ladder below max_lr still runs.
    from batchpilot.loading import load_task

    task = load_task(example="spiral")
    result = find_lr(
        task,
        micro_batch=10,
        steps=60,
        repeats=1,
        verify_steps=30,
        verify_seeds=1,
        verify_final_seeds=1,
    )
    assert result.verification is not None and result.verification.final_seeds is None
    assert all(len(c.losses) == 1 for c in result.verification.candidates)
    assert result.message is not None and result.message.startswith("no descent found")
    assert result.suggestions == dict.fromkeys(METHODS, None)
    assert result.verification is not None and result.suggestion == result.verification.best_lr
    assert result.suggestion is not None and result.suggestion < stability_edge(result)  # type: ignore[operator]
    assert any("verification runs alone" in note for note in result.notes)
    # The plot marks the verified lr.
    lines = plot_lr_find(result).get_lines()
    verified = [line for line in lines if str(line.get_label()).startswith("verified")]
    assert len(verified) == 1 and verified[0].get_xdata()[0] == result.suggestion


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"micro_batch": 0}, r"^micro_batch: expected a positive integer, got 0"),
        ({"micro_batch": 10_000}, r"^micro_batch: 10000 is larger than the training set"),
        ({"min_lr": 1.0, "max_lr": 0.5}, r"^max_lr: expected more than min_lr"),
        ({"min_lr": -1.0}, r"^min_lr: expected a positive number"),
        ({"steps": 3}, r"^steps: expected at least 10"),
        ({"mode": "cosine"}, r"^mode: expected one of exponential, linear, got 'cosine'"),
        ({"repeats": 0}, r"^repeats: expected a positive integer"),
        ({"divergence_factor": 1.0}, r"^divergence_factor: expected a number above 1"),
        ({"smoothing": 1.0}, r"^smoothing: expected a number in \[0, 1\)"),
        ({"method": "best"}, r"^method: unknown method 'best'"),
        ({"verify_final_seeds": 0}, r"^verify_final_seeds: expected a positive integer"),
        ({"optimizer": torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)}, r"^optimizer: "),
    ],
)
def test_bad_arguments_name_themselves(kwargs: dict[str, Any], message: str) -> None:
    options: dict[str, Any] = {"micro_batch": 16, **kwargs}
    with pytest.raises(BadInputError, match=message):
        find_lr(_regression(), **options)


def test_linear_mode() -> None:
    result = find_lr(
        _regression(), micro_batch=64, min_lr=0.01, max_lr=2.0, steps=20, mode="linear"
    )
    assert np.allclose(np.diff(result.lrs), (2.0 - 0.01) / 19)
    assert result.mode == "linear"


# ----------------------------------------------------------------------------- plot and CLI


def test_plot_marks_every_suggestion() -> None:
    result = find_lr(_regression(), micro_batch=32, min_lr=1e-4, max_lr=100.0, steps=40)
    ax = plot_lr_find(result)
    labels = [line.get_label() for line in ax.get_lines()]
    for method, lr in result.suggestions.items():
        assert lr is not None
        assert any(label.startswith(method) for label in labels)
    assert ax.get_xscale() == "log"


def test_cli_writes_json_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["lr-find", "--example", "spiral", "--batch", "10", "--steps", "30", "--repeats", "2"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--format", "json", "--out", str(tmp_path), "--device", "cpu"])
    assert exit_info.value.code == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("lrs", "losses", "suggestion", "suggestions", "spread"):
        assert key in data
    assert set(data["suggestions"]) == set(METHODS) == set(data["spread"])
    assert len(data["lrs"]) == len(data["losses"])
    assert Path(data["plot"]).is_file() and Path(data["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert json.loads(Path(data["json"]).read_text())["lrs"] == data["lrs"]

    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--no-plot", "--device", "cpu"])
    assert exit_info.value.code == 0
    assert "lr range test on spiral" in capsys.readouterr().out


def test_cli_bad_batch_names_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["lr-find", "--example", "xor4", "--batch", "0", "--no-plot"])
    assert exit_info.value.code == 2
    assert "--batch: expected a positive integer, got 0" in capsys.readouterr().err


def test_cli_verification_options(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["lr-find", "--example", "xor4", "--steps", "20", "--repeats", "1", "--no-plot"]
    verify = ["--verify-steps", "10", "--verify-seeds", "2", "--verify-final-seeds", "3"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *verify, "--format", "json"])
    assert exit_info.value.code == 0
    check = json.loads(capsys.readouterr().out)["verification"]
    assert check["seeds"] == 2 and check["final_seeds"] in (3, None)
    counts = {len(c["losses"]) for c in check["candidates"]}
    assert counts <= {1, 2, 3} and 2 in counts and (3 in counts) == (check["final_seeds"] == 3)
    for c in check["candidates"]:
        assert c["loss"] == pytest.approx(float(np.median(c["losses"])))
        assert c["mean_loss"] == pytest.approx(float(np.mean(c["losses"])))

    with pytest.raises(SystemExit) as exit_info:
        main([*args, *verify])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "the lowest median val loss" in out and "median val loss" in out

    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--verify-steps", "10", "--verify-final-seeds", "0"])
    assert exit_info.value.code == 2
    assert "--verify-final-seeds: expected a positive integer, got 0" in capsys.readouterr().err
