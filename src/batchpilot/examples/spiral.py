"""The TensorFlow Playground's two-spiral problem with a small tanh MLP.

The Playground draws 500 points on two interleaved spirals (noise 0 by default) and trains on half
of them; so does this task (250 train, 250 validation), generated from a fixed seed. Coordinates
span about ±5, as in the Playground. Plain SGD at batch 10, lr 0.3 fits it in about 150 epochs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot.task import Task


def spiral_points(
    n: int = 500, *, noise: float = 0.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points, half on each spiral arm, as in the Playground's ``classifySpiralData``."""
    generator = torch.Generator().manual_seed(seed)
    half = n // 2
    points, labels = [], []
    for label, delta in ((1.0, 0.0), (0.0, math.pi)):
        i = torch.arange(half, dtype=torch.float32)
        radius = i / half * 5.0
        angle = 1.75 * i / half * 2.0 * math.pi + delta
        xy = torch.stack([radius * torch.sin(angle), radius * torch.cos(angle)], dim=1)
        xy += noise * 5.0 * (torch.rand(half, 2, generator=generator) * 2.0 - 1.0)
        points.append(xy)
        labels.append(torch.full((half,), label))
    x, y = torch.cat(points), torch.cat(labels)
    order = torch.randperm(len(y), generator=generator)
    return x[order], y[order]


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
    )


def loss(model: nn.Module, batch: Any) -> torch.Tensor:
    points, labels = batch
    return F.binary_cross_entropy_with_logits(model(points).squeeze(1), labels)


def accuracy(model: nn.Module, batch: Any) -> torch.Tensor:
    points, labels = batch
    return ((model(points).squeeze(1) > 0).float() == labels).float().mean()


def optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr)


def task() -> Task:
    x, y = spiral_points()
    return Task(
        name="spiral",
        model=make_model,
        train_data=TensorDataset(x[:250], y[:250]),
        val_data=TensorDataset(x[250:], y[250:]),
        loss=loss,
        optimizer=optimizer,
        metric=accuracy,
        metric_name="accuracy",
        metric_mode="max",
        reference_batch=10,
        reference_lr=0.3,
    )
