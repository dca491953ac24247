"""A larger dataset: MLP regression on 24,000 generated samples, SGD with momentum, mean MSE.

The inputs are standard normal in 32 dimensions; the target is a fixed random two-layer teacher
network's output (scaled to unit variance) plus Gaussian noise of standard deviation 0.3. The
student is a 32-128-128-1 ReLU MLP. Everything is drawn from one seeded ``torch.Generator``:
nothing is downloaded and the global RNG is not touched. 24,000 train, 4,000 validation. A
stability benchmark task (``benchmarks/stability.py``): enough samples that the global batch is
bound by the noise scale or the throughput, not by the dataset size.

Run it with ``batchpilot tune benchmarks/tasks/large_regression.py:task``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot import Task

FEATURES = 32
TRAIN_SAMPLES = 24_000
VAL_SAMPLES = 4_000


def teacher_data(n: int, *, seed: int = 0, noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` inputs and noisy targets from a fixed random teacher network, shape ``(n, 1)``."""
    generator = torch.Generator().manual_seed(seed)
    hidden = 64
    w1 = torch.randn(FEATURES, hidden, generator=generator) / FEATURES**0.5
    w2 = torch.randn(hidden, 1, generator=generator) / hidden**0.5
    x = torch.randn(n, FEATURES, generator=generator)
    clean = torch.tanh(x @ w1) @ w2
    clean = (clean - clean.mean()) / clean.std()
    return x, clean + noise * torch.randn(n, 1, generator=generator)


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(FEATURES, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1)
    )


def loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, target = batch
    return F.mse_loss(model(x), target)


def optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def task() -> Task:
    x, target = teacher_data(TRAIN_SAMPLES + VAL_SAMPLES)
    return Task(
        name="large_regression",
        model=make_model,
        train_data=TensorDataset(x[:TRAIN_SAMPLES], target[:TRAIN_SAMPLES]),
        val_data=TensorDataset(x[TRAIN_SAMPLES:], target[TRAIN_SAMPLES:]),
        loss=loss,
        optimizer=optimizer,
        reduction="mean",
        reference_batch=128,
        reference_lr=0.01,
    )
