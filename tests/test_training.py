from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from batchpilot.errors import BadInputError
from batchpilot.loading import load_task
from batchpilot.task import Task
from batchpilot.training._loop import accumulate_gradients, micro_batches, train


def _regression(reduction: str) -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 5, generator=g)
    y = x @ torch.randn(5, 1, generator=g) + 0.1 * torch.randn(256, 1, generator=g)
    return Task(
        model=lambda: torch.nn.Linear(5, 1),
        train_data=TensorDataset(x, y),
        val_data=TensorDataset(x[:64], y[:64]),
        loss=lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1], reduction=reduction),  # type: ignore[arg-type]
        optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr),
        reduction=reduction,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_accumulation_equals_one_big_batch(reduction: str) -> None:
    task = _regression(reduction)
    lr = 0.05 if reduction == "mean" else 0.05 / 128
    small = train(task, micro_batch=32, accumulation_steps=4, lr=lr, steps=3, seed=1)
    big = train(task, micro_batch=128, lr=lr, steps=3, seed=1)
    assert small.global_batch == big.global_batch == 128
    assert small.train_losses == pytest.approx(big.train_losses, rel=1e-5)
    assert small.final is not None and big.final is not None
    assert small.final.loss == pytest.approx(big.final.loss, rel=1e-5)


def test_reported_loss_is_per_sample_for_sum_reduction() -> None:
    model = torch.nn.Linear(5, 1)
    batches = [next(micro_batches(_regression("sum"), 32, seed=0))]
    summed = accumulate_gradients(_regression("sum"), model, batches, device=torch.device("cpu"))
    model.zero_grad()
    mean = accumulate_gradients(_regression("mean"), model, batches, device=torch.device("cpu"))
    assert summed == pytest.approx(mean, rel=1e-5)


def test_runs_are_reproducible_and_leave_global_rng_alone() -> None:
    task = load_task(example="spiral")
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    a = train(task, micro_batch=10, lr=0.3, steps=20, seed=3)
    assert torch.equal(torch.rand(1), expected)
    b = train(task, micro_batch=10, lr=0.3, steps=20, seed=3)
    assert a.train_losses == b.train_losses
    c = train(task, micro_batch=10, lr=0.3, steps=20, seed=4)
    assert a.train_losses != c.train_losses


def test_epochs_and_divergence() -> None:
    task = _regression("mean")
    result = train(task, micro_batch=32, lr=0.05, epochs=2)
    assert result.steps == 16 and result.epochs == pytest.approx(2.0)
    diverged = train(task, micro_batch=32, lr=1e4, steps=200)
    assert diverged.diverged and diverged.steps < 200


def test_micro_batch_larger_than_dataset() -> None:
    with pytest.raises(
        BadInputError, match=r"micro_batch: 17 is larger than the training set \(16 samples\)"
    ):
        train(load_task(example="xor4"), micro_batch=17, lr=1.0, steps=1)


@pytest.mark.parametrize(
    ("example", "batch", "lr", "steps", "drop"),
    [("digits", 64, 0.05, 60, 0.25), ("spiral", 10, 0.3, 3750, 0.6), ("xor4", 16, 20.0, 3000, 0.4)],
)
def test_examples_train(example: str, batch: int, lr: float, steps: int, drop: float) -> None:
    """Every built-in example learns: validation loss falls below `drop` × that of the fresh model."""
    task = load_task(example=example)
    untrained = train(task, micro_batch=batch, lr=1e-12, steps=1, seed=0)
    trained = train(task, micro_batch=batch, lr=lr, steps=steps, seed=0)
    assert untrained.final is not None and trained.final is not None
    assert trained.final.loss < drop * untrained.final.loss
    assert trained.final.metric is not None and trained.final.metric > untrained.final.metric  # type: ignore[operator]
