"""4-input XOR (parity): all 16 input patterns, a sigmoid MLP and a squared-error loss.

The seed's author fit this with full-batch gradient descent and watched the loss fall in stairs over
22,000 iterations. The task is to fit all 16 samples, so validation uses the same 16.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot.task import Task


def parity_data() -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.tensor(list(itertools.product((0.0, 1.0), repeat=4)))
    targets = (inputs.sum(dim=1) % 2).unsqueeze(1)
    return inputs, targets


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 1), nn.Sigmoid())


def loss(model: nn.Module, batch: Any) -> torch.Tensor:
    inputs, targets = batch
    return F.mse_loss(model(inputs), targets)


def accuracy(model: nn.Module, batch: Any) -> torch.Tensor:
    inputs, targets = batch
    return ((model(inputs) > 0.5).float() == targets).float().mean()


def optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr)


def task() -> Task:
    inputs, targets = parity_data()
    data = TensorDataset(inputs, targets)
    return Task(
        name="xor4",
        model=make_model,
        train_data=data,
        val_data=data,
        loss=loss,
        optimizer=optimizer,
        metric=accuracy,
        metric_name="accuracy",
        metric_mode="max",
        reference_batch=4,
        reference_lr=10.0,
    )
