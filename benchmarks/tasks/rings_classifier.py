"""Concentric rings: a 2-16-16-2 tanh MLP separating two interleaved rings, SGD with momentum.

The inputs are points in the plane at radii drawn around 1, 2 and 3 (the middle ring is the other
class) with a little radial noise, so the boundary is two circles: a non-convex problem that a
small network learns slowly from its start near a linear classifier. Mean cross-entropy. Everything
is drawn from one seeded ``torch.Generator``: nothing is downloaded and the global RNG is not
touched. 4,096 train, 1,024 validation.

Why it is in ``benchmarks/recommendation.py``: an SGD classifier that needs thousands of steps at
small batches (a long plateau before the rings separate: 3,200 at batch 32, beyond 20,000 at batch
4), on a mid-sized dataset. The classes separate, so the loss keeps falling; the target, 0.1, is
where the rings are learnt (B_crit ≈ 750 on the grid of 2026-12-02).

Run it with ``batchpilot tune benchmarks/tasks/rings_classifier.py:task``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot import Task

TRAIN_SAMPLES = 4_096
VAL_SAMPLES = 1_024
TARGET_VAL_LOSS = 0.1  # a fresh model's is ~0.7; the best runs go below 0.01


def rings(n: int, *, seed: int = 0, noise: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points on three rings (radii 1, 2, 3); the middle ring is class 1."""
    generator = torch.Generator().manual_seed(seed)
    ring = torch.randint(0, 3, (n,), generator=generator)
    radius = ring.float() + 1.0 + noise * torch.randn(n, generator=generator)
    angle = 2 * math.pi * torch.rand(n, generator=generator)
    x = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1) / 2.0
    return x, (ring == 1).long()


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)
    )


def loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, labels = batch
    return F.cross_entropy(model(x), labels)


def accuracy(model: nn.Module, batch: Any) -> torch.Tensor:
    x, labels = batch
    return (model(x).argmax(dim=1) == labels).float().mean()


def optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def task() -> Task:
    x, labels = rings(TRAIN_SAMPLES + VAL_SAMPLES)
    return Task(
        name="rings_classifier",
        model=make_model,
        train_data=TensorDataset(x[:TRAIN_SAMPLES], labels[:TRAIN_SAMPLES]),
        val_data=TensorDataset(x[TRAIN_SAMPLES:], labels[TRAIN_SAMPLES:]),
        loss=loss,
        optimizer=optimizer,
        metric=accuracy,
        metric_name="accuracy",
        metric_mode="max",
        reference_batch=32,
        reference_lr=0.05,
    )
