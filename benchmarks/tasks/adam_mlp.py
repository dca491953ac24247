"""A small classifier trained with Adam: a 16-64-64-4 ReLU MLP on 4,000 generated samples.

The inputs are standard normal in 16 dimensions; each label is the argmax of a fixed random
two-layer teacher network plus a little label noise, so the classes are separable but not
linearly. Everything is drawn from one seeded ``torch.Generator``: nothing is downloaded and the
global RNG is not touched. 4,000 train, 1,000 validation. A stability benchmark task
(``benchmarks/stability.py``): the Adam-family branch of ``tune``'s lr rule.

Run it with ``batchpilot tune benchmarks/tasks/adam_mlp.py:task``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot import Task

FEATURES = 16
CLASSES = 4
TRAIN_SAMPLES = 4000
VAL_SAMPLES = 1000


def teacher_data(
    n: int, *, seed: int = 0, label_noise: float = 0.05
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` inputs and the labels a fixed random teacher network gives them."""
    generator = torch.Generator().manual_seed(seed)
    hidden = 32
    w1 = torch.randn(FEATURES, hidden, generator=generator) / FEATURES**0.5
    w2 = torch.randn(hidden, CLASSES, generator=generator) / hidden**0.5
    x = torch.randn(n, FEATURES, generator=generator)
    labels = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    # Flip a few labels so the validation loss has a floor above zero, as real data does.
    flip = torch.rand(n, generator=generator) < label_noise
    labels[flip] = torch.randint(0, CLASSES, (int(flip.sum()),), generator=generator)
    return x, labels


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, CLASSES)
    )


def loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, labels = batch
    return F.cross_entropy(model(x), labels)


def accuracy(model: nn.Module, batch: Any) -> torch.Tensor:
    x, labels = batch
    return (model(x).argmax(dim=1) == labels).float().mean()


def optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr)


def task() -> Task:
    x, labels = teacher_data(TRAIN_SAMPLES + VAL_SAMPLES)
    return Task(
        name="adam_mlp",
        model=make_model,
        train_data=TensorDataset(x[:TRAIN_SAMPLES], labels[:TRAIN_SAMPLES]),
        val_data=TensorDataset(x[TRAIN_SAMPLES:], labels[TRAIN_SAMPLES:]),
        loss=loss,
        optimizer=optimizer,
        metric=accuracy,
        metric_name="accuracy",
        metric_mode="max",
        reference_batch=64,
        reference_lr=1e-3,
    )
