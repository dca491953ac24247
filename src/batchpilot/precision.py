"""Mixed precision: the setting every measurement and training loop runs under.

A task's ``precision`` (:attr:`batchpilot.Task.precision`, Lightning's names) is one of

* ``"32"``: fp32, no autocast (the default);
* ``"bf16-mixed"``: the loss (forward pass included) under ``torch.autocast(dtype=torch.bfloat16)``;
* ``"16-mixed"``: the same with ``torch.float16``, and a ``torch.amp.GradScaler`` on the loss in
  every loop that steps an optimizer (the scaler unscales the gradients before the step and skips
  a step whose gradients overflowed, as in Lightning's and Hugging Face's fp16 training).

Every loop calls the same helpers: :meth:`batchpilot.Task.compute_loss` enters :func:`autocast`
itself, and the loops that step an optimizer make one scaler with :func:`make_scaler` and go
through :func:`backward` and :func:`optimizer_step`.

>>> import torch
>>> model = torch.nn.Linear(4, 2)
>>> with autocast("bf16-mixed", "cpu"):
...     out = model(torch.randn(3, 4))
>>> out.dtype
torch.bfloat16
>>> scaler = make_scaler("16-mixed", "cpu")
>>> with autocast("16-mixed", "cpu"):
...     loss = model(torch.randn(3, 4)).float().pow(2).mean()
>>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
>>> backward(loss, scaler)  # the scaled loss's backward
>>> optimizer_step(optimizer, scaler)  # unscale, step unless the gradients overflowed, update
>>> make_scaler("bf16-mixed", "cpu") is None  # bf16 has fp32's range: no scaler
True
"""

from __future__ import annotations

import itertools
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from batchpilot.checks import PRECISIONS, Precision, check_precision
from batchpilot.errors import BadInputError

_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def autocast(precision: str, device: torch.device | str) -> AbstractContextManager[Any]:
    """The autocast context of ``precision`` on ``device``'s type (nothing for ``"32"``).

    >>> with autocast("32", "cpu"):
    ...     torch.is_autocast_enabled("cpu")
    False
    """
    precision = check_precision(precision)
    if precision == "32":
        return nullcontext()
    device_type = torch.device(device).type
    if device_type == "cuda" and precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        raise BadInputError(
            "precision: 'bf16-mixed' needs a GPU with bfloat16 support (Ampere or newer); "
            "use '16-mixed'"
        )
    return torch.autocast(device_type, dtype=_DTYPES[precision])


def make_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A fresh ``GradScaler`` for ``"16-mixed"`` on ``device``; ``None`` for the others."""
    if check_precision(precision) != "16-mixed":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """``loss.backward()``, of the scaled loss when there is a scaler."""
    (loss if scaler is None else scaler.scale(loss)).backward()


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """``optimizer.step()``; with a scaler, the gradients are unscaled first, the step is skipped
    if they are not finite, and the loss scale is updated (``GradScaler.step`` reads whether they
    were finite: one device sync per step, as in any fp16 training loop).

    Whether a step was skipped shows in the scale: :func:`step_skipped`.
    """
    if scaler is None:
        optimizer.step()
        return
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()


def step_skipped(scaler: torch.amp.GradScaler | None, scale_before: float | None) -> bool:
    """Whether the scaler skipped the step (its scale fell below ``scale_before``, read with
    ``scaler.get_scale()`` before the step; the scale halves on an overflow).

    >>> scaler = make_scaler("16-mixed", "cpu")
    >>> step_skipped(scaler, scaler.get_scale()), step_skipped(None, None)
    (False, False)
    """
    if scaler is None or scale_before is None:
        return False
    return scaler.get_scale() < scale_before


def device_type_of(model: torch.nn.Module) -> str:
    """The device type of the model's first parameter or buffer (``"cpu"`` without any).

    >>> device_type_of(torch.nn.Linear(2, 1))
    'cpu'
    """
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return "cpu" if first is None else first.device.type


__all__ = [
    "PRECISIONS",
    "Precision",
    "autocast",
    "backward",
    "check_precision",
    "device_type_of",
    "make_scaler",
    "optimizer_step",
    "step_skipped",
]
