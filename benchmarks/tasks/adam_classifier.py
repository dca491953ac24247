"""A small Adam classifier: a 16-32-4 tanh MLP on 2,048 generated samples, mean cross-entropy.

The inputs are standard normal in 16 dimensions; each label is the argmax of a fixed random
two-layer teacher network, with 5 % of the labels redrawn at random so the validation loss has a
floor above zero. Adam with its default betas. Everything is drawn from one seeded
``torch.Generator``: nothing is downloaded and the global RNG is not touched. 2,048 train, 1,024
validation.

Why it is in ``benchmarks/recommendation.py``: the Adam branch of tune's lr rule on a mean loss,
on a dataset small enough that the largest batch is the whole of it, and a target 3 % above the
best validation loss (0.494) that every batch reaches (about 100 steps at batch 32, 700 at batch
4; B_crit ≈ 100 on the grid of 2026-12-02).

Run it with ``batchpilot tune benchmarks/tasks/adam_classifier.py:task``.
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
TRAIN_SAMPLES = 2_048
VAL_SAMPLES = 1_024
TARGET_VAL_LOSS = 0.51  # 3 % above the best validation loss, 0.494


def teacher_data(
    n: int, *, seed: int = 0, label_noise: float = 0.05
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` inputs and the labels a fixed random teacher network gives them."""
    generator = torch.Generator().manual_seed(seed)
    hidden = 16
    w1 = torch.randn(FEATURES, hidden, generator=generator) / FEATURES**0.5
    w2 = torch.randn(hidden, CLASSES, generator=generator) / hidden**0.5
    x = torch.randn(n, FEATURES, generator=generator)
    labels = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    flip = torch.rand(n, generator=generator) < label_noise
    labels[flip] = torch.randint(0, CLASSES, (int(flip.sum()),), generator=generator)
    return x, labels


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.Tanh(), nn.Linear(32, CLASSES))


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
        name="adam_classifier",
        model=make_model,
        train_data=TensorDataset(x[:TRAIN_SAMPLES], labels[:TRAIN_SAMPLES]),
        val_data=TensorDataset(x[TRAIN_SAMPLES:], labels[TRAIN_SAMPLES:]),
        loss=loss,
        optimizer=optimizer,
        metric=accuracy,
        metric_name="accuracy",
        metric_mode="max",
        reference_batch=32,
        reference_lr=1e-3,
    )
