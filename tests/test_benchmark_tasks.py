"""The stability benchmark's own tasks (benchmarks/tasks/): each loads as a task file, its data is
generated the same on every load, and a short training run lowers its validation loss."""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from batchpilot import Task, evaluate, load_task, train

TASKS = Path(__file__).resolve().parent.parent / "benchmarks" / "tasks"


def _load(name: str) -> Task:
    return load_task(f"{TASKS / name}.py:task")


@pytest.mark.parametrize(
    ("name", "optimizer", "min_train_size"),
    [("adam_mlp", torch.optim.Adam, 1000), ("large_regression", torch.optim.SGD, 20_000)],
)
def test_task_loads_and_learns(
    name: str, optimizer: type[torch.optim.Optimizer], min_train_size: int
) -> None:
    task = _load(name)
    assert task.name == name
    assert task.train_size >= min_train_size
    assert task.reference_batch is not None and task.reference_lr is not None
    model = task.make_model()
    assert isinstance(task.make_optimizer(model.parameters(), task.reference_lr), optimizer)

    initial = evaluate(task, model).loss
    result = train(task, micro_batch=task.reference_batch, lr=task.reference_lr, steps=150, seed=0)
    assert not result.diverged
    assert result.final is not None
    # 150 steps is a fraction of an epoch on large_regression, yet both fall well below a fresh
    # model's loss (adam_mlp ~1.4 → ~0.6, large_regression ~1.1 → ~0.17).
    assert result.final.loss < 0.7 * initial


@pytest.mark.parametrize("name", ["adam_mlp", "large_regression"])
def test_data_is_the_same_on_every_load(name: str) -> None:
    torch.manual_seed(1)
    first = _load(name)
    torch.manual_seed(2)  # the data must not depend on the global RNG
    second = _load(name)
    for a, b in zip(first.train_data.tensors, second.train_data.tensors, strict=True):  # type: ignore[attr-defined]
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# The recommendation benchmark (benchmarks/recommendation.py): its six tasks, the S(B) fit and the
# interior lr search.

BENCHMARKS = TASKS.parent


@functools.cache
def _recommendation() -> Any:
    spec = importlib.util.spec_from_file_location(
        "_recommendation_benchmark", BENCHMARKS / "recommendation.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# name: (train, validation, reduction, optimizer)
RECOMMENDATION_TASKS = {
    "realizable_sum": (512, 512, "sum", "sgd"),
    "adam_classifier": (2048, 1024, "mean", "adam"),
    "rings_classifier": (4096, 1024, "mean", "sgd"),
    "adam_sum_regression": (16_384, 4096, "sum", "adam"),
    "mlp_regression_64k": (65_536, 8192, "mean", "sgd"),
    "noisy_linear_64k": (65_536, 8192, "mean", "sgd"),
}


def test_recommendation_benchmark_runs_these_tasks() -> None:
    assert set(_recommendation().DEFAULT_TASKS) == set(RECOMMENDATION_TASKS)


@pytest.mark.parametrize("name", sorted(RECOMMENDATION_TASKS))
def test_recommendation_task_builds_as_declared(name: str) -> None:
    bench = _recommendation().load_bench_task(name)
    task = bench.task
    train_size, val_size, reduction, optimizer = RECOMMENDATION_TASKS[name]
    assert task.name == name
    assert (task.train_size, len(task.val_data), task.reduction) == (
        train_size,
        val_size,
        reduction,
    )
    assert task.reference_batch is not None and task.reference_lr is not None
    model = task.make_model()
    made = task.make_optimizer(model.parameters(), task.reference_lr)
    if optimizer == "sgd":
        assert isinstance(made, torch.optim.SGD)
        assert made.param_groups[0]["momentum"] == 0.9
    else:
        assert isinstance(made, torch.optim.Adam)
        assert made.param_groups[0]["betas"] == (0.9, 0.999)
    # The loss reduces as declared: a sum over the batch is the mean times its size.
    x, y = (t[:8] for t in task.train_data.tensors)  # type: ignore[attr-defined]
    one = task.loss(model, (x, y))
    mean = torch.stack([task.loss(model, (x[i : i + 1], y[i : i + 1])) for i in range(8)]).mean()
    expected = mean * 8 if reduction == "sum" else mean
    assert torch.allclose(one, expected, rtol=1e-4)
    # The target is below a fresh model's validation loss (per sample), and above zero.
    fresh = _recommendation().val_loss(task, model, task.val_data.tensors)  # type: ignore[attr-defined]
    assert 0 < bench.target < fresh


@pytest.mark.parametrize("name", ["realizable_sum", "noisy_linear_64k"])
def test_recommendation_task_data_is_the_same_on_every_load(name: str) -> None:
    torch.manual_seed(1)
    first = _load(name)
    torch.manual_seed(2)
    second = _load(name)
    for a, b in zip(first.train_data.tensors, second.train_data.tensors, strict=True):  # type: ignore[attr-defined]
        assert torch.equal(a, b)


def test_steps_fit_recovers_s_min_and_b_crit() -> None:
    fit_steps = _recommendation().fit_steps
    batches = [4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    exact = fit_steps(batches, [40.0 * (1 + 700 / b) for b in batches])
    assert exact.s_min == pytest.approx(40.0, rel=1e-4)
    assert exact.b_crit == pytest.approx(700.0, rel=1e-4)
    assert exact.residual < 1e-6 and not exact.at_bound
    # ±8 % multiplicative noise (fixed): still within 15 %; unreached batches (inf) are skipped.
    wobble = [1.08, 0.93, 1.05, 0.95, 1.07, 0.92, 1.0, 1.06, 0.94, 1.03, 0.97]
    noisy = [12.0 * (1 + 25 / b) * w for b, w in zip(batches, wobble, strict=True)]
    fit = fit_steps(batches, [math.inf, *noisy[1:]])
    assert fit.points == len(batches) - 1
    assert fit.s_min == pytest.approx(12.0, rel=0.15)
    assert fit.b_crit == pytest.approx(25.0, rel=0.15)
    assert 0.02 < fit.residual < 0.1
    # Perfect scaling S ∝ 1/B has no finite B_crit: the fit says it ran to the bound.
    assert fit_steps([4, 8, 16], [4000.0, 2000.0, 1000.0]).at_bound == "upper"


def test_interior_lr_search_finds_the_optimum_and_the_good_range() -> None:
    search = _recommendation().search_interior
    calls: list[int] = []

    def steps(k: int) -> tuple[float, bool]:
        # Best at k = -6 (lr 2^-6), 1.2× within one point either side, diverging from k = -3.
        calls.append(k)
        if k >= -3:
            return math.inf, True
        return 100.0 * 1.15 ** abs(k + 6) ** 2, False

    results = search(steps, -10)  # starts four points too low
    assert len(calls) == len(set(calls))  # never evaluates a point twice
    assert sorted(results) == list(range(-11, -3))
    best = min(results, key=lambda k: results[k][0])
    assert best == -6 and best - 1 in results and best + 1 in results
    good = [k for k, (s, _) in results.items() if s <= 1.2 * results[best][0]]
    assert min(good) - 1 in results and max(good) + 1 in results

    # Started above the optimum, in the diverging region: it walks down.
    assert min(search(steps, -2), key=lambda k: search(steps, -2)[k][0]) == -6
    # Nothing reaches and the top diverges right above a too-slow point: it stops.
    flat = search(lambda k: (math.inf, k >= 1), 0)
    assert sorted(flat) == [-1, 0, 1]


def test_oracle_loop_accumulation_equals_the_full_batch() -> None:
    recommendation = _recommendation()
    task = recommendation.load_bench_task("realizable_sum").task
    whole = recommendation.train_to_target(
        task, recommendation.Setting(32, 1e-3), target=-1.0, seed=0, max_steps=20
    )
    split = recommendation.train_to_target(
        task,
        recommendation.Setting(8, 1e-3, accumulation=4),
        target=-1.0,
        seed=0,
        max_steps=20,
    )
    assert split.best_val == pytest.approx(whole.best_val, rel=1e-4)
    reached = recommendation.train_to_target(
        task, recommendation.Setting(32, 2e-3), target=0.03, seed=0, max_steps=200
    )
    assert reached.reached and reached.steps < 50  # the fast task: under 50 steps at batch 32
