"""The stability benchmark's own tasks (benchmarks/tasks/): each loads as a task file, its data is
generated the same on every load, and a short training run lowers its validation loss."""

from __future__ import annotations

from pathlib import Path

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
