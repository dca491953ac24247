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

import itertools
import warnings
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data._utils.collate import default_collate, default_convert

from batchpilot.checks import Precision, Reduction, check_precision
from batchpilot.errors import BadInputError, UserCodeError
from batchpilot.oom import is_out_of_memory
from batchpilot.precision import autocast, device_type_of
from batchpilot.state import preserved_rng

MetricMode = Literal["min", "max"]

ModelFactory = Callable[[], nn.Module]
LossFn = Callable[[nn.Module, Any], torch.Tensor]
OptimizerFactory = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]
MetricFn = Callable[[nn.Module, Any], "torch.Tensor | float"]
CollateFn = Callable[[list[Any]], Any]

DEFAULT_MAX_SAMPLES = 10_000
"""How many samples :meth:`Task.from_dataloader` takes from an iterable dataset by default."""


class IterableDatasetWarning(UserWarning):
    """An iterable dataset was replaced by the samples taken from it into memory."""


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
        precision: ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"`` (Lightning's names): every
            measurement and training run computes the loss under this autocast (with a
            ``GradScaler`` for ``"16-mixed"``); see :mod:`batchpilot.precision`.
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
    precision: Precision = "32"

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
        check_precision(self.precision, "Task.precision")

    @classmethod
    def from_dataloader(
        cls,
        model_fn: ModelFactory,
        loader: DataLoader[Any],
        loss_fn: LossFn,
        optimizer_fn: OptimizerFactory,
        val_loader: DataLoader[Any] | None = None,
        *,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        **fields: Any,
    ) -> Task:
        """A task from the loaders you train with: their datasets and collate function.

        batchpilot picks its own batch sizes and order, so the loaders' ``batch_size``, sampler
        and workers are not used; ``loader.batch_size`` becomes ``reference_batch`` unless given.
        An iterable dataset (a stream, no ``len()``) is replaced by its first ``max_samples``
        samples, held in memory, with an :class:`IterableDatasetWarning` saying how many were
        taken. ``fields`` are the other :class:`Task` fields (``reduction``, ``metric``, ``name``,
        ...).

        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.randn(40, 3), torch.randn(40, 1)), batch_size=8)
        >>> task = Task.from_dataloader(
        ...     lambda: torch.nn.Linear(3, 1),
        ...     loader,
        ...     lambda model, batch: torch.nn.functional.mse_loss(model(batch[0]), batch[1]),
        ...     lambda params, lr: torch.optim.SGD(params, lr=lr),
        ... )
        >>> task.train_size, task.reference_batch
        (40, 8)
        """
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples <= 0:
            raise BadInputError(f"max_samples: expected a positive integer, got {max_samples!r}")
        train_data, collate_fn = _from_loader("loader", loader, max_samples)
        val_data = None
        if val_loader is not None:
            val_data, _ = _from_loader("val_loader", val_loader, max_samples)
        fields.setdefault("collate_fn", collate_fn)
        if loader.batch_size is not None and "reference_batch" not in fields:
            fields["reference_batch"] = int(loader.batch_size)
        return cls(
            model=model_fn,
            train_data=train_data,
            loss=loss_fn,
            optimizer=optimizer_fn,
            val_data=val_data,
            **fields,
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

    def with_precision(self, precision: str | None) -> Task:
        """This task at ``precision`` (``None``: as it is).

        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> task = Task(
        ...     model=lambda: torch.nn.Linear(3, 1),
        ...     train_data=TensorDataset(torch.randn(8, 3), torch.randn(8, 1)),
        ...     loss=lambda model, batch: torch.nn.functional.mse_loss(model(batch[0]), batch[1]),
        ...     optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
        ... )
        >>> task.precision, task.with_precision("bf16-mixed").precision
        ('32', 'bf16-mixed')
        """
        if precision is None or precision == self.precision:
            return self
        return replace(self, precision=check_precision(precision))

    def compute_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """``loss(model, batch)`` under the task's autocast, checked to be a scalar tensor.

        The autocast is that of :attr:`precision` on the model's device (nothing for ``"32"``).
        Out-of-memory errors pass through unchanged so that memory searches can recognise them;
        any other exception is the user's and is wrapped in :class:`UserCodeError`.
        """
        context = autocast(self.precision, device_type_of(model))
        try:
            with context:
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
        context = autocast(self.precision, device_type_of(model))
        try:
            with context:
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


class _InMemory(Dataset[Any]):
    """Samples taken from an iterable dataset, as a map-style dataset."""

    def __init__(self, samples: list[Any]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        return self.samples[index]


def _from_loader(name: str, loader: Any, max_samples: int) -> tuple[Dataset[Any], CollateFn | None]:
    if not isinstance(loader, DataLoader):
        raise BadInputError(f"{name}: expected a torch DataLoader, got {type(loader).__name__}")
    if loader.batch_sampler is None:  # batch_size=None: every item is already a whole batch
        raise BadInputError(
            f"{name}: batch_size=None, so its dataset yields whole batches; batchpilot sizes the "
            "batches itself and needs a dataset of single samples"
        )
    collate_fn: CollateFn | None = loader.collate_fn
    if collate_fn is default_collate or collate_fn is default_convert:
        collate_fn = None  # batchpilot's own loaders batch with default_collate
    dataset = loader.dataset
    if not isinstance(dataset, IterableDataset):
        return dataset, collate_fn
    # Iterating may draw from the global RNG (a shuffling stream): leave it as it was.
    with preserved_rng():
        try:
            samples = list(itertools.islice(iter(dataset), max_samples))
        except Exception as exc:
            raise UserCodeError.wrap(f"iterating {name}.dataset", exc) from exc
    if not samples:
        raise BadInputError(f"{name}: the iterable dataset yielded no samples")
    whole = len(samples) < max_samples
    warnings.warn(
        f"{name}: the iterable dataset was taken into memory: {len(samples)} samples"
        + (" (the whole stream)" if whole else f" (max_samples={max_samples}; the rest is unused)"),
        IterableDatasetWarning,
        stacklevel=3,
    )
    return _InMemory(samples), collate_fn


def _check_dataset(name: str, dataset: Any) -> None:
    if isinstance(dataset, IterableDataset):
        raise BadInputError(
            f"Task.{name}: iterable datasets are not supported (batchpilot needs len() and "
            "random access to size batches and epochs); wrap it in a map-style Dataset, or build "
            "the task with Task.from_dataloader, which takes max_samples of it into memory"
        )
    if not hasattr(dataset, "__getitem__") or not isinstance(dataset, Sized):
        raise BadInputError(
            f"Task.{name}: expected a map-style torch Dataset with __getitem__ and __len__, "
            f"got {type(dataset).__name__}"
        )
    if len(dataset) == 0:
        raise BadInputError(f"Task.{name}: the dataset is empty")
