"""The task contract: how a user describes a training workload to batchpilot.

A :class:`Task` holds factories rather than objects, so every measurement starts from a fresh model
and optimizer and the user's own objects are never touched. Every later command takes a task.

>>> import torch
>>> from torch.utils.data import TensorDataset
>>> data = TensorDataset(torch.randn(32, 3), torch.randn(32, 1))
>>> task = Task(
...     model=lambda: torch.nn.Linear(3, 1),
...     train_data=data,
...     loss=lambda model, batch: torch.nn.functional.mse_loss(model(batch[0]), batch[1]),
...     optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
... )
>>> task.train_size
32
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from batchpilot.checks import Reduction
from batchpilot.errors import BadInputError, UserCodeError
from batchpilot.oom import is_out_of_memory

MetricMode = Literal["min", "max"]

ModelFactory = Callable[[], nn.Module]
LossFn = Callable[[nn.Module, Any], torch.Tensor]
OptimizerFactory = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]
MetricFn = Callable[[nn.Module, Any], "torch.Tensor | float"]
CollateFn = Callable[[list[Any]], Any]


@dataclass(frozen=True)
class Task:
    """A training workload.

    Attributes:
        model: returns a freshly initialised model on every call.
        train_data: a map-style dataset (``__getitem__`` and ``__len__``).
        loss: ``loss(model, batch) -> scalar Tensor``; the batch is already on the model's device.
        optimizer: ``optimizer(params, lr) -> torch.optim.Optimizer``.
        val_data: optional validation dataset, same sample format as ``train_data``.
        reduction: whether ``loss`` is a ``"mean"`` or a ``"sum"`` over the batch.
        metric: optional validation metric ``metric(model, batch)``, averaged over samples.
        metric_name: how reports call the metric.
        metric_mode: ``"max"`` if a larger metric is better, ``"min"`` otherwise.
        collate_fn: optional collate function for the data loaders.
        name: a short name for reports.
        reference_batch, reference_lr: a (batch, lr) known to work, if the user has one.
    """

    model: ModelFactory
    train_data: Dataset[Any]
    loss: LossFn
    optimizer: OptimizerFactory
    val_data: Dataset[Any] | None = None
    reduction: Reduction = "mean"
    metric: MetricFn | None = None
    metric_name: str = "metric"
    metric_mode: MetricMode = "max"
    collate_fn: CollateFn | None = None
    name: str = "task"
    reference_batch: int | None = None
    reference_lr: float | None = None

    def __post_init__(self) -> None:
        for field_name in ("model", "loss", "optimizer"):
            if not callable(getattr(self, field_name)):
                value = getattr(self, field_name)
                raise BadInputError(
                    f"Task.{field_name}: expected a callable, got {type(value).__name__}"
                )
        _check_dataset("train_data", self.train_data)
        if self.val_data is not None:
            _check_dataset("val_data", self.val_data)
        if self.reduction not in get_args(Reduction):
            raise BadInputError(f"Task.reduction: expected 'mean' or 'sum', got {self.reduction!r}")
        if self.metric_mode not in get_args(MetricMode):
            raise BadInputError(
                f"Task.metric_mode: expected 'min' or 'max', got {self.metric_mode!r}"
            )
        if self.metric is not None and not callable(self.metric):
            raise BadInputError(
                f"Task.metric: expected a callable, got {type(self.metric).__name__}"
            )
        if self.collate_fn is not None and not callable(self.collate_fn):
            raise BadInputError(
                f"Task.collate_fn: expected a callable, got {type(self.collate_fn).__name__}"
            )
        if self.reference_batch is not None and (
            not isinstance(self.reference_batch, int) or self.reference_batch <= 0
        ):
            raise BadInputError(
                f"Task.reference_batch: expected a positive integer, got {self.reference_batch!r}"
            )
        if self.reference_lr is not None and not (
            isinstance(self.reference_lr, int | float) and self.reference_lr > 0
        ):
            raise BadInputError(
                f"Task.reference_lr: expected a positive number, got {self.reference_lr!r}"
            )

    @property
    def train_size(self) -> int:
        return len(self.train_data)  # type: ignore[arg-type]

    @property
    def val_size(self) -> int:
        return 0 if self.val_data is None else len(self.val_data)  # type: ignore[arg-type]

    def make_model(self, device: torch.device | str = "cpu") -> nn.Module:
        """A fresh model from the factory, moved to ``device``."""
        try:
            model = self.model()
        except Exception as exc:
            raise UserCodeError.wrap("Task.model()", exc) from exc
        if not isinstance(model, nn.Module):
            raise BadInputError(
                f"Task.model(): expected it to return a torch.nn.Module, got {type(model).__name__}"
            )
        return model.to(device)

    def make_optimizer(self, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """An optimizer from the factory at learning rate ``lr``."""
        try:
            optimizer = self.optimizer(params, lr)
        except Exception as exc:
            raise UserCodeError.wrap(f"Task.optimizer(params, lr={lr:g})", exc) from exc
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise BadInputError(
                "Task.optimizer(params, lr): expected it to return a torch.optim.Optimizer, "
                f"got {type(optimizer).__name__}"
            )
        return optimizer

    def compute_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """``loss(model, batch)``, checked to be a scalar tensor.

        Out-of-memory errors pass through unchanged so that memory searches can recognise them;
        any other exception is the user's and is wrapped in :class:`UserCodeError`.
        """
        try:
            value = self.loss(model, batch)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
            raise UserCodeError.wrap("Task.loss(model, batch)", exc) from exc
        if not isinstance(value, torch.Tensor):
            raise BadInputError(
                "Task.loss(model, batch): expected a scalar torch.Tensor, "
                f"got {type(value).__name__}"
            )
        if value.dim() != 0:
            raise BadInputError(
                "Task.loss(model, batch): expected a scalar tensor, got shape "
                f"{tuple(value.shape)} (reduce it with .mean() or .sum() and set Task.reduction)"
            )
        return value

    def compute_metric(self, model: nn.Module, batch: Any) -> float:
        """The validation metric on one batch, as a float."""
        if self.metric is None:
            raise BadInputError("Task.metric: this task has no metric")
        try:
            value = self.metric(model, batch)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
            raise UserCodeError.wrap("Task.metric(model, batch)", exc) from exc
        return float(value.item() if isinstance(value, torch.Tensor) else value)

    def loader(
        self,
        batch_size: int,
        *,
        split: Literal["train", "val"] = "train",
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> DataLoader[Any]:
        """A data loader over ``split``; shuffling draws from its own generator seeded by ``seed``,
        so it neither reads nor advances the global RNG."""
        dataset = self.train_data if split == "train" else self.val_data
        if dataset is None:
            raise BadInputError(f"split: this task has no {split} dataset")
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            collate_fn=self.collate_fn,
            generator=generator,
        )


def _check_dataset(name: str, dataset: Any) -> None:
    if isinstance(dataset, IterableDataset):
        raise BadInputError(
            f"Task.{name}: iterable datasets are not supported (batchpilot needs len() and "
            "random access to size batches and epochs); wrap it in a map-style Dataset"
        )
    if not hasattr(dataset, "__getitem__") or not isinstance(dataset, Sized):
        raise BadInputError(
            f"Task.{name}: expected a map-style torch Dataset with __getitem__ and __len__, "
            f"got {type(dataset).__name__}"
        )
    if len(dataset) == 0:
        raise BadInputError(f"Task.{name}: the dataset is empty")
