"""Training throughput (samples per second) against the micro-batch, measured.

Small batches are limited by time (fixed costs per step), large ones by memory. On a log-spaced
ladder of micro-batches up to the memory limit, each point runs warm-up steps and then times
several training steps between device synchronisations; the point's speed is the median. The
*knee* is the smallest batch that reaches a fraction (90 %) of the best speed: past it, doubling
the batch buys little. The folklore that powers of two (or multiples of 8) are faster is checked
instead of assumed: the largest batch is measured next to its rounded-down neighbours.

>>> batch_ladder(100)
[1, 2, 4, 8, 16, 32, 64, 100]
>>> round_batch(100, "pow2"), round_batch(100, "8"), round_batch(100, "none")
(64, 96, 100)
>>> points = [ThroughputPoint(1, 100.0, 0.01), ThroughputPoint(8, 700.0, 0.011),
...           ThroughputPoint(64, 1000.0, 0.064)]
>>> knee(points, 0.9)
64
>>> knee(points, 0.7)
8
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice, pairwise
from typing import Any, Literal, NamedTuple, get_args

import torch

from batchpilot.checks import check_positive_int
from batchpilot.data import to_device
from batchpilot.devices import release_memory, synchronize
from batchpilot.errors import BadInputError
from batchpilot.measure._memory import training_step
from batchpilot.oom import is_out_of_memory
from batchpilot.state import preserved, preserved_rng
from batchpilot.task import Task
from batchpilot.training._loop import micro_batches

Rounding = Literal["none", "8", "pow2"]
ROUNDINGS: tuple[str, ...] = get_args(Rounding)

# Distinct batches kept on the device and cycled through while timing.
_BATCHES_KEPT = 3


def round_batch(batch: int, rule: str) -> int:
    """``batch`` rounded down to a power of two (``"pow2"``) or a multiple of 8 (``"8"``).

    Batches below 8 are left as they are by ``"8"``.

    >>> round_batch(7, "8"), round_batch(1000, "pow2")
    (7, 512)
    """
    check_positive_int("batch", batch)
    if rule not in ROUNDINGS:
        raise BadInputError(f"round: expected one of {', '.join(ROUNDINGS)}, got {rule!r}")
    if rule == "pow2":
        return 1 << (batch.bit_length() - 1)
    if rule == "8":
        return batch if batch < 8 else batch // 8 * 8
    return batch


def batch_ladder(max_batch: int, *, factor: float = 2.0, min_batch: int = 1) -> list[int]:
    """Micro-batches from ``min_batch`` to ``max_batch``, each ``factor`` times the last.

    >>> batch_ladder(50, factor=4)
    [1, 4, 16, 50]
    """
    check_positive_int("max_batch", max_batch)
    check_positive_int("min_batch", min_batch)
    if not factor > 1:
        raise BadInputError(f"factor: expected a number above 1, got {factor!r}")
    ladder: list[int] = []
    value = float(min(min_batch, max_batch))
    while round(value) < max_batch:
        if not ladder or round(value) > ladder[-1]:
            ladder.append(round(value))
        value *= factor
    return [*ladder, max_batch]


class ThroughputPoint(NamedTuple):
    """One measured micro-batch: median samples per second and seconds per training step."""

    batch: int
    samples_per_second: float
    seconds_per_step: float


def knee(points: Sequence[ThroughputPoint], fraction: float = 0.9) -> int:
    """The smallest batch whose speed reaches ``fraction`` of the best measured speed."""
    if not points:
        raise BadInputError("points: no throughput measured")
    best = max(point.samples_per_second for point in points)
    return min(p.batch for p in points if p.samples_per_second >= fraction * best)


@dataclass(frozen=True)
class RoundingCost:
    """Speed at ``batch`` against speed at ``rounded_batch`` (its rounding by ``rule``), both
    measured. ``change`` > 0 means the rounded batch trains more samples per second."""

    rule: str
    batch: int
    rounded_batch: int
    samples_per_second: float
    rounded_samples_per_second: float

    @property
    def change(self) -> float:
        return self.rounded_samples_per_second / self.samples_per_second - 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "batch": self.batch,
            "rounded_batch": self.rounded_batch,
            "samples_per_second": self.samples_per_second,
            "rounded_samples_per_second": self.rounded_samples_per_second,
            "change": self.change,
        }


@dataclass(frozen=True)
class ThroughputCurve:
    """Samples per second against micro-batch, with the knee and the best batch.

    ``stopped_at`` is the batch that ran out of memory and ended the ladder, if one did.
    """

    points: tuple[ThroughputPoint, ...]
    knee_batch: int
    best_batch: int
    knee_fraction: float
    rounding: tuple[RoundingCost, ...]
    device: str
    warmup_steps: int
    timed_steps: int
    stopped_at: int | None
    seconds: float

    def samples_per_second_at(self, batch: int) -> float:
        """Speed at ``batch``, interpolated linearly in log-batch between measured points.

        Below the smallest measured batch the step time is taken as constant (small batches are
        bound by per-step costs); above the largest the speed stays at the largest's.

        >>> curve = ThroughputCurve((ThroughputPoint(4, 400.0, 0.01),
        ...     ThroughputPoint(16, 800.0, 0.02)), 16, 16, 0.9, (), "cpu", 2, 5, None, 1.0)
        >>> curve.samples_per_second_at(8), curve.samples_per_second_at(2)
        (600.0, 200.0)
        """
        check_positive_int("batch", batch)
        points = sorted(self.points)
        first, last = points[0], points[-1]
        if batch <= first.batch:
            return first.samples_per_second * batch / first.batch
        if batch >= last.batch:
            return last.samples_per_second
        for low, high in pairwise(points):
            if low.batch <= batch <= high.batch:
                t = math.log(batch / low.batch) / math.log(high.batch / low.batch)
                return low.samples_per_second + t * (
                    high.samples_per_second - low.samples_per_second
                )
        raise AssertionError("unreachable: batch lies between the first and last points")

    def to_dict(self) -> dict[str, Any]:
        return {
            "points": [point._asdict() for point in self.points],
            "knee_batch": self.knee_batch,
            "best_batch": self.best_batch,
            "knee_fraction": self.knee_fraction,
            "rounding": [cost.to_dict() for cost in self.rounding],
            "device": self.device,
            "warmup_steps": self.warmup_steps,
            "timed_steps": self.timed_steps,
            "stopped_at": self.stopped_at,
            "seconds": self.seconds,
        }


def _check_batches(task: Task, batches: Sequence[int]) -> list[int]:
    if not batches:
        raise BadInputError("batches: expected at least one micro-batch")
    for batch in batches:
        check_positive_int("batches", batch)
        if batch > task.train_size:
            raise BadInputError(
                f"batches: {batch} is larger than the training set ({task.train_size} samples)"
            )
    return sorted(set(batches))


def _time_batch(
    task: Task,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: int,
    *,
    device: torch.device,
    warmup_steps: int,
    timed_steps: int,
    seed: int,
) -> ThroughputPoint:
    """Median seconds per training step at ``batch``; the model and optimizer are restored."""
    with preserved(model, optimizer):
        # Batches are loaded and moved before the clock starts: the step is timed, not the loader.
        loaded = [
            to_device(b, device)
            for b in islice(micro_batches(task, batch, seed=seed), _BATCHES_KEPT)
        ]
        seconds: list[float] = []
        for step in range(warmup_steps + timed_steps):
            synchronize(device)
            start = time.perf_counter()
            training_step(
                task, model, optimizer, loaded[step % len(loaded)], device=device, set_to_none=True
            )
            synchronize(device)
            if step >= warmup_steps:
                seconds.append(time.perf_counter() - start)
        del loaded
    median = statistics.median(seconds)
    return ThroughputPoint(batch, batch / median, median)


def measure_throughput(
    task: Task,
    *,
    batches: Sequence[int] | None = None,
    max_batch: int | None = None,
    device: torch.device | str = "cpu",
    warmup_steps: int = 2,
    timed_steps: int = 5,
    seed: int = 0,
    knee_fraction: float = 0.9,
) -> ThroughputCurve:
    """Samples per second of ``task``'s training step at each micro-batch.

    Args:
        batches: the micro-batches to time; default: a doubling ladder up to ``max_batch`` plus
            the largest batch rounded down to a power of two and to a multiple of 8.
        max_batch: top of the ladder; default: the largest micro-batch that fits
            (:func:`~batchpilot.measure._memory_search.find_max_batch`), at most the training-set size.
        warmup_steps: untimed steps before timing each batch (kernel selection, caches).
        timed_steps: timed steps per batch; the median is kept.
        knee_fraction: the knee is the smallest batch reaching this fraction of the best speed.

    A batch that runs out of memory ends the ladder. The model trains from one initialisation
    (``seed``) restored before every batch, and the caller's RNG is left as it was.
    """
    device = torch.device(device)
    check_positive_int("timed_steps", timed_steps)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise BadInputError(f"warmup_steps: expected an integer ≥ 0, got {warmup_steps!r}")
    if not (isinstance(knee_fraction, int | float) and 0 < knee_fraction <= 1):
        raise BadInputError(f"knee_fraction: expected a number in (0, 1], got {knee_fraction!r}")
    if batches is not None:
        ladder = _check_batches(task, batches)
    else:
        if max_batch is None:
            from batchpilot.measure._memory_search import find_max_batch

            max_batch = find_max_batch(task, device=device, seed=seed).max_micro_batch
        check_positive_int("max_batch", max_batch)
        top = min(max_batch, task.train_size)
        ladder = sorted({*batch_ladder(top), round_batch(top, "pow2"), round_batch(top, "8")})

    started = time.perf_counter()
    points: list[ThroughputPoint] = []
    stopped_at: int | None = None
    with preserved_rng():
        torch.manual_seed(seed)
        model = task.make_model(device)
        model.train()
        optimizer = task.make_optimizer(model.parameters(), task.reference_lr or 1e-3)
        for batch in ladder:
            try:
                point = _time_batch(
                    task,
                    model,
                    optimizer,
                    batch,
                    device=device,
                    warmup_steps=warmup_steps,
                    timed_steps=timed_steps,
                    seed=seed,
                )
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                point = None
            if point is None:  # out of memory: larger batches will not fit either
                stopped_at = batch
                release_memory(device)
                break
            points.append(point)
        del model, optimizer
    release_memory(device)
    if not points:
        raise BadInputError(
            f"batches: even micro-batch {ladder[0]} ran out of memory on {device}; nothing timed"
        )
    best = max(points, key=lambda p: p.samples_per_second)
    return ThroughputCurve(
        points=tuple(points),
        knee_batch=knee(points, knee_fraction),
        best_batch=best.batch,
        knee_fraction=float(knee_fraction),
        rounding=_rounding_costs(points),
        device=str(device),
        warmup_steps=warmup_steps,
        timed_steps=timed_steps,
        stopped_at=stopped_at,
        seconds=time.perf_counter() - started,
    )


def _rounding_costs(points: Sequence[ThroughputPoint]) -> tuple[RoundingCost, ...]:
    """For the largest measured batch, the measured change when rounded down by each rule."""
    by_batch = {point.batch: point for point in points}
    top = max(by_batch)
    costs = []
    for rule in ("pow2", "8"):
        rounded = round_batch(top, rule)
        if rounded != top and rounded in by_batch:
            costs.append(
                RoundingCost(
                    rule=rule,
                    batch=top,
                    rounded_batch=rounded,
                    samples_per_second=by_batch[top].samples_per_second,
                    rounded_samples_per_second=by_batch[rounded].samples_per_second,
                )
            )
    return tuple(costs)


__all__ = [
    "ROUNDINGS",
    "RoundingCost",
    "ThroughputCurve",
    "ThroughputPoint",
    "batch_ladder",
    "knee",
    "measure_throughput",
    "round_batch",
]
