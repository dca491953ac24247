"""Leaving the user's state exactly as it was: RNG streams, model, optimizer, BatchNorm statistics.

Every probe and tuning run goes through :func:`preserved`; on exit, parameters, buffers (BatchNorm
running statistics and non-persistent buffers included), gradients, train/eval flags, optimizer state and hyper-parameters and
every RNG stream are restored bitwise. Snapshots are kept on the CPU, so no second copy of the model
sits on the accelerator.

>>> import torch
>>> model = torch.nn.Linear(2, 1)
>>> before = model.weight.clone()
>>> with preserved(model):
...     _ = model.weight.data.add_(1.0)
...     _ = torch.rand(3)
>>> torch.equal(model.weight, before)
True
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class RngState:
    """Every RNG stream a training step may draw from."""

    python: Any
    numpy: Any
    torch_cpu: torch.Tensor
    cuda: tuple[torch.Tensor, ...]


def capture_rng() -> RngState:
    cuda = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else ()
    return RngState(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)


def restore_rng(state: RngState) -> None:
    random.setstate(state.python)
    np.random.set_state(state.numpy)
    torch.set_rng_state(state.torch_cpu)
    if state.cuda:
        torch.cuda.set_rng_state_all(list(state.cuda))


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the body, then put every RNG stream back as it was."""
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(item) for item in value)
    return copy.deepcopy(value)


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of ``model``: its state dict, and the buffers registered with
    ``persistent=False`` that the state dict leaves out (a probe's steps may change them too)."""
    tensors: dict[str, torch.Tensor] = dict(model.state_dict(keep_vars=True))
    for name, buffer in model.named_buffers(remove_duplicate=False):
        tensors.setdefault(name, buffer)
    return tensors


@dataclass
class ModelSnapshot:
    """A CPU copy of a module's tensors, gradients and train/eval flags."""

    tensors: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor | None]
    training: dict[str, bool]

    @classmethod
    def take(cls, model: nn.Module) -> ModelSnapshot:
        tensors = {name: _to_cpu(t) for name, t in _model_tensors(model).items()}
        grads = {
            name: None if p.grad is None else _to_cpu(p.grad)
            for name, p in model.named_parameters()
        }
        training = {name: m.training for name, m in model.named_modules()}
        return cls(tensors, grads, training)

    def restore(self, model: nn.Module) -> None:
        with torch.no_grad():
            current = _model_tensors(model)
            for name, saved in self.tensors.items():
                target = current[name]
                if target.shape != saved.shape:  # a lazily built or resized buffer
                    target.data = saved.to(target.device)
                else:
                    target.copy_(saved)
            for name, p in model.named_parameters():
                saved_grad = self.grads.get(name)
                p.grad = None if saved_grad is None else saved_grad.to(p.device)
        for name, m in model.named_modules():
            m.training = self.training.get(name, m.training)


@dataclass
class OptimizerSnapshot:
    """A CPU copy of an optimizer's state and hyper-parameters."""

    state: dict[str, Any]

    @classmethod
    def take(cls, optimizer: torch.optim.Optimizer) -> OptimizerSnapshot:
        return cls(_to_cpu(optimizer.state_dict()))

    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        # load_state_dict moves state to each parameter's device and dtype; the copies are exact.
        optimizer.load_state_dict(copy.deepcopy(self.state))


@contextmanager
def preserved(
    model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None
) -> Iterator[None]:
    """Run the body, then restore ``model``, ``optimizer`` and every RNG stream bitwise."""
    rng = capture_rng()
    model_snapshot = ModelSnapshot.take(model) if model is not None else None
    optimizer_snapshot = OptimizerSnapshot.take(optimizer) if optimizer is not None else None
    try:
        yield
    finally:
        if model is not None and model_snapshot is not None:
            model_snapshot.restore(model)
        if optimizer is not None and optimizer_snapshot is not None:
            optimizer_snapshot.restore(optimizer)
        restore_rng(rng)
