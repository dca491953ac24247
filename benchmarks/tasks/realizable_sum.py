"""A realizable linear regression with a summed loss, SGD with momentum: 512 samples, fast.

The inputs have 8 independent normal features with standard deviations from 1 down to 0.3 (a
condition number of about 11); the target is a fixed random linear teacher's output with no noise
at all, so the student (``nn.Linear(8, 1)``) can fit it exactly. The loss is the squared error
**summed** over the batch (``Task(reduction="sum")``). Everything is drawn from one seeded
``torch.Generator``: nothing is downloaded and the global RNG is not touched. 512 train, 512
validation.

Why it is in ``benchmarks/recommendation.py``: the small end of every axis. A realizable target
makes the gradient noise shrink with the error, so the critical batch stays small (well below 32)
however close to the optimum the target is; at batch 32 the target is
reached in a few dozen steps; the dataset has hundreds of samples; and the summed loss makes the
right lr fall as 1/B instead of rising. The best validation loss is 0, so the target is not "a few
% above the best" but 0.6 % of a fresh model's loss (``TARGET_VAL_LOSS``, per sample). The grid
of 2026-12-02 measured B_crit ≈ 2.5 and 39 steps at batch 32.

Run it with ``batchpilot tune benchmarks/tasks/realizable_sum.py:task``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot import Task

FEATURES = 8
TRAIN_SAMPLES = 512
VAL_SAMPLES = 512
TARGET_VAL_LOSS = 0.03  # squared error per sample; a fresh model's is 4.5–5.4


def teacher_data(n: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` inputs and their exact linear targets, shape ``(n, 1)``."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0.0, -0.52, FEATURES)  # std 1 … 0.3
    teacher = torch.randn(FEATURES, 1, generator=generator)
    x = torch.randn(n, FEATURES, generator=generator) * scales
    return x, x @ teacher


def make_model() -> nn.Module:
    return nn.Linear(FEATURES, 1)


def loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, target = batch
    return F.mse_loss(model(x), target, reduction="sum")


def optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def task() -> Task:
    x, target = teacher_data(TRAIN_SAMPLES + VAL_SAMPLES)
    return Task(
        name="realizable_sum",
        model=make_model,
        train_data=TensorDataset(x[:TRAIN_SAMPLES], target[:TRAIN_SAMPLES]),
        val_data=TensorDataset(x[TRAIN_SAMPLES:], target[TRAIN_SAMPLES:]),
        loss=loss,
        optimizer=optimizer,
        reduction="sum",
        reference_batch=32,
        reference_lr=1e-3,
    )
