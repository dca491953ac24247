"""Noisy linear regression on 65,536 samples, SGD with momentum, mean MSE: a large critical batch.

The inputs have 128 independent normal features with standard deviations from 1 down to 0.25; the
target is a fixed random linear teacher's output plus Gaussian noise of standard deviation 0.5,
so the best validation loss is about 0.25 (the noise variance) plus the fit's error. The student
is ``nn.Linear(128, 1)``. Everything is drawn from one seeded ``torch.Generator``: nothing is
downloaded and the global RNG is not touched. 65,536 train, 8,192 validation.

Why it is in ``benchmarks/recommendation.py``: the large end. Near the noise floor the gradient's
signal shrinks while its noise (the label noise) does not, so a target a few % above the floor
has a critical batch above 1,000 (≈ 2,000 on the grid of 2026-12-02), and at batch 32 it takes
thousands of steps (3,600; batch 4 does not reach it in 20,000); the dataset is large enough that
batch 4096 is 1/16 of an epoch. The target is 0.7 % above the best validation loss.

Run it with ``batchpilot tune benchmarks/tasks/noisy_linear_64k.py:task``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot import Task

FEATURES = 128
TRAIN_SAMPLES = 65_536
VAL_SAMPLES = 8_192
NOISE = 0.5
TARGET_VAL_LOSS = 0.2538  # 0.7 % above the best, 0.2520 (least squares on the train set)


def teacher_data(n: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` inputs and noisy linear targets, shape ``(n, 1)``."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0.0, -0.6, FEATURES)  # std 1 … 0.25
    teacher = torch.randn(FEATURES, 1, generator=generator)
    x = torch.randn(n, FEATURES, generator=generator) * scales
    return x, x @ teacher + NOISE * torch.randn(n, 1, generator=generator)


def make_model() -> nn.Module:
    return nn.Linear(FEATURES, 1)


def loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, target = batch
    return F.mse_loss(model(x), target)


def optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def task() -> Task:
    x, target = teacher_data(TRAIN_SAMPLES + VAL_SAMPLES)
    return Task(
        name="noisy_linear_64k",
        model=make_model,
        train_data=TensorDataset(x[:TRAIN_SAMPLES], target[:TRAIN_SAMPLES]),
        val_data=TensorDataset(x[TRAIN_SAMPLES:], target[TRAIN_SAMPLES:]),
        loss=loss,
        optimizer=optimizer,
        reference_batch=64,
        reference_lr=0.01,
    )
