"""scikit-learn's 8×8 handwritten digits with a small CNN that has BatchNorm.

1,797 images ship inside scikit-learn, so nothing is downloaded: 1,437 train, 360 validation.
Run it with ``batchpilot tune --example digits`` or copy this file as a template for your task.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot.task import Task


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def loss(model: nn.Module, batch: Any) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def accuracy(model: nn.Module, batch: Any) -> torch.Tensor:
    images, labels = batch
    return (model(images).argmax(dim=1) == labels).float().mean()


def optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def task() -> Task:
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    n_train = 1437
    return Task(
        name="digits",
        model=make_model,
        train_data=TensorDataset(images[:n_train], labels[:n_train]),
        val_data=TensorDataset(images[n_train:], labels[n_train:]),
        loss=loss,
        optimizer=optimizer,
        metric=accuracy,
        metric_name="accuracy",
        metric_mode="max",
        reference_batch=64,
        reference_lr=0.05,
    )
