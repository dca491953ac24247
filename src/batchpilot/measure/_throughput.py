"""Training throughput (samples per second) against the micro-batch, measured.

Small batches are limited by time (fixed costs per step), large ones by memory. On a log-spaced
ladder of micro-batches up to the memory limit, each batch first runs untimed warm-up steps (a
batch that runs out of memory ends the ladder); then every batch is timed once per round, in
several interleaved rounds (:func:`~batchpilot.measure._step_time.time_interleaved`), so that a
burst of load on a shared machine hits all batches alike. Pollux's step-time model
``T(b) = α + β·b`` is fitted robustly to the timings
(:func:`~batchpilot.measure._step_time.fit_step_time`) and the speed is read from the fit,
``b / T(b)``: one outlier cannot make one batch look fast, and the curve rises monotonically
unless the data themselves bend it. The *knee* is the smallest batch that reaches a fraction
(90 %) of the best fitted speed: past it, doubling the batch buys little. The folklore that powers of two (or multiples of 8) are faster is checked
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice, pairwise
from typing import Any, Literal, NamedTuple, get_args

import torch

from batchpilot.checks import check_positive_float, check_positive_int
from batchpilot.data import to_device
from batchpilot.devices import release_memory, synchronize
from batchpilot.errors import BadInputError, UserCodeError
from batchpilot.measure._hygiene import MeasurementConditions, choose_threads, fixed_threads
from batchpilot.measure._memory import training_step
from batchpilot.measure._step_time import (
    StepTimeModel,
    StepTimings,
    fit_step_time,
    rounds_disagree,
    time_interleaved,
)
from batchpilot.oom import is_out_of_memory
from batchpilot.plan._split import SPEED_TIE
from batchpilot.precision import make_scaler
from batchpilot.state import preserved, preserved_rng
from batchpilot.task import Task
from batchpilot.training._loop import micro_batches

Rounding = Literal["none", "8", "pow2"]
ROUNDINGS: tuple[str, ...] = get_args(Rounding)

# Distinct batches kept on the device and cycled through while timing.
_BATCHES_KEPT = 3
# The fastest of at least 3 warm-up steps estimates a batch's speed while climbing the ladder (one
# step may be preempted by other programs), and only 3 flat doublings in a row end the climb.
_MIN_WARMUP = 3
_FLAT_DOUBLINGS = 3


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

    ``stopped_at`` is the batch that ran out of memory and ended the ladder, if one did;
    ``precision`` the task's precision the steps ran in.
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
    model: StepTimeModel | None = None
    timings: StepTimings | None = None
    conditions: MeasurementConditions | None = None
    warnings: tuple[str, ...] = ()
    precision: str = "32"

    def samples_per_second_at(self, batch: int) -> float:
        """Speed at ``batch``: from the fitted step-time model when there is one, else
        interpolated linearly in log-batch between measured points.

        Below the smallest measured batch the step time is taken as constant (small batches are
        bound by per-step costs); above the largest the speed stays at the largest's.

        >>> curve = ThroughputCurve((ThroughputPoint(4, 400.0, 0.01),
        ...     ThroughputPoint(16, 800.0, 0.02)), 16, 16, 0.9, (), "cpu", 2, 5, None, 1.0)
        >>> curve.samples_per_second_at(8), curve.samples_per_second_at(2)
        (600.0, 200.0)
        """
        check_positive_int("batch", batch)
        if self.model is not None:
            return self.model.samples_per_second_at(batch)
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

    @property
    def usable_max_batch(self) -> int:
        """The largest measured batch the fit can speak for: the top of the ladder less any
        batches there that ran slower than the fit (rejected as outliers), where the speed
        saturates and the straight line would overstate it."""
        batches = sorted(p.batch for p in self.points)
        if self.model is not None:
            slow = {
                b
                for b in self.model.rejected_batches
                if self.model.relative_residuals.get(b, 0.0) > 0
            }
            while len(batches) > 1 and batches[-1] in slow:
                batches.pop()
        return batches[-1]

    def relative_uncertainty_at(self, batch: int) -> float:
        """Relative standard error of the speed at ``batch``: from the fit's residuals and the
        batch's leverage; without a model (or with no spare point), the spread of single
        timings on a CPU, :data:`~batchpilot.plan._split.SPEED_TIE`."""
        if self.model is not None:
            value = self.model.relative_uncertainty_at(batch)
            if math.isfinite(value):
                return value
        return SPEED_TIE

    def to_dict(self) -> dict[str, Any]:
        return {
            "points": [point._asdict() for point in self.points],
            "knee_batch": self.knee_batch,
            "best_batch": self.best_batch,
            "knee_fraction": self.knee_fraction,
            "rounding": [cost.to_dict() for cost in self.rounding],
            "device": self.device,
            "precision": self.precision,
            "warmup_steps": self.warmup_steps,
            "timed_steps": self.timed_steps,
            "stopped_at": self.stopped_at,
            "seconds": self.seconds,
            "model": None if self.model is None else self.model.to_dict(),
            "timings": None if self.timings is None else self.timings.to_dict(),
            "conditions": None if self.conditions is None else self.conditions.to_dict(),
            "warnings": list(self.warnings),
            "usable_max_batch": self.usable_max_batch,
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


def _warm(
    task: Task,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: int,
    *,
    device: torch.device,
    warmup_steps: int,
    seed: int,
    scaler: torch.amp.GradScaler | None,
) -> tuple[list[Any], float, float]:
    """Loads ``batch``'s micro-batches onto the device (before any clock runs: the step is
    timed, not the loader) and runs the warm-up steps; returns them, the fastest step's seconds
    and the slowest's after the first (the first also pays for allocation, kernel selection and a
    ``torch.compile``'d model's compilation, which timing never sees: the fastest estimates the
    steady state, the slowest of the others bounds what timing will cost)."""
    loaded = [
        to_device(b, device) for b in islice(micro_batches(task, batch, seed=seed), _BATCHES_KEPT)
    ]
    times = []
    for step in range(max(warmup_steps, _MIN_WARMUP)):
        synchronize(device)
        start = time.perf_counter()
        training_step(
            task,
            model,
            optimizer,
            loaded[step % len(loaded)],
            device=device,
            set_to_none=True,
            scaler=scaler,
        )
        synchronize(device)
        times.append(time.perf_counter() - start)
    return loaded, min(times), max(times[1:])


def _step(
    task: Task,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[Any],
    device: torch.device,
    scaler: torch.amp.GradScaler | None,
) -> Callable[[], None]:
    """One training step per call, cycling through the batches kept on the device."""
    counter = iter(range(1 << 62))

    def step() -> None:
        batch = batches[next(counter) % len(batches)]
        training_step(task, model, optimizer, batch, device=device, set_to_none=True, scaler=scaler)

    return step


def measure_throughput(
    task: Task,
    *,
    batches: Sequence[int] | None = None,
    max_batch: int | None = None,
    device: torch.device | str = "cpu",
    warmup_steps: int = 2,
    timed_steps: int = 3,
    seed: int = 0,
    knee_fraction: float = 0.9,
    seconds_per_round: float = 0.05,
    max_rounds: int = 8,
    time_budget_seconds: float | None = None,
    max_step_seconds: float | None = None,
    stop_when_flat: bool = False,
    conditions: MeasurementConditions | None = None,
) -> ThroughputCurve:
    """Samples per second of ``task``'s training step at each micro-batch, as a fitted model.

    Args:
        batches: the micro-batches to time; default: a doubling ladder up to ``max_batch`` plus
            the largest batch rounded down to a power of two and to a multiple of 8.
        max_batch: top of the ladder; default: the largest micro-batch that fits
            (:func:`~batchpilot.measure._memory_search.find_max_batch`), at most the training-set size.
        warmup_steps: untimed steps per batch before timing (kernel selection, caches).
        timed_steps: the fewest interleaved timing rounds; more follow, up to ``max_rounds``,
            until every batch's round medians agree within 5 %.
        seconds_per_round: how long each batch is timed per round (blocks of steps between
            device synchronisations, as ``torch.utils.benchmark``'s ``blocked_autorange``).
        time_budget_seconds: wall-clock limit for the whole measurement: the ladder stops
            growing, and the rounds stop, when it would be passed.
        max_step_seconds: a batch whose step takes longer than this is not timed (nor any
            larger one): on a CPU a step of seconds is not a useful training batch.
        stop_when_flat: stop climbing the ladder once three doublings in a row raised the speed
            by less than 5 % (on a CPU, memory is then probed only as far as speed still rises).
        knee_fraction: the knee is the smallest batch reaching this fraction of the best speed.
        conditions: the thread count and load of the run (default: chosen now, by
            :func:`~batchpilot.measure._hygiene.choose_threads`); timing runs with those threads.

    The step is the training step in the task's precision (:attr:`Task.precision`): the loss
    under its autocast and, for ``"16-mixed"``, the ``GradScaler``'s scaling, unscaling and
    overflow check included in the time. A batch that runs out of memory ends the ladder. The
    model trains from one initialisation
    (``seed``) and is restored afterwards, and the caller's RNG is left as it was.
    """
    device = torch.device(device)
    check_positive_int("timed_steps", timed_steps)
    check_positive_int("max_rounds", max_rounds)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise BadInputError(f"warmup_steps: expected an integer ≥ 0, got {warmup_steps!r}")
    if not (isinstance(knee_fraction, int | float) and 0 < knee_fraction <= 1):
        raise BadInputError(f"knee_fraction: expected a number in (0, 1], got {knee_fraction!r}")
    check_positive_float("seconds_per_round", seconds_per_round)
    if time_budget_seconds is not None:
        check_positive_float("time_budget_seconds", time_budget_seconds)
    if max_step_seconds is not None:
        check_positive_float("max_step_seconds", max_step_seconds)
    if batches is not None:
        ladder = _check_batches(task, batches)
    else:
        if max_batch is None:
            from batchpilot.measure._memory_search import find_max_batch

            max_batch = find_max_batch(task, device=device, seed=seed).max_micro_batch
        check_positive_int("max_batch", max_batch)
        top = min(max_batch, task.train_size)
        ladder = sorted({*batch_ladder(top), round_batch(top, "pow2"), round_batch(top, "8")})
    chose_conditions = conditions is None
    conditions = conditions or choose_threads(device)

    started = time.perf_counter()
    deadline = None if time_budget_seconds is None else started + time_budget_seconds
    stopped_at: int | None = None
    notes: list[str] = []
    loaded: dict[int, list[Any]] = {}
    with preserved_rng(), fixed_threads(conditions.threads):
        torch.manual_seed(seed)
        model = task.make_model(device)
        model.train()
        optimizer = task.make_optimizer(model.parameters(), task.reference_lr or 1e-3)
        scaler = make_scaler(task.precision, device)
        try:
            with preserved(model, optimizer):
                flat_doublings, last_speed, round_seconds = 0, 0.0, 0.0
                for batch in ladder:
                    try:
                        loaded[batch], fastest, slowest = _warm(
                            task,
                            model,
                            optimizer,
                            batch,
                            device=device,
                            warmup_steps=warmup_steps,
                            seed=seed,
                            scaler=scaler,
                        )
                    except Exception as exc:
                        if batch == 1 and len(ladder) > 1 and isinstance(exc, UserCodeError):
                            # e.g. BatchNorm after a Linear needs two values per channel: a
                            # model that cannot train on one sample starts the ladder at 2
                            notes.append(
                                f"A step at micro-batch 1 failed ({exc}); the ladder starts at "
                                f"{ladder[1]}."
                            )
                            continue
                        if not is_out_of_memory(exc):
                            raise
                        stopped_at = batch  # out of memory: larger batches will not fit either
                        release_memory(device)
                        break
                    elapsed = time.perf_counter() - started
                    too_slow = max_step_seconds is not None and slowest > max_step_seconds
                    if too_slow and len(loaded) > 1:
                        del loaded[batch]
                        notes.append(
                            f"A step at micro-batch {batch} took {slowest:.2g} s (> "
                            f"{max_step_seconds:g} s): larger batches were not timed."
                        )
                        break
                    # timing needs timed_steps rounds of every batch on top of what is spent
                    round_seconds += max(seconds_per_round, fastest)
                    if deadline is not None and len(loaded) > 2:
                        projected = elapsed + timed_steps * round_seconds
                        if started + projected > deadline:
                            notes.append(
                                f"The time budget of {time_budget_seconds:g} s ended the ladder at "
                                f"micro-batch {batch}."
                            )
                            break
                    speed = batch / max(fastest, 1e-12)
                    if stop_when_flat and last_speed:
                        flat_doublings = flat_doublings + 1 if speed < 1.05 * last_speed else 0
                        if flat_doublings >= _FLAT_DOUBLINGS and batch != ladder[-1]:
                            notes.append(
                                f"Speed rose less than 5 % over {_FLAT_DOUBLINGS} doublings up to "
                                f"micro-batch {batch}: larger batches were not probed."
                            )
                            break
                    last_speed = max(last_speed, speed)

                timings = time_interleaved(
                    {
                        b: _step(task, model, optimizer, loaded[b], device, scaler)
                        for b in sorted(loaded)
                    },
                    warmup=0,
                    min_rounds=timed_steps,
                    max_rounds=max(max_rounds, timed_steps),
                    seconds_per_round=seconds_per_round,
                    deadline=deadline,
                    sync=lambda: synchronize(device),
                )
        finally:
            loaded.clear()
            del model, optimizer
            release_memory(device)
    if not timings.seconds:
        raise BadInputError(
            f"batches: even micro-batch {ladder[0]} ran out of memory on {device}; nothing timed"
        )
    medians = {b: statistics.median(s) for b, s in timings.samples().items()}
    points = [ThroughputPoint(b, b / medians[b], medians[b]) for b in sorted(medians)]
    # a line needs two batches: with one (a one-sample task, --max-batch 1) the median stands
    fitted = fit_step_time(timings) if len(points) >= 2 else None
    speeds = [
        ThroughputPoint(p.batch, fitted.samples_per_second_at(p.batch), 0.0) if fitted else p
        for p in points
    ]
    best = max(speeds, key=lambda p: (p.samples_per_second, -p.batch))
    if fitted is not None and fitted.warning:
        notes.append(fitted.warning)
    if fitted is None:
        notes.append(f"Only micro-batch {points[0].batch} was timed: no step-time model.")
    if rounds_disagree(timings):
        notes.append(
            "Timing rounds disagreed by more than 10 %: the machine was busy while measuring "
            "(the fit uses every round, so the curve's shape holds; its level may not)."
        )
    if chose_conditions and conditions.busy:
        notes.append(f"The machine was busy when timing started ({conditions.reason}).")
    return ThroughputCurve(
        points=tuple(points),
        knee_batch=knee(speeds, knee_fraction),
        best_batch=best.batch,
        knee_fraction=float(knee_fraction),
        rounding=_rounding_costs(points),
        device=str(device),
        warmup_steps=warmup_steps,
        timed_steps=timings.rounds,
        stopped_at=stopped_at,
        seconds=time.perf_counter() - started,
        model=fitted,
        timings=timings,
        conditions=conditions,
        warnings=tuple(notes),
        precision=task.precision,
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
