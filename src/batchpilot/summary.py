"""A first look at a task: sizes, parameters, and one checked loss evaluation.

``summarize_task`` also proves the task is usable: it builds the model and optimizer and evaluates
the loss on a small batch, which must be a scalar tensor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from batchpilot.checks import check_trainable
from batchpilot.data import to_device
from batchpilot.errors import BadInputError
from batchpilot.state import preserved_rng
from batchpilot.task import Task


@dataclass(frozen=True)
class TaskSummary:
    name: str
    train_size: int
    val_size: int
    parameters: int
    trainable_parameters: int
    parameter_bytes: int
    has_batchnorm: bool
    reduction: str
    metric_name: str | None
    metric_mode: str | None
    initial_loss: float
    optimizer: str
    reference_batch: int | None
    reference_lr: float | None
    precision: str = "32"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize_task(task: Task, *, device: torch.device | str = "cpu", seed: int = 0) -> TaskSummary:
    """Build the task's model and optimizer and evaluate its loss on two samples."""
    device = torch.device(device)
    with preserved_rng():
        torch.manual_seed(seed)
        model = task.make_model(device)
        check_trainable(model)
        optimizer = task.make_optimizer(model.parameters(), task.reference_lr or 1e-3)
        batch = next(iter(task.loader(min(2, task.train_size), shuffle=False)))
        loss = task.compute_loss(model, to_device(batch, device))
        if not torch.isfinite(loss):
            raise BadInputError(
                f"Task.loss(model, batch): the loss of a fresh model is {float(loss.detach())}, not finite"
            )
        if not loss.requires_grad:
            raise BadInputError(
                "Task.loss(model, batch): the loss has no gradient (it does not depend on a "
                "trainable parameter, or was computed under no_grad/detach): nothing would train"
            )
    params = list(model.parameters())
    batchnorm = torch.nn.modules.batchnorm._BatchNorm
    return TaskSummary(
        name=task.name,
        train_size=task.train_size,
        val_size=task.val_size,
        parameters=sum(p.numel() for p in params),
        trainable_parameters=sum(p.numel() for p in params if p.requires_grad),
        parameter_bytes=sum(p.numel() * p.element_size() for p in params),
        has_batchnorm=any(isinstance(m, batchnorm) for m in model.modules()),
        reduction=task.reduction,
        metric_name=task.metric_name if task.metric is not None else None,
        metric_mode=task.metric_mode if task.metric is not None else None,
        initial_loss=float(loss.detach()),
        optimizer=type(optimizer).__name__,
        reference_batch=task.reference_batch,
        reference_lr=task.reference_lr,
        precision=task.precision,
    )
