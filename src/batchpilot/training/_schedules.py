"""Batch-size schedules: "decaying the learning rate ≈ increasing the batch size", as plain objects.

Smith et al. (2018, arXiv 1711.00489) write the scale of SGD's noise as ``g = lr·N / (B(1 − m))``
(``N`` training samples, batch ``B``, momentum ``m``). Dividing ``lr`` by ``k`` and multiplying
``B`` by ``k`` give the same ``g``, so any learning-rate decay has an equivalent batch increase that
reaches the same loss with ``k`` times fewer optimizer updates from then on.

Every schedule here answers one question, :meth:`BatchSchedule.at` an epoch (a float: samples seen
divided by ``N``), with a :class:`BatchSetting` — global batch, lr, micro-batch × accumulation ×
world size. A schedule asks for a *noise reduction* ``k(epoch)`` (the noise scale relative to the
start is ``1/k``) and :func:`realise` turns it into a setting, in this order of preference:

1. a larger batch in one pass per device, while the micro-batch fits the memory limit
   (``max_micro_batch``, a plain integer, e.g. from ``find_max_batch``);
2. then gradient accumulation, up to ``max_accumulation`` steps;
3. then, once the batch reaches its cap (memory × accumulation, ``max_batch`` or the dataset),
   learning-rate decay for the rest — the lr is set so that ``lr / B`` is exactly ``base_lr / (k ·
   base_batch)`` whatever the rounding, so the noise scale follows the decay schedule exactly.

>>> decay = StepDecay(every_epochs=30, gamma=0.1)
>>> limits = BatchLimits(max_micro_batch=512, max_accumulation=2, dataset_size=50_000)
>>> increase = BatchIncrease(decay, base_batch=128, base_lr=0.1, limits=limits)
>>> [(s.batch, s.accumulation_steps, round(s.lr, 6)) for s in map(increase.at, (0, 30, 60))]
[(128, 1, 0.1), (1024, 2, 0.08), (1024, 2, 0.008)]
>>> sgd_noise_scale(0.04, 512, 50_000) == sgd_noise_scale(0.01, 128, 50_000)
True
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, get_args

import torch

from batchpilot.checks import check_positive_float, check_positive_int
from batchpilot.errors import BadInputError
from batchpilot.plan._lr_rule import scale_lr
from batchpilot.plan._split import split_batch

LrRule = Literal["none", "linear", "sqrt"]
PlateauMode = Literal["min", "max"]


def sgd_noise_scale(lr: float, batch: int, dataset_size: int, *, momentum: float = 0.0) -> float:
    """Smith et al.'s SGD noise scale ``g = lr·N / (B(1 − m))``.

    >>> round(sgd_noise_scale(0.1, 128, 50_000, momentum=0.9), 6)
    390.625
    """
    if not 0.0 <= momentum < 1.0:
        raise BadInputError(f"momentum: expected a value in [0, 1), got {momentum!r}")
    return lr * dataset_size / (batch * (1.0 - momentum))


# --------------------------------------------------------------------------- lr decays


class LrDecay(Protocol):
    """A learning-rate decay: ``factor(epoch)`` in (0, 1] multiplies the base lr."""

    def factor(self, epoch: float) -> float: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class StepDecay:
    """``gamma ** floor(epoch / every_epochs)`` (torch's ``StepLR``).

    >>> StepDecay(every_epochs=10, gamma=0.5).factor(25)
    0.25
    """

    every_epochs: float
    gamma: float = 0.1

    def __post_init__(self) -> None:
        check_positive_float("every_epochs", self.every_epochs)
        _check_gamma(self.gamma)

    def factor(self, epoch: float) -> float:
        return float(self.gamma ** math.floor(_epoch(epoch) / self.every_epochs + 1e-9))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "step", **asdict(self)}


@dataclass(frozen=True)
class MultiStepDecay:
    """``gamma ** (milestones passed)`` (torch's ``MultiStepLR``).

    >>> MultiStepDecay(milestones=(30, 60, 80), gamma=0.1).factor(65)
    0.010000000000000002
    """

    milestones: tuple[float, ...]
    gamma: float = 0.1

    def __post_init__(self) -> None:
        milestones = tuple(float(m) for m in self.milestones)
        if not milestones or any(m <= 0 or not math.isfinite(m) for m in milestones):
            raise BadInputError(
                f"milestones: expected positive epochs, got {list(self.milestones)!r}"
            )
        if list(milestones) != sorted(milestones):
            raise BadInputError(f"milestones: expected increasing epochs, got {list(milestones)!r}")
        object.__setattr__(self, "milestones", milestones)
        _check_gamma(self.gamma)

    def factor(self, epoch: float) -> float:
        epoch = _epoch(epoch)
        passed = sum(1 for m in self.milestones if epoch + 1e-9 >= m)
        return float(self.gamma**passed)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "multistep", "milestones": list(self.milestones), "gamma": self.gamma}


@dataclass(frozen=True)
class ExponentialDecay:
    """``gamma ** floor(epoch / every_epochs)`` with a short period (torch's ``ExponentialLR``,
    stepped once per ``every_epochs``; ``every_epochs=1`` is the usual once-per-epoch call).

    >>> round(ExponentialDecay(gamma=0.9).factor(2.5), 6)
    0.81
    """

    gamma: float
    every_epochs: float = 1.0

    def __post_init__(self) -> None:
        _check_gamma(self.gamma)
        check_positive_float("every_epochs", self.every_epochs)

    def factor(self, epoch: float) -> float:
        return float(self.gamma ** math.floor(_epoch(epoch) / self.every_epochs + 1e-9))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "exponential", **asdict(self)}


@dataclass(frozen=True)
class CosineDecay:
    """``min_factor + (1 − min_factor)·(1 + cos(π·epoch/total_epochs))/2`` (``CosineAnnealingLR``),
    held at ``min_factor`` after ``total_epochs``.

    >>> CosineDecay(total_epochs=10).factor(5)
    0.5
    """

    total_epochs: float
    min_factor: float = 0.0

    def __post_init__(self) -> None:
        check_positive_float("total_epochs", self.total_epochs)
        if not 0.0 <= self.min_factor < 1.0:
            raise BadInputError(f"min_factor: expected a value in [0, 1), got {self.min_factor!r}")

    def factor(self, epoch: float) -> float:
        progress = min(1.0, _epoch(epoch) / self.total_epochs)
        return self.min_factor + (1.0 - self.min_factor) * (1.0 + math.cos(math.pi * progress)) / 2

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "cosine", **asdict(self)}


def decay_from_torch(scheduler: Any, *, steps_per_epoch: int = 1) -> LrDecay:
    """The decay of a torch ``StepLR``, ``MultiStepLR``, ``ExponentialLR`` or ``CosineAnnealingLR``.

    ``steps_per_epoch`` is how many times you call ``scheduler.step()`` per epoch (1 when you step
    it at the end of each epoch, the number of batches when you step it after every batch).

    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> decay_from_torch(torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[30, 60]))
    MultiStepDecay(milestones=(30.0, 60.0), gamma=0.1)
    """
    check_positive_int("steps_per_epoch", steps_per_epoch)
    spe = float(steps_per_epoch)
    sched = torch.optim.lr_scheduler
    if isinstance(scheduler, sched.StepLR):
        return StepDecay(every_epochs=scheduler.step_size / spe, gamma=scheduler.gamma)
    if isinstance(scheduler, sched.MultiStepLR):
        # MultiStepLR keeps a Counter; a milestone listed twice decays twice.
        milestones = sorted(m for m, count in scheduler.milestones.items() for _ in range(count))
        return MultiStepDecay(milestones=tuple(m / spe for m in milestones), gamma=scheduler.gamma)
    if isinstance(scheduler, sched.ExponentialLR):
        return ExponentialDecay(gamma=scheduler.gamma, every_epochs=1.0 / spe)
    if isinstance(scheduler, sched.CosineAnnealingLR):
        base = float(scheduler.base_lrs[0])
        return CosineDecay(
            total_epochs=scheduler.T_max / spe, min_factor=min(0.999, scheduler.eta_min / base)
        )
    raise BadInputError(
        f"scheduler: {type(scheduler).__name__} is not supported; expected StepLR, MultiStepLR, "
        "ExponentialLR or CosineAnnealingLR"
    )


def decay_from_dict(data: dict[str, Any]) -> LrDecay:
    """Rebuild a decay from its ``to_dict()``."""
    kind = data.get("kind")
    values = {key: value for key, value in data.items() if key != "kind"}
    if kind == "step":
        return StepDecay(**values)
    if kind == "multistep":
        return MultiStepDecay(milestones=tuple(values["milestones"]), gamma=values["gamma"])
    if kind == "exponential":
        return ExponentialDecay(**values)
    if kind == "cosine":
        return CosineDecay(**values)
    raise BadInputError(f"decay: unknown kind {kind!r}")


def _check_gamma(gamma: float) -> None:
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not 0.0 < gamma <= 1.0:
        raise BadInputError(f"gamma: expected a decay factor in (0, 1], got {gamma!r}")


def _epoch(epoch: float) -> float:
    if isinstance(epoch, bool) or not isinstance(epoch, int | float) or not math.isfinite(epoch):
        raise BadInputError(f"epoch: expected a finite number, got {epoch!r}")
    if epoch < 0:
        raise BadInputError(f"epoch: expected a number ≥ 0, got {epoch!r}")
    return float(epoch)


# ------------------------------------------------------------------ limits and settings


@dataclass(frozen=True)
class BatchLimits:
    """What bounds the batch a schedule may ask for.

    Attributes:
        max_micro_batch: the largest micro-batch per device that fits in memory (``None``: no
            memory limit known, the whole batch is one pass per device).
        max_accumulation: the most accumulation steps to use before decaying the lr instead
            (``None``: no limit other than ``max_batch``).
        world_size: data-parallel devices; the global batch is a multiple of it.
        max_batch: a cap on the global batch (``None``: none beyond the dataset).
        dataset_size: training samples; a global batch never exceeds it.
        multiple: round micro-batches down to a multiple of this (8 for tensor cores).
    """

    max_micro_batch: int | None = None
    max_accumulation: int | None = None
    world_size: int = 1
    max_batch: int | None = None
    dataset_size: int | None = None
    multiple: int = 1

    def __post_init__(self) -> None:
        for name in ("max_micro_batch", "max_accumulation", "max_batch", "dataset_size"):
            value = getattr(self, name)
            if value is not None:
                check_positive_int(name, value)
        check_positive_int("world_size", self.world_size)
        check_positive_int("multiple", self.multiple)

    @property
    def cap(self) -> float:
        """The largest global batch these limits allow (``inf`` when nothing bounds it)."""
        cap = math.inf
        if self.max_batch is not None:
            cap = min(cap, self.max_batch)
        if self.dataset_size is not None:
            cap = min(cap, self.dataset_size)
        if self.max_micro_batch is not None and self.max_accumulation is not None:
            cap = min(cap, self.max_micro_batch * self.max_accumulation * self.world_size)
        return cap

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BatchSetting:
    """What to train with at one point of a schedule.

    ``batch`` is the global batch ``micro_batch × accumulation_steps × world_size``;
    ``noise_reduction`` is ``k`` (the SGD noise scale is ``1/k`` of the schedule's start).
    """

    batch: int
    lr: float
    micro_batch: int
    accumulation_steps: int
    world_size: int
    noise_reduction: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_for(batch: int, limits: BatchLimits) -> tuple[int, int]:
    """``(micro_batch, accumulation_steps)`` for a global ``batch`` under ``limits``: the shared
    rule of :func:`batchpilot.plan.split_batch`, inexact (the product never exceeds ``batch``).

    >>> split_for(1000, BatchLimits(max_micro_batch=64))
    (62, 16)
    >>> split_for(1000, BatchLimits(max_micro_batch=64, multiple=8))
    (56, 16)
    """
    split = split_batch(
        batch,
        max_micro_batch=limits.max_micro_batch,
        world_size=limits.world_size,
        exact=False,
        multiple=limits.multiple,
    )
    return split.micro_batch, split.accumulation_steps


def realise(
    noise_reduction: float,
    *,
    base_batch: int,
    base_lr: float,
    limits: BatchLimits,
    by: Literal["batch", "lr"] = "batch",
) -> BatchSetting:
    """The setting that divides the starting noise scale by ``noise_reduction`` (``k ≥ 1``).

    ``by="batch"`` grows the batch to ``k·base_batch`` (micro-batch, then accumulation, then the
    lr for what the cap leaves over); ``by="lr"`` keeps the batch and divides the lr by ``k``. In
    both, ``lr / batch = base_lr / (k · base_batch)`` exactly.

    >>> realise(4.0, base_batch=64, base_lr=0.1, limits=BatchLimits(max_micro_batch=128))
    BatchSetting(batch=256, lr=0.1, micro_batch=128, accumulation_steps=2, world_size=1, noise_reduction=4.0)
    >>> realise(4.0, base_batch=64, base_lr=0.1, limits=BatchLimits(), by="lr").lr
    0.025
    """
    if not noise_reduction >= 1.0:  # also refuses nan
        raise BadInputError(f"noise_reduction: expected a number ≥ 1, got {noise_reduction!r}")
    if by == "lr":
        micro, accumulation = split_for(base_batch, limits)
        batch = micro * accumulation * limits.world_size
        return BatchSetting(
            batch=batch,
            lr=base_lr * batch / (noise_reduction * base_batch),
            micro_batch=micro,
            accumulation_steps=accumulation,
            world_size=limits.world_size,
            noise_reduction=noise_reduction,
        )
    wanted = base_batch * noise_reduction
    target = min(wanted, limits.cap)
    if math.isinf(target):
        raise BadInputError(
            "limits: the schedule asks for an unbounded batch (its lr decays to 0); give "
            "dataset_size, max_batch or max_micro_batch with max_accumulation"
        )
    micro, accumulation = split_for(max(base_batch, math.floor(target + 1e-9)), limits)
    batch = micro * accumulation * limits.world_size
    lr = 0.0 if math.isinf(wanted) else base_lr * batch / wanted
    return BatchSetting(
        batch=batch,
        lr=lr,
        micro_batch=micro,
        accumulation_steps=accumulation,
        world_size=limits.world_size,
        noise_reduction=noise_reduction,
    )


# ---------------------------------------------------------------------------- schedules


class BatchSchedule(ABC):
    """A schedule of (global batch, lr) over epochs, usable in any training loop::

        for epoch in range(epochs):
            setting = schedule.at(epoch)          # or at a fractional epoch, every step
            ...train with setting.batch / setting.lr...

    ``state_dict()`` / ``load_state_dict()`` carry what a resumed run needs.
    """

    kind = "schedule"

    def __init__(self, *, base_batch: int, base_lr: float, limits: BatchLimits | None) -> None:
        self.base_batch = check_positive_int("base_batch", base_batch)
        self.base_lr = check_positive_float("base_lr", base_lr)
        self.limits = limits if limits is not None else BatchLimits()
        if not isinstance(self.limits, BatchLimits):
            raise BadInputError(f"limits: expected a BatchLimits, got {type(self.limits).__name__}")
        if base_batch % self.limits.world_size:
            raise BadInputError(
                f"base_batch: {base_batch} is not a multiple of world_size {self.limits.world_size}"
            )
        if self.limits.cap < base_batch:
            raise BadInputError(
                f"base_batch: {base_batch} is above what the limits allow ({self.limits.cap:g})"
            )
        self.last_epoch = 0.0

    @abstractmethod
    def noise_reduction(self, epoch: float) -> float:
        """``k(epoch)``: the factor by which the SGD noise scale is below the start's."""

    def at(self, epoch: float) -> BatchSetting:
        """The setting to train with at ``epoch`` (samples seen / training samples)."""
        epoch = _epoch(epoch)
        self.last_epoch = epoch
        return self._realise(self.noise_reduction(epoch))

    def _realise(self, k: float) -> BatchSetting:
        return realise(k, base_batch=self.base_batch, base_lr=self.base_lr, limits=self.limits)

    def config(self) -> dict[str, Any]:
        """The schedule's definition, JSON-safe."""
        return {
            "kind": self.kind,
            "base_batch": self.base_batch,
            "base_lr": self.base_lr,
            "limits": self.limits.to_dict(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config(), "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`; refuses a state saved from a different schedule."""
        saved = state.get("config")
        if saved != self.config():
            raise BadInputError(
                f"state: it was saved from a different schedule ({saved!r}); this one is "
                f"{self.config()!r}"
            )
        self.last_epoch = float(state["last_epoch"])


class LrDecaySchedule(BatchSchedule):
    """The usual run: a fixed batch and a decaying lr (the reference batch increase is compared to).

    >>> s = LrDecaySchedule(StepDecay(every_epochs=10, gamma=0.2), base_batch=32, base_lr=0.5)
    >>> s.at(12).batch, round(s.at(12).lr, 6)
    (32, 0.1)
    """

    kind = "lr_decay"

    def __init__(
        self, decay: LrDecay, *, base_batch: int, base_lr: float, limits: BatchLimits | None = None
    ) -> None:
        super().__init__(base_batch=base_batch, base_lr=base_lr, limits=limits)
        self.decay = decay

    def noise_reduction(self, epoch: float) -> float:
        factor = self.decay.factor(epoch)
        return math.inf if factor <= 0 else 1.0 / factor

    def _realise(self, k: float) -> BatchSetting:
        return realise(
            k, base_batch=self.base_batch, base_lr=self.base_lr, limits=self.limits, by="lr"
        )

    def config(self) -> dict[str, Any]:
        return {**super().config(), "decay": self.decay.to_dict()}


class BatchIncrease(BatchSchedule):
    """An lr decay turned into the batch increase with the same SGD noise scale at every epoch.

    Where the decay divides the lr by ``k``, this multiplies the batch by ``k`` (micro-batch, then
    accumulation), and divides the lr by what the batch cap leaves over.

    >>> s = BatchIncrease(CosineDecay(total_epochs=10), base_batch=32, base_lr=0.5,
    ...                   limits=BatchLimits(dataset_size=1000))
    >>> s.at(5).batch, s.at(5).lr
    (64, 0.5)
    """

    kind = "batch_increase"

    def __init__(
        self, decay: LrDecay, *, base_batch: int, base_lr: float, limits: BatchLimits | None = None
    ) -> None:
        super().__init__(base_batch=base_batch, base_lr=base_lr, limits=limits)
        self.decay = decay

    def noise_reduction(self, epoch: float) -> float:
        factor = self.decay.factor(epoch)
        return math.inf if factor <= 0 else 1.0 / factor

    def config(self) -> dict[str, Any]:
        return {**super().config(), "decay": self.decay.to_dict()}


def periodic_batch(
    *,
    base_batch: int,
    base_lr: float,
    factor: float = 2.0,
    every_epochs: float,
    limits: BatchLimits | None = None,
) -> BatchIncrease:
    """The batch multiplied by ``factor`` every ``every_epochs`` epochs (the lr divided by it once
    the batch is capped): the batch-increase form of a step decay with ``gamma = 1/factor``.

    >>> s = periodic_batch(base_batch=16, base_lr=0.1, factor=2, every_epochs=5)
    >>> [s.at(e).batch for e in (0, 5, 10, 15)]
    [16, 32, 64, 128]
    """
    factor = check_positive_float("factor", factor)
    if factor <= 1.0:
        raise BadInputError(f"factor: expected a growth factor > 1, got {factor!r}")
    return BatchIncrease(
        StepDecay(every_epochs=every_epochs, gamma=1.0 / factor),
        base_batch=base_batch,
        base_lr=base_lr,
        limits=limits,
    )


class BatchWarmup(BatchSchedule):
    """A batch ramp: linear from ``start_batch`` to ``base_batch`` over ``warmup_epochs``, then
    ``then`` (another schedule, asked at the same absolute epoch) or ``base_batch`` held.

    During the ramp the lr follows ``lr_rule`` from ``(base_batch, base_lr)``: ``"none"`` keeps
    ``base_lr`` (a noisier start, as in GPT-3's batch ramp), ``"linear"`` or ``"sqrt"`` scale it
    with the batch.

    >>> s = BatchWarmup(start_batch=8, base_batch=64, warmup_epochs=2, base_lr=0.1,
    ...                 lr_rule="linear")
    >>> [(s.at(e).batch, round(s.at(e).lr, 4)) for e in (0, 1, 2)]
    [(8, 0.0125), (36, 0.0563), (64, 0.1)]
    """

    kind = "batch_warmup"

    def __init__(
        self,
        *,
        start_batch: int,
        base_batch: int,
        warmup_epochs: float,
        base_lr: float,
        lr_rule: LrRule = "none",
        limits: BatchLimits | None = None,
        then: BatchSchedule | None = None,
    ) -> None:
        super().__init__(base_batch=base_batch, base_lr=base_lr, limits=limits)
        self.start_batch = check_positive_int("start_batch", start_batch)
        if start_batch > base_batch:
            raise BadInputError(
                f"start_batch: expected at most base_batch ({base_batch}), got {start_batch}"
            )
        if start_batch % self.limits.world_size:
            raise BadInputError(
                f"start_batch: {start_batch} is not a multiple of world_size "
                f"{self.limits.world_size}"
            )
        self.warmup_epochs = check_positive_float("warmup_epochs", warmup_epochs)
        if lr_rule not in get_args(LrRule):
            raise BadInputError(
                f"lr_rule: expected one of {', '.join(get_args(LrRule))}, got {lr_rule!r}"
            )
        self.lr_rule: LrRule = lr_rule
        self.then = then

    def noise_reduction(self, epoch: float) -> float:
        if epoch >= self.warmup_epochs and self.then is not None:
            return self.then.noise_reduction(epoch)
        return 1.0

    def at(self, epoch: float) -> BatchSetting:
        epoch = _epoch(epoch)
        self.last_epoch = epoch
        if epoch >= self.warmup_epochs:
            if self.then is not None:
                return self.then.at(epoch)
            return self._realise(1.0)
        progress = epoch / self.warmup_epochs
        batch = self.start_batch + (self.base_batch - self.start_batch) * progress
        world = self.limits.world_size
        wanted = max(world, int(batch) // world * world)
        micro, accumulation = split_for(wanted, self.limits)
        real = micro * accumulation * world
        lr = scale_lr(self.base_lr, ref_batch=self.base_batch, batch=real, rule=self.lr_rule)
        return BatchSetting(real, lr, micro, accumulation, world, noise_reduction=1.0)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "start_batch": self.start_batch,
            "warmup_epochs": self.warmup_epochs,
            "lr_rule": self.lr_rule,
            "then": None if self.then is None else self.then.config(),
        }

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.then is not None:
            state["then"] = self.then.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.then is not None and "then" in state:
            self.then.load_state_dict(state["then"])


@dataclass
class _PlateauState:
    level: int = 0
    best: float | None = None
    bad_epochs: int = 0
    cooldown_left: int = 0
    history: list[tuple[float, float, int]] = field(default_factory=list)


class PlateauBatch(BatchSchedule):
    """Performance-based growth: multiply the batch by ``factor`` when the validation metric has
    not improved for ``patience`` observations (``ReduceLROnPlateau``, with the batch instead of the
    lr; the lr is divided once the batch is capped).

    Call :meth:`observe` after each validation; :meth:`at` returns the current setting.

    >>> s = PlateauBatch(base_batch=32, base_lr=0.1, patience=1)
    >>> [s.observe(loss) for loss in (1.0, 0.8, 0.81, 0.79, 0.80)]
    [False, False, True, False, True]
    >>> s.at(0).batch
    128
    """

    kind = "plateau_batch"

    def __init__(
        self,
        *,
        base_batch: int,
        base_lr: float,
        factor: float = 2.0,
        patience: int = 3,
        threshold: float = 1e-3,
        mode: PlateauMode = "min",
        cooldown: int = 0,
        limits: BatchLimits | None = None,
    ) -> None:
        super().__init__(base_batch=base_batch, base_lr=base_lr, limits=limits)
        self.factor = check_positive_float("factor", factor)
        if self.factor <= 1.0:
            raise BadInputError(f"factor: expected a growth factor > 1, got {factor!r}")
        self.patience = check_positive_int("patience", patience)
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or threshold < 0:
            raise BadInputError(f"threshold: expected a number ≥ 0, got {threshold!r}")
        self.threshold = float(threshold)
        if mode not in get_args(PlateauMode):
            raise BadInputError(f"mode: expected 'min' or 'max', got {mode!r}")
        self.mode: PlateauMode = mode
        if isinstance(cooldown, bool) or not isinstance(cooldown, int) or cooldown < 0:
            raise BadInputError(f"cooldown: expected an integer ≥ 0, got {cooldown!r}")
        self.cooldown = cooldown
        self._state = _PlateauState()

    @property
    def level(self) -> int:
        """How many times the schedule has grown (the noise reduction is ``factor ** level``)."""
        return self._state.level

    def noise_reduction(self, epoch: float) -> float:
        return float(self.factor**self._state.level)

    def _improved(self, value: float) -> bool:
        best = self._state.best
        if best is None:
            return True
        margin = self.threshold * abs(best)
        return value < best - margin if self.mode == "min" else value > best + margin

    def observe(self, value: float) -> bool:
        """Record a validation value; True when the schedule grew because of it."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadInputError(f"value: expected a number, got {value!r}")
        state = self._state
        grew = False
        if math.isfinite(value) and self._improved(value):
            state.best, state.bad_epochs = float(value), 0
        else:
            state.bad_epochs += 1
        if state.cooldown_left > 0:
            state.cooldown_left -= 1
            state.bad_epochs = 0
        elif state.bad_epochs >= self.patience:
            state.level += 1
            grew = True
            state.bad_epochs = 0
            state.cooldown_left = self.cooldown
        state.history.append((float(value), float(self.noise_reduction(0)), int(grew)))
        return grew

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "factor": self.factor,
            "patience": self.patience,
            "threshold": self.threshold,
            "mode": self.mode,
            "cooldown": self.cooldown,
        }

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["plateau"] = {**asdict(self._state), "history": list(self._state.history)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        saved = state["plateau"]
        self._state = _PlateauState(
            level=int(saved["level"]),
            best=None if saved["best"] is None else float(saved["best"]),
            bad_epochs=int(saved["bad_epochs"]),
            cooldown_left=int(saved["cooldown_left"]),
            history=[(float(a), float(b), int(c)) for a, b, c in saved["history"]],
        )


def settings_over(
    schedule: BatchSchedule, *, dataset_size: int, epochs: float
) -> list[tuple[float, BatchSetting]]:
    """The (epoch, setting) of every optimizer step of ``epochs`` epochs under ``schedule``, each
    step's batch taken from the schedule at the epoch where the step starts.

    >>> steps = settings_over(periodic_batch(base_batch=10, base_lr=0.1, every_epochs=1),
    ...                       dataset_size=40, epochs=2)
    >>> [s.batch for _, s in steps]
    [10, 10, 10, 10, 20, 20]
    """
    check_positive_int("dataset_size", dataset_size)
    check_positive_float("epochs", epochs)
    out: list[tuple[float, BatchSetting]] = []
    seen = 0
    total = epochs * dataset_size
    while seen < total - 1e-9:
        epoch = seen / dataset_size
        setting = schedule.at(epoch)
        out.append((epoch, setting))
        in_epoch = seen % dataset_size
        # A step never crosses an epoch boundary: the last batch of an epoch takes what is left.
        seen += min(setting.batch, dataset_size - in_epoch)
    return out


def optimizer_updates(schedule: BatchSchedule, *, dataset_size: int, epochs: float) -> int:
    """How many optimizer updates ``epochs`` epochs take under ``schedule``.

    >>> decay = StepDecay(every_epochs=30, gamma=0.2)
    >>> limits = BatchLimits(dataset_size=50_000)
    >>> optimizer_updates(LrDecaySchedule(decay, base_batch=128, base_lr=0.1, limits=limits),
    ...                   dataset_size=50_000, epochs=90)
    35190
    >>> optimizer_updates(BatchIncrease(decay, base_batch=128, base_lr=0.1, limits=limits),
    ...                   dataset_size=50_000, epochs=90)
    14580
    """
    return len(settings_over(schedule, dataset_size=dataset_size, epochs=epochs))


def noise_scales(
    settings: Sequence[BatchSetting], *, dataset_size: int, momentum: float = 0.0
) -> list[float]:
    """:func:`sgd_noise_scale` of each setting."""
    return [sgd_noise_scale(s.lr, s.batch, dataset_size, momentum=momentum) for s in settings]


__all__ = [
    "BatchIncrease",
    "BatchLimits",
    "BatchSchedule",
    "BatchSetting",
    "BatchWarmup",
    "CosineDecay",
    "ExponentialDecay",
    "LrDecay",
    "LrDecaySchedule",
    "MultiStepDecay",
    "PlateauBatch",
    "StepDecay",
    "decay_from_dict",
    "decay_from_torch",
    "noise_scales",
    "optimizer_updates",
    "periodic_batch",
    "realise",
    "settings_over",
    "sgd_noise_scale",
    "split_for",
]
