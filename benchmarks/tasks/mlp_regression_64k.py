"""A tiny MLP regression on 65,536 samples, SGD with momentum, mean MSE.

The inputs are standard normal in 16 dimensions; the target is a fixed random two-layer tanh
teacher's output (scaled to unit variance) plus Gaussian noise of standard deviation 0.3. The
student is a 16-32-1 tanh MLP. Everything is drawn from one seeded ``torch.Generator``: nothing
is downloaded and the global RNG is not touched. 65,536 train, 8,192 validation.

Why it is in ``benchmarks/recommendation.py``: a non-convex SGD task on a large dataset whose
critical batch sits in the middle of the grid, between ``realizable_sum`` and
``noisy_linear_64k`` (B_crit ≈ 275 on the grid of 2026-12-02). The target, 0.12, is a third above
the best validation loss (0.090); targets within a few % of it push B_crit past 1,000, which
``noisy_linear_64k`` covers.

Run it with ``batchpilot tune benchmarks/tasks/mlp_regression_64k.py:task``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot import Task

FEATURES = 16
TRAIN_SAMPLES = 65_536
VAL_SAMPLES = 8_192
NOISE = 0.3
TARGET_VAL_LOSS = 0.12  # a fresh model's is ~1.2, the best ~0.090 (noise 0.09)


def teacher_data(n: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` inputs and noisy targets from a fixed random teacher network, shape ``(n, 1)``."""
    generator = torch.Generator().manual_seed(seed)
    hidden = 8
    w1 = torch.randn(FEATURES, hidden, generator=generator) / FEATURES**0.5
    w2 = torch.randn(hidden, 1, generator=generator) / hidden**0.5
    x = torch.randn(n, FEATURES, generator=generator)
    clean = torch.tanh(2 * x @ w1) @ w2
    clean = (clean - clean.mean()) / clean.std()
    return x, clean + NOISE * torch.randn(n, 1, generator=generator)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.Tanh(), nn.Linear(32, 1))


def loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, target = batch
    return F.mse_loss(model(x), target)


def optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def task() -> Task:
    x, target = teacher_data(TRAIN_SAMPLES + VAL_SAMPLES)
    return Task(
        name="mlp_regression_64k",
        model=make_model,
        train_data=TensorDataset(x[:TRAIN_SAMPLES], target[:TRAIN_SAMPLES]),
        val_data=TensorDataset(x[TRAIN_SAMPLES:], target[TRAIN_SAMPLES:]),
        loss=loss,
        optimizer=optimizer,
        reference_batch=64,
        reference_lr=0.05,
    )
