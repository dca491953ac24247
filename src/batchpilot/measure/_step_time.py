"""Seconds per training step against the micro-batch: timed in interleaved rounds, then fitted.

Throughput is a model, not a table of single medians. :func:`time_interleaved` times every
micro-batch once per round, so a burst of load hits all batches alike instead of one of them;
:func:`fit_step_time` fits Pollux's step-time model ``T(b) = alpha + beta * b`` robustly
(Theil–Sen, then outliers rejected on relative residuals), and the speed is ``b / T(b)``.

>>> model = fit_step_time({1: [0.3], 2: [0.4], 4: [0.6], 8: [1.0], 16: [0.05]})
>>> round(model.alpha_seconds, 9), round(model.beta_seconds_per_sample, 9), model.rejected_batches
(0.2, 0.1, (16,))
>>> round(model.samples_per_second_at(8), 9)
8.0
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from numbers import Real
from typing import Any, Literal, NamedTuple

import numpy as np
from numpy.typing import NDArray

from batchpilot.errors import BadInputError

StopReason = Literal["stable", "max_rounds", "deadline"]
Floats = NDArray[np.float64]

# 1.4826 * MAD estimates a normal standard deviation.
_MAD_TO_SIGMA = 1.4826
# The curvature term must at least halve the residual scale and cut it by 2 points, on 5+ batches.
_CURVATURE_GAIN, _CURVATURE_MIN_DROP, _CURVATURE_MIN_POINTS = 0.5, 0.02, 5


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BadInputError(f"{name}: expected an integer ≥ {minimum}, got {value!r}")
    return value


def _check_number(name: str, value: object, *, positive: bool = False) -> float:
    kind = "a positive" if positive else "a non-negative"
    message = f"{name}: expected {kind} finite number, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise BadInputError(message)
    number = float(value)
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise BadInputError(message)
    return number


def _is_positive_seconds(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and 0 < float(value) < math.inf


def _relative_iqr(values: Sequence[float]) -> float:
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    if q75 == q25:
        return 0.0
    return float((q75 - q25) / median) if median > 0 else math.inf


@dataclass(frozen=True)
class StepTimings:
    """Raw timings: ``seconds[batch][round]`` holds the seconds per step of each timed block.

    ``stopped`` says why rounds stopped; ``round_spread`` is the largest relative IQR of a
    batch's round medians after the last round.
    """

    seconds: dict[int, tuple[tuple[float, ...], ...]]
    calls_per_block: dict[int, int]
    stopped: StopReason
    round_spread: float

    @property
    def rounds(self) -> int:
        return len(next(iter(self.seconds.values())))

    def samples(self) -> dict[int, list[float]]:
        """Every timed block's seconds per step, rounds concatenated, by micro-batch."""
        return {batch: [s for r in rounds for s in r] for batch, rounds in self.seconds.items()}

    def round_medians(self) -> dict[int, list[float]]:
        return {b: [statistics.median(r) for r in rounds] for b, rounds in self.seconds.items()}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rounds": self.rounds}


def _time_block(
    step: Callable[[], object], calls: int, clock: Callable[[], float], sync: Callable[[], object]
) -> float:
    sync()
    start = clock()
    for _ in range(calls):
        step()
    sync()
    return clock() - start


def time_interleaved(
    steps: Mapping[int, Callable[[], object]],
    *,
    warmup: int = 1,
    min_rounds: int = 3,
    max_rounds: int = 10,
    seconds_per_round: float = 0.1,
    max_calls_per_round: int = 1000,
    stability: float = 0.05,
    deadline: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
    sync: Callable[[], object] = lambda: None,
) -> StepTimings:
    """Seconds per step of ``steps[batch]()``, every batch timed once per round.

    Each batch first runs ``warmup`` untimed calls; then, as in torch.utils.benchmark's
    ``blocked_autorange``, a block of calls between two ``sync()`` calls (pass
    ``torch.cuda.synchronize`` on CUDA) grows ×10 until it lasts a tenth of
    ``seconds_per_round`` (these blocks are untimed warm-up too). A round times blocks of each
    batch until they add up to ``seconds_per_round`` (or ``max_calls_per_round`` calls); round
    ``r`` visits the batches rotated by ``r`` places, so no batch always runs first. Rounds stop
    when, after ``min_rounds``, every batch's round medians have a relative IQR ≤ ``stability``
    (``"stable"``); at ``max_rounds``; or when the next round, as long as the last, would end
    past ``deadline``, a ``clock()`` value (``"deadline"``). One round is always timed.

    >>> now = [0.0]
    >>> def step_at(batch):
    ...     def step(): now[0] += 0.25 + 0.125 * batch
    ...     return step
    >>> timings = time_interleaved({b: step_at(b) for b in (1, 2, 4)}, clock=lambda: now[0])
    >>> timings.stopped, timings.rounds, timings.samples()[4]
    ('stable', 3, [0.75, 0.75, 0.75])
    """
    if not isinstance(steps, Mapping) or not steps:
        raise BadInputError(f"steps: expected a mapping micro-batch → step function, got {steps!r}")
    for batch, step in steps.items():
        if not callable(step):
            raise BadInputError(f"steps: expected a callable for micro-batch {batch}, got {step!r}")
        _check_int("steps", batch, 1)
    _check_int("warmup", warmup, 0)
    _check_int("min_rounds", min_rounds, 1)
    _check_int("max_rounds", max_rounds, min_rounds)
    _check_int("max_calls_per_round", max_calls_per_round, 1)
    block_seconds = _check_number("seconds_per_round", seconds_per_round) / 10
    _check_number("stability", stability)
    if deadline is not None and not (
        isinstance(deadline, Real) and not isinstance(deadline, bool) and math.isfinite(deadline)
    ):
        raise BadInputError(f"deadline: expected a finite clock() value, got {deadline!r}")

    batches = sorted(steps)
    calls_per_block: dict[int, int] = {}
    for batch in batches:
        for _ in range(warmup):
            steps[batch]()
        calls = 1
        while calls < max_calls_per_round:
            if _time_block(steps[batch], calls, clock, sync) >= block_seconds:
                break
            calls = min(10 * calls, max_calls_per_round)
        calls_per_block[batch] = calls

    seconds: dict[int, list[tuple[float, ...]]] = {batch: [] for batch in batches}
    stopped: StopReason = "max_rounds"
    spread = math.inf
    for index in range(max_rounds):
        round_start = clock()
        for batch in batches[index % len(batches) :] + batches[: index % len(batches)]:
            blocks: list[float] = []
            calls = calls_per_block[batch]
            while not blocks or (  # blocks hold seconds per call: sum * calls is time spent
                sum(blocks) * calls < seconds_per_round
                and (len(blocks) + 1) * calls <= max_calls_per_round
            ):
                blocks.append(_time_block(steps[batch], calls, clock, sync) / calls)
            seconds[batch].append(tuple(blocks))
        spread = max(_relative_iqr([statistics.median(r) for r in seconds[b]]) for b in batches)
        if index + 1 >= min_rounds and spread <= stability:
            stopped = "stable"
            break
        if deadline is not None and index + 1 < max_rounds:
            now = clock()
            if now + (now - round_start) > deadline:
                stopped = "deadline"
                break
    rounds = {batch: tuple(timed) for batch, timed in seconds.items()}
    return StepTimings(rounds, calls_per_block, stopped, spread)


def rounds_disagree(timings: StepTimings, *, tolerance: float = 0.10) -> bool:
    """Whether some round ran more than ``tolerance`` slower than another: a busy machine.

    A burst of load slows every batch in its round alike, so a round's load factor is the median
    over batches of its median divided by that batch's median over rounds. With 3 batches or
    more, the gap must also exceed 3 standard errors of the two factors (from their spread over
    batches): jitter that differs from batch to batch is not load.

    >>> rounds_disagree(StepTimings({1: ((1.0,), (1.0,), (2.0,))}, {1: 1}, "max_rounds", 0.5))
    True
    """
    _check_number("tolerance", tolerance)
    medians = [m for m in timings.round_medians().values() if statistics.median(m) > 0]
    if timings.rounds < 2 or not medians:
        return False
    per_round = [[m[r] / statistics.median(m) for m in medians] for r in range(timings.rounds)]
    factors = [statistics.median(f) for f in per_round]
    slow, fast = (
        max(range(len(factors)), key=factors.__getitem__),
        min(range(len(factors)), key=factors.__getitem__),
    )
    if factors[slow] <= (1 + tolerance) * factors[fast]:
        return False
    if len(medians) < 3:
        return True

    # Load slows every batch of a round alike; timing jitter does not. A gap between rounds
    # within 3 standard errors of their factors (from the spread over batches) is jitter.
    def standard_error(values: list[float]) -> float:
        centre = statistics.median(values)
        mad = statistics.median(abs(v - centre) for v in values)
        return 1.4826 * mad / math.sqrt(len(values))

    noise = math.hypot(standard_error(per_round[slow]), standard_error(per_round[fast]))
    return factors[slow] - factors[fast] > 3 * noise


class MachineLoad(NamedTuple):
    """The 1-minute load average (NaN where the platform has none) and the CPU count."""

    load_1min: float
    cores: int

    @property
    def overloaded(self) -> bool:
        return self.load_1min > self.cores


def machine_load() -> MachineLoad:
    """How busy this machine is: more runnable processes than cores skews every timing.

    >>> load = machine_load()
    >>> load.cores >= 1, load.overloaded in (True, False)
    (True, True)
    """
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows has no load average
        load = math.nan
    return MachineLoad(load, os.cpu_count() or 1)


@dataclass(frozen=True)
class StepTimeModel:
    """``T(b) = alpha + beta * b + curvature * b**2`` seconds per step, fitted to timings.

    ``curvature_seconds_per_sample2`` is 0 unless the data needed it. ``relative_residuals`` are
    ``median / T(b) - 1`` for every batch, rejected ones included; ``residual_scale`` is their
    RMS over the kept batches (n - p degrees of freedom); ``parameter_covariance`` (of alpha,
    beta[, curvature]) is ``residual_scale**2`` times the inverse of the design's normal matrix
    in relative error. ``warning`` says what a reader should know ("" if nothing); ``poor_fit``
    that the model should not be trusted.
    """

    alpha_seconds: float
    beta_seconds_per_sample: float
    curvature_seconds_per_sample2: float
    points: tuple[tuple[int, float], ...]
    median_seconds: dict[int, float]
    relative_residuals: dict[int, float]
    rejected_batches: tuple[int, ...]
    residual_scale: float
    parameter_covariance: tuple[tuple[float, ...], ...]
    poor_fit: bool
    warning: str

    def seconds_per_step_at(self, batch: float) -> float:
        b = _check_number("batch", batch, positive=True)
        curvature = self.curvature_seconds_per_sample2
        return self.alpha_seconds + b * (self.beta_seconds_per_sample + curvature * b)

    def samples_per_second_at(self, batch: float) -> float:
        """``batch / T(batch)``: rises with the batch (peaks at ``sqrt(alpha / curvature)``)."""
        return batch / self.seconds_per_step_at(batch)

    def relative_uncertainty_at(self, batch: float) -> float:
        """Relative standard error of ``T(batch)``, from the residual scale and the leverage of
        ``batch`` in the fit (the weighted-least-squares formula; NaN with no spare points)."""
        seconds = self.seconds_per_step_at(batch)
        x = np.array([batch**power for power in range(len(self.parameter_covariance))])
        variance = float(x @ np.array(self.parameter_covariance) @ x)
        return math.nan if math.isnan(variance) else math.sqrt(max(variance, 0.0)) / seconds

    def to_dict(self) -> dict[str, Any]:
        batches = sorted(self.median_seconds)
        return {
            **asdict(self),
            "model": "quadratic" if len(self.parameter_covariance) == 3 else "linear",
            "samples_per_second": {b: self.samples_per_second_at(b) for b in batches},
            "relative_uncertainty": {b: self.relative_uncertainty_at(b) for b in batches},
        }


def _theil_sen(b: Floats, t: Floats, *, curved: bool) -> tuple[tuple[float, float, float], bool]:
    """(alpha, beta, curvature) from medians of pairwise slopes (and of second divided
    differences, if ``curved``); the flag says a negative slope was clamped to 0."""
    curvature = 0.0
    if curved:
        i, j, k = np.array(list(combinations(range(len(b)), 3))).T
        left, right = (t[j] - t[i]) / (b[j] - b[i]), (t[k] - t[j]) / (b[k] - b[j])
        curvature = float(np.median((right - left) / (b[k] - b[i])))
        t = t - curvature * b**2
    i, j = np.triu_indices(len(b), k=1)
    beta = float(np.median((t[j] - t[i]) / (b[j] - b[i])))
    alpha = float(np.median(t - beta * b))
    if beta < 0:
        return (float(np.median(t)), 0.0, curvature), True
    if alpha < 0:  # fixed cost below the noise: the line through the origin
        return (0.0, float(np.median(t / b)), curvature), False
    return (alpha, beta, curvature), False


def _relative(params: tuple[float, float, float], b: Floats, t: Floats) -> Floats:
    return t / (params[0] + params[1] * b + params[2] * b**2) - 1


def _robust_scale(residuals: Floats, parameters: int) -> float:
    """1.4826 × median |residual|, widened by sqrt(n / (n - p)) for the fitted parameters."""
    n = len(residuals)
    spread = _MAD_TO_SIGMA * float(np.median(np.abs(residuals)))
    return spread * math.sqrt(n / (n - parameters)) if n > parameters else math.nan


class _Fit(NamedTuple):
    params: tuple[float, float, float]
    negative_slope: bool
    keep: NDArray[np.bool_]
    limit: float
    scale: float
    parameters: int


def _fit_rejecting(
    b: Floats, t: Floats, *, curved: bool, outlier_z: float, min_outlier: float
) -> _Fit:
    """Theil–Sen on every batch, then again without the outliers; the scale is the RMS of the
    kept relative residuals over n - p degrees of freedom (a median is 0 on 3 points)."""
    parameters = 3 if curved else 2
    params, negative = _theil_sen(b, t, curved=curved)
    residuals = _relative(params, b, t)
    limit = max(outlier_z * _robust_scale(residuals, parameters), min_outlier)
    allowed = max(0, min(len(b) - parameters - 1, len(b) // 3))
    worst = np.argsort(-np.abs(residuals), kind="stable")[:allowed]
    keep = np.ones(len(b), dtype=bool)
    keep[[i for i in worst if abs(residuals[i]) > limit]] = False
    if not keep.all():
        params, negative = _theil_sen(b[keep], t[keep], curved=curved)
    kept = _relative(params, b[keep], t[keep])
    n = len(kept)
    scale = math.sqrt(float(kept @ kept) / (n - parameters)) if n > parameters else math.nan
    return _Fit(params, negative, keep, limit, scale, parameters)


def fit_step_time(
    samples: Mapping[int, Sequence[float]] | StepTimings,
    *,
    outlier_z: float = 3.5,
    min_outlier: float = 0.10,
    poor_scale: float = 0.15,
) -> StepTimeModel:
    """Fit ``T(b)`` to each micro-batch's median seconds per step.

    Theil–Sen gives the line; a batch whose relative residual exceeds ``outlier_z`` residual
    scales (and at least ``min_outlier``) is rejected, worst first, at most a third of the batches
    and always leaving one more than the parameters, and the fit is redone without it. A negative slope is clamped to 0
    and flagged; a negative intercept becomes 0. A ``curvature * b**2`` term (Theil–Sen on second
    divided differences) is added only on 5+ batches, when it is positive and at least halves
    the residual scale and cuts it by 2 points. The fit is poor when a slope was clamped, the
    residual scale exceeds ``poor_scale``, or no batch is left beyond the parameters.

    >>> model = fit_step_time({1: [0.3, 0.31], 3: [0.5], 5: [0.99]})
    >>> model.poor_fit, model.warning.split(":")[0]
    (True, 'residual scale 23% above 15%')
    """
    if isinstance(samples, StepTimings):
        samples = samples.samples()
    if not isinstance(samples, Mapping) or len(samples) < 2:
        raise BadInputError(
            f"samples: expected seconds per step for 2+ micro-batches, got {samples!r}"
        )
    for batch, seconds in samples.items():
        _check_int("samples", batch, 1)
        values = list(seconds) if isinstance(seconds, Sequence | np.ndarray) else []
        if not values or not all(_is_positive_seconds(s) for s in values):
            raise BadInputError(
                f"samples: expected positive seconds for micro-batch {batch}, got {seconds!r}"
            )
    _check_number("outlier_z", outlier_z, positive=True)
    _check_number("min_outlier", min_outlier)
    _check_number("poor_scale", poor_scale, positive=True)

    batches = sorted(samples)
    b = np.array(batches, dtype=float)
    t = np.array([statistics.median(samples[batch]) for batch in batches], dtype=float)
    fit = _fit_rejecting(b, t, curved=False, outlier_z=outlier_z, min_outlier=min_outlier)
    if len(b) >= _CURVATURE_MIN_POINTS:
        quad = _fit_rejecting(b, t, curved=True, outlier_z=outlier_z, min_outlier=min_outlier)
        if (
            quad.params[2] > 0
            and min(quad.params) >= 0
            and not quad.negative_slope
            and quad.keep.sum() >= fit.keep.sum()
            and quad.scale <= _CURVATURE_GAIN * fit.scale
            and fit.scale - quad.scale >= _CURVATURE_MIN_DROP
        ):
            fit = quad
    params, parameters, keep, scale = fit.params, fit.parameters, fit.keep, fit.scale
    rejected = tuple(batch for batch, kept in zip(batches, keep, strict=True) if not kept)
    residuals = _relative(params, b, t)

    design = np.vander(b[keep], parameters, increasing=True)
    weighted = design / (design @ np.array(params[:parameters]))[:, None]
    covariance = scale**2 * np.linalg.pinv(weighted.T @ weighted)

    problems = []
    if keep.sum() <= parameters:
        problems.append(f"{keep.sum()} micro-batches for {parameters} parameters: nothing to check")
    if fit.negative_slope:
        problems.append("step time fell as the micro-batch grew: slope clamped to 0")
    if scale > poor_scale:
        problems.append(
            f"residual scale {scale:.0%} above {poor_scale:.0%}: noisy timings (a busy machine?) "
            "or a step time that is not a line in the batch"
        )
    notes = [f"micro-batches {list(rejected)} off the fit by > {fit.limit:.0%}: rejected"]
    return StepTimeModel(
        alpha_seconds=params[0],
        beta_seconds_per_sample=params[1],
        curvature_seconds_per_sample2=params[2],
        points=tuple((batch, float(s)) for batch in batches for s in samples[batch]),
        median_seconds=dict(zip(batches, t.tolist(), strict=True)),
        relative_residuals=dict(zip(batches, residuals.tolist(), strict=True)),
        rejected_batches=rejected,
        residual_scale=scale,
        parameter_covariance=tuple(tuple(row) for row in covariance.tolist()),
        poor_fit=bool(problems),
        warning="; ".join(problems + notes if rejected else problems),
    )


__all__ = [
    "MachineLoad",
    "StepTimeModel",
    "StepTimings",
    "StopReason",
    "fit_step_time",
    "machine_load",
    "rounds_disagree",
    "time_interleaved",
]
