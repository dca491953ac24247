"""A tiny classification task for the sweep tests: 8 features, a linear boundary, a small MLP.

It learns in a few epochs, so a sweep over several batch sizes runs in about a second. Setting
``SWEEP_TEST_DELAY`` (seconds) slows every loss call, so that a test can kill a sweep mid-way.
Tests load it by path: ``tests/sweep_task.py:task``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot.task import Task


def _data(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    y = (x @ torch.linspace(-1.0, 1.0, 8) > 0).long()
    return TensorDataset(x, y)


def _loss(model: nn.Module, batch: Any) -> torch.Tensor:
    delay = float(os.environ.get("SWEEP_TEST_DELAY", "0"))
    if delay:
        time.sleep(delay)
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _accuracy(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return (model(x).argmax(dim=1) == y).float().mean()


def task() -> Task:
    return Task(
        name="blobs",
        model=lambda: nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)),
        train_data=_data(256, 0),
        val_data=_data(128, 1),
        loss=_loss,
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
        metric=_accuracy,
        metric_name="accuracy",
        reference_batch=16,
        reference_lr=0.2,
    )
