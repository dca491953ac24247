"""Adam on a summed loss: an 8-32-1 tanh MLP regressing a smooth function of 16,384 samples.

The inputs are standard normal in 8 dimensions; the target is a fixed random sum of sines of
linear projections of them (scaled to unit variance) plus Gaussian noise of standard deviation
0.2. The loss is the squared error **summed** over the batch (``Task(reduction="sum")``), trained
with Adam at its default betas. Everything is drawn from one seeded ``torch.Generator``: nothing
is downloaded and the global RNG is not touched. 16,384 train, 4,096 validation.

Why it is in ``benchmarks/recommendation.py``: Adam's update does not scale with the loss, so a
summed loss should move Adam's lr as a mean one would, unlike SGD's (``realizable_sum``); a
mid-sized dataset and a non-convex model. The target, 0.1 per sample, is 2.4× the best validation
loss (0.042): where the fast phase of learning ends (560 steps at batch 32, B_crit ≈ 320 on the grid
of 2026-12-02); targets near the best take thousands of steps at every batch.

Run it with ``batchpilot tune benchmarks/tasks/adam_sum_regression.py:task``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot import Task

FEATURES = 8
TRAIN_SAMPLES = 16_384
VAL_SAMPLES = 4_096
NOISE = 0.2
TARGET_VAL_LOSS = 0.1  # per sample; a fresh model's is ~1, the best 0.042 (noise 0.04)


def teacher_data(n: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` inputs and noisy targets from a fixed sum of sines, shape ``(n, 1)``."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(FEATURES, 6, generator=generator) / FEATURES**0.5
    weights = torch.randn(6, 1, generator=generator)
    x = torch.randn(n, FEATURES, generator=generator)
    clean = torch.sin(1.5 * x @ directions) @ weights
    clean = (clean - clean.mean()) / clean.std()
    return x, clean + NOISE * torch.randn(n, 1, generator=generator)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.Tanh(), nn.Linear(32, 1))


def loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, target = batch
    return F.mse_loss(model(x), target, reduction="sum")


def optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr)


def task() -> Task:
    x, target = teacher_data(TRAIN_SAMPLES + VAL_SAMPLES)
    return Task(
        name="adam_sum_regression",
        model=make_model,
        train_data=TensorDataset(x[:TRAIN_SAMPLES], target[:TRAIN_SAMPLES]),
        val_data=TensorDataset(x[TRAIN_SAMPLES:], target[TRAIN_SAMPLES:]),
        loss=loss,
        optimizer=optimizer,
        reduction="sum",
        reference_batch=64,
        reference_lr=1e-3,
    )
