"""Goodput: which global batch trains fastest, from the noise scale and the throughput curve.

A bigger batch processes more samples per second but each sample buys less progress once the batch
passes the gradient noise scale ``B_noise`` (McCandlish et al. 2018, arXiv 1812.06162):

- steps to a target relative to the fewest possible: ``S(B) / S_min = 1 + B_noise / B``;
- samples to a target relative to the fewest possible: ``E(B) / E_min = 1 + B / B_noise``;
- statistical efficiency relative to a batch ``B0`` (Pollux, OSDI'21):
  ``E(B) = (B_noise + B0) / (B_noise + B)``, 1 at ``B0``;
- goodput ``= throughput(B) × E(B)``: progress per second in samples at ``B0``. The batch that
  maximises it reaches the target soonest in wall-clock time.

The throughput curve is a plain sequence of ``(micro_batch, samples_per_second)`` pairs, or any
object with ``samples_per_second_at(micro_batch)``. A global batch is realised as
micro-batch × accumulation steps × world size with the fastest micro-batch that divides it.

>>> round(statistical_efficiency(256, noise_scale=100.0, base_batch=32), 4)
0.3708
>>> steps_to_target_ratio(100, noise_scale=100.0)
2.0
>>> plan = plan_goodput([(16, 800.0), (64, 2400.0), (256, 3000.0)], noise_scale=100.0,
...                     base_batch=16, batches=[16, 64, 256, 1024])
>>> plan.recommended.global_batch, plan.recommended.micro_batch
(64, 64)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from typing import Any

from batchpilot.checks import check_positive_int
from batchpilot.errors import BadInputError
from batchpilot.plan._split import SupportsThroughput, split_batch

# A batch needing more than 10× the fewest possible steps (B < B_noise / 9) spends nine tenths of
# its steps on gradient noise: never recommended unless nothing larger is possible.
MAX_STEPS_RATIO = 10.0
# Two goodputs closer than two combined standard errors (≈ 95 %) cannot be told apart.
TIE_SIGMAS = 2.0

Throughput = SupportsThroughput | Sequence[tuple[int, float]] | Sequence[Sequence[float]]


def _check_noise_scale(noise_scale: float) -> float:
    if isinstance(noise_scale, bool) or not isinstance(noise_scale, int | float):
        raise BadInputError(f"noise_scale: expected a positive number, got {noise_scale!r}")
    if math.isnan(noise_scale) or noise_scale <= 0:
        raise BadInputError(f"noise_scale: expected a positive number, got {noise_scale!r}")
    return float(noise_scale)


def _check_batch(name: str, batch: float) -> float:
    if isinstance(batch, bool) or not isinstance(batch, int | float) or not batch > 0:
        raise BadInputError(f"{name}: expected a positive number, got {batch!r}")
    return float(batch)


def statistical_efficiency(batch: float, *, noise_scale: float, base_batch: float) -> float:
    """Progress per sample at ``batch`` relative to ``base_batch``: ``(B_noise + B0)/(B_noise + B)``.

    An infinite noise scale (pure noise, or a signal not yet measurable) makes every sample count
    the same.

    >>> statistical_efficiency(64, noise_scale=64.0, base_batch=64)
    1.0
    """
    batch = _check_batch("batch", batch)
    base_batch = _check_batch("base_batch", base_batch)
    noise_scale = _check_noise_scale(noise_scale)
    if math.isinf(noise_scale):
        return 1.0
    return (noise_scale + base_batch) / (noise_scale + batch)


def steps_to_target_ratio(batch: float, *, noise_scale: float) -> float:
    """``S(B) / S_min = 1 + B_noise / B``: how many more steps than the fewest possible.

    >>> steps_to_target_ratio(1000, noise_scale=10.0)
    1.01
    """
    batch = _check_batch("batch", batch)
    return 1.0 + _check_noise_scale(noise_scale) / batch


def predicted_steps(
    steps: float,
    *,
    from_batch: int,
    to_batch: int,
    critical_batch: float,
    dataset_size: int | None = None,
) -> float:
    """Steps at ``to_batch`` to the loss that ``steps`` steps at ``from_batch`` reached, by
    ``S(B) = S_min (1 + B_crit/B)`` (McCandlish et al. 2018), with the finite-population factor
    ``(N − B)/(B (N − 1))`` in place of ``1/B`` when ``dataset_size`` N is given.

    >>> predicted_steps(100, from_batch=10, to_batch=1000, critical_batch=10.0)
    50.5
    """
    critical = _check_noise_scale(critical_batch)
    if math.isinf(critical):
        return steps * from_batch / to_batch  # pure noise: only the samples count
    return (
        steps
        * (1.0 + critical * _noise_factor(to_batch, dataset_size))
        / (1.0 + critical * _noise_factor(from_batch, dataset_size))
    )


def _noise_factor(batch: int, dataset_size: int | None) -> float:
    """``1/B``, or ``(N − B)/(B (N − 1))`` for a batch drawn from N samples without replacement."""
    batch = int(_check_batch("batch", batch))
    if dataset_size is None:
        return 1.0 / batch
    if dataset_size <= 1 or batch >= dataset_size:
        return 0.0
    return (dataset_size - batch) / (batch * (dataset_size - 1))


@dataclass(frozen=True)
class StepsCriticalBatch:
    """The critical batch measured through two batches' steps to one loss
    (:func:`critical_batch_from_steps`): ``reference_steps`` at ``reference_batch`` (one run,
    read to ±``reference_resolution``, its progress signal's spacing) and ``steps``, the median
    over seeds, at ``batch`` (``steps_range``: the seeds' fewest and most). ``interval`` spans
    both uncertainties."""

    target_loss: float
    reference_batch: int
    reference_steps: float
    reference_resolution: float
    batch: int
    steps: float
    steps_range: tuple[float, float]
    critical_batch: float
    interval: tuple[float, float]

    @classmethod
    def measure(
        cls,
        target_loss: float,
        *,
        reference: tuple[int, float],
        reference_resolution: float,
        checked: tuple[int, float, tuple[float, float]],
        dataset_size: int | None,
    ) -> StepsCriticalBatch | None:
        """From ``reference = (batch, steps)`` and ``checked = (batch, median steps, (fewest,
        most))``; None when they are the same batch or a count is not finite and positive."""
        (b_ref, s_ref), (b, s, spread) = reference, checked
        if b_ref == b or not all(math.isfinite(v) and v > 0 for v in (s_ref, s, *spread)):
            return None

        def critical(at_ref: float, at_b: float) -> float:
            (small, s_small), (large, s_large) = sorted([(b_ref, at_ref), (b, at_b)])
            return critical_batch_from_steps(
                s_small, s_large, small_batch=small, large_batch=large, dataset_size=dataset_size
            )

        fewest, most = min(spread), max(spread)
        ref_low, ref_high = s_ref * (1 - reference_resolution), s_ref * (1 + reference_resolution)
        # B_crit grows with the steps at the smaller batch over those at the larger one
        ends = (
            (critical(ref_low, most), critical(ref_high, fewest))
            if b_ref < b
            else (critical(ref_high, fewest), critical(ref_low, most))
        )
        return cls(
            target_loss,
            b_ref,
            s_ref,
            reference_resolution,
            b,
            s,
            (fewest, most),
            critical(s_ref, s),
            (min(ends), max(ends)),
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["steps_range"] = list(self.steps_range)
        data["interval"] = list(self.interval)
        return data


def critical_batch_from_steps(
    small_steps: float,
    large_steps: float,
    *,
    small_batch: int,
    large_batch: int,
    dataset_size: int | None = None,
) -> float:
    """``B_crit`` of ``S(B) = S_min (1 + B_crit/B)`` through two measured points: ``small_steps``
    to a loss at ``small_batch`` and ``large_steps`` to the same loss at ``large_batch`` — the
    inverse of :func:`predicted_steps`, and what a batch-size sweep fits (Shallue et al. 2019,
    McCandlish et al. 2018), from the two batches a tuning run trains anyway.

    With ``r = S_small / S_large``: ``B_crit = (r − 1) / (f_small − r f_large)``, ``f`` the noise
    factor ``1/B`` (finite-population with ``dataset_size``). 0 when the larger batch saved no
    steps (``r ≤ 1``); infinite when it saved all of them in proportion (``r`` at or above the
    batches' ratio: perfect scaling, ``B_crit`` at least the larger batch).

    >>> round(critical_batch_from_steps(100, 50.5, small_batch=10, large_batch=1000), 3)
    10.0
    """
    for name, value in (("small_steps", small_steps), ("large_steps", large_steps)):
        if not (value > 0):
            raise BadInputError(f"{name}: expected steps > 0, got {value}")
    if not large_batch > small_batch:
        raise BadInputError(
            f"large_batch: expected a batch above small_batch {small_batch}, got {large_batch}"
        )
    if math.isinf(small_steps) or math.isinf(large_steps):
        return math.nan
    ratio = small_steps / large_steps
    if ratio <= 1.0:
        return 0.0
    small, large = (
        _noise_factor(small_batch, dataset_size),
        _noise_factor(large_batch, dataset_size),
    )
    denominator = small - ratio * large
    if denominator <= 0:
        return math.inf
    return (ratio - 1.0) / denominator


def samples_to_target_ratio(batch: float, *, noise_scale: float) -> float:
    """``E(B) / E_min = 1 + B / B_noise``: how many more samples than the fewest possible.

    >>> samples_to_target_ratio(10, noise_scale=10.0)
    2.0
    """
    batch = _check_batch("batch", batch)
    return 1.0 + batch / _check_noise_scale(noise_scale)


@dataclass(frozen=True)
class GoodputPoint:
    """One global batch: how it is realised, how fast it runs, how much each sample is worth."""

    global_batch: int
    micro_batch: int
    accumulation_steps: int
    world_size: int
    samples_per_second: float
    efficiency: float
    goodput: float
    steps_ratio: float
    relative_uncertainty: float = 0.0


@dataclass(frozen=True)
class GoodputPlan:
    """Goodput over candidate global batches and the one chosen, with the rule that chose it.

    ``tied`` are the batches whose goodput cannot be told apart from the best one's within their
    uncertainty; ``excluded`` those above the steps-to-target cap; ``rule`` says in words what
    decided.
    """

    noise_scale: float
    base_batch: int
    world_size: int
    points: tuple[GoodputPoint, ...]
    recommended: GoodputPoint
    best_goodput_batch: int = 0
    tied: tuple[int, ...] = ()
    excluded: tuple[int, ...] = ()
    max_steps_ratio: float | None = None
    capped_by_memory: bool = False
    rule: str = ""

    @property
    def recommended_batch(self) -> int:
        return self.recommended.global_batch

    def to_dict(self) -> dict[str, Any]:
        return {
            "noise_scale": self.noise_scale,
            "base_batch": self.base_batch,
            "world_size": self.world_size,
            "recommended_batch": self.recommended_batch,
            "recommended": asdict(self.recommended),
            "points": [asdict(point) for point in self.points],
            "best_goodput_batch": self.best_goodput_batch,
            "tied": list(self.tied),
            "excluded": list(self.excluded),
            "max_steps_ratio": self.max_steps_ratio,
            "capped_by_memory": self.capped_by_memory,
            "rule": self.rule,
        }


class _PairCurve:
    """Samples per second between measured micro-batches, interpolated in log-log space.

    Below the smallest measured batch the step time is taken as constant (small batches are bound
    by fixed per-step costs); above the largest nothing is assumed.
    """

    def __init__(self, pairs: Iterable[Sequence[float]]) -> None:
        points: dict[int, float] = {}
        for pair in pairs:
            if len(pair) < 2:
                raise BadInputError(
                    f"throughput: expected (batch, samples_per_second) pairs, got {pair!r}"
                )
            batch, speed = pair[0], pair[1]
            if isinstance(batch, float) and batch.is_integer():
                batch = int(batch)
            check_positive_int("throughput batch", batch)  # type: ignore[arg-type]
            if not (isinstance(speed, int | float) and math.isfinite(speed) and speed > 0):
                raise BadInputError(
                    f"throughput: samples_per_second at batch {batch} must be a positive "
                    f"number, got {speed!r}"
                )
            points[int(batch)] = float(speed)
        if not points:
            raise BadInputError("throughput: expected at least one (batch, samples_per_second)")
        self.measured = points
        self.batches = sorted(points)
        self.speeds = [points[b] for b in self.batches]

    def samples_per_second_at(self, batch: int) -> float:
        if batch in self.measured:
            return self.measured[batch]
        batches, speeds = self.batches, self.speeds
        if batch > batches[-1]:
            raise BadInputError(
                f"batch: {batch} is above the largest measured micro-batch {batches[-1]}"
            )
        if batch <= batches[0]:
            return speeds[0] * batch / batches[0]
        for (b0, s0), (b1, s1) in pairwise(zip(batches, speeds, strict=True)):
            if b0 <= batch <= b1:
                t = math.log(batch / b0) / math.log(b1 / b0)
                return math.exp(math.log(s0) + t * math.log(s1 / s0))
        return speeds[-1]  # pragma: no cover  (batch == batches[-1] is caught by the loop)


def _as_curve(throughput: Throughput) -> tuple[SupportsThroughput, list[int]]:
    """The curve and the micro-batches it was measured at (when known)."""
    if isinstance(throughput, SupportsThroughput):
        points = getattr(throughput, "points", None) or ()
        measured = sorted({int(getattr(p, "batch", None) or p[0]) for p in points})
        return throughput, measured
    if isinstance(throughput, str | bytes) or not isinstance(throughput, Sequence):
        raise BadInputError(
            "throughput: expected (batch, samples_per_second) pairs or an object with "
            f"samples_per_second_at(batch), got {type(throughput).__name__}"
        )
    curve = _PairCurve(throughput)
    return curve, list(curve.batches)


def plan_goodput(
    throughput: Throughput,
    *,
    noise_scale: float,
    base_batch: int,
    batches: Iterable[int] | None = None,
    max_batch: int | None = None,
    max_micro_batch: int | None = None,
    world_size: int = 1,
    max_steps_ratio: float | None = MAX_STEPS_RATIO,
    tie_sigmas: float = TIE_SIGMAS,
) -> GoodputPlan:
    """Goodput of candidate global batches and the recommended one.

    Args:
        throughput: samples per second per device at a micro-batch, as ``(batch,
            samples_per_second)`` pairs or an object with ``samples_per_second_at(batch)``.
        noise_scale: the gradient noise scale ``B_noise`` (``inf`` allowed: no statistical cost).
        base_batch: the batch ``B0`` at which efficiency is 1 (where the lr was chosen).
        batches: global batches to consider; default powers of two from the smallest measured
            micro-batch (× world size) to ``max_batch``, plus the measured batches and ``base_batch``.
        max_batch: the largest global batch to consider (e.g. the dataset size); default 64× the
            largest measured micro-batch × world size.
        max_micro_batch: the largest micro-batch that fits a device; default the largest measured.
        world_size: data-parallel devices; each runs the micro-batch at the measured speed.
        max_steps_ratio: never choose a batch that needs more than this many times the fewest
            possible steps to the target, ``S(B)/S_min = 1 + B_noise/B`` (unless no candidate
            meets it: then the one closest to it, and ``capped_by_memory`` says so).
        tie_sigmas: goodputs closer than this many combined standard errors are a tie.

    The decision rule: among the candidates under the steps cap, the highest goodput wins;
    every candidate whose goodput is within ``tie_sigmas`` standard errors of the best (from the
    throughput fit's uncertainty, :meth:`relative_uncertainty_at`, where the curve has it) ties
    with it, and a tie goes to the larger batch — fewer predicted steps to the target — never to
    the accident of timing noise.

    Accumulation steps are taken to cost nothing beyond their micro-batches (the optimizer step's
    share is ignored), and devices to scale perfectly.
    """
    noise_scale = _check_noise_scale(noise_scale)
    check_positive_int("base_batch", base_batch)
    check_positive_int("world_size", world_size)
    curve, measured = _as_curve(throughput)
    if max_micro_batch is None:
        if not measured:
            raise BadInputError(
                "max_micro_batch: give it when the throughput curve does not list its points"
            )
        max_micro_batch = measured[-1]
    check_positive_int("max_micro_batch", max_micro_batch)
    if max_batch is None:
        max_batch = 64 * max_micro_batch * world_size
    check_positive_int("max_batch", max_batch)
    if batches is None:
        smallest = (measured[0] if measured else 1) * world_size
        candidates = {base_batch, *(b * world_size for b in measured)}
        power = 1
        while power <= max_batch:
            if power >= smallest:
                candidates.add(power)
            power *= 2
        batches = sorted(b for b in candidates if b <= max_batch)
    else:
        batches = sorted({check_positive_int("batches", b) for b in batches})
    points = []
    for global_batch in batches:
        point = _best_split(
            curve, global_batch, noise_scale, base_batch, max_micro_batch, world_size
        )
        if point is not None:
            points.append(point)
    if not points:
        raise BadInputError(
            f"batches: none of {batches} can be split into a micro-batch ≤ {max_micro_batch} "
            f"× accumulation × world size {world_size}"
        )
    return _decide(points, noise_scale, base_batch, world_size, max_steps_ratio, tie_sigmas)


def _decide(
    points: list[GoodputPoint],
    noise_scale: float,
    base_batch: int,
    world_size: int,
    max_steps_ratio: float | None,
    tie_sigmas: float,
) -> GoodputPlan:
    if not math.isfinite(noise_scale):  # no statistical cost: no steps to cap
        max_steps_ratio = None
    allowed = [p for p in points if max_steps_ratio is None or p.steps_ratio <= max_steps_ratio]
    capped = not allowed
    if capped:  # even the largest batch the limits allow needs too many steps: the closest
        allowed = [min(points, key=lambda p: p.steps_ratio)]
    excluded = tuple(p.global_batch for p in points if p not in allowed)
    best = max(allowed, key=lambda p: (p.goodput, -p.global_batch))

    def sigma(point: GoodputPoint) -> float:
        return point.goodput * point.relative_uncertainty

    tied = [
        p
        for p in allowed
        if best.goodput - p.goodput <= tie_sigmas * math.hypot(sigma(best), sigma(p))
    ]
    # fewer steps to the target decide a tie; with no noise scale every sample counts alike and
    # steps do not matter, so the tie goes to the smaller batch (more updates, less memory)
    finite = math.isfinite(noise_scale)
    chosen = (
        max(tied, key=lambda p: p.global_batch)
        if finite
        else min(tied, key=lambda p: p.global_batch)
    )
    if capped:
        rule = (
            f"every batch the limits allow needs more than {max_steps_ratio:g}× the fewest steps; "
            f"batch {chosen.global_batch} comes closest"
        )
    elif chosen is best:
        rule = f"batch {chosen.global_batch} has the highest goodput" + (
            f" ({len(tied) - 1} others within {tie_sigmas:g} standard errors)"
            if len(tied) > 1
            else ""
        )
    else:
        rule = (
            f"batch {best.global_batch} has the highest goodput, but batches up to "
            f"{chosen.global_batch} are within {tie_sigmas:g} standard errors of it: the tie goes "
            f"to the larger batch, {chosen.global_batch}, which needs fewer steps to the target"
            if finite
            else f"batch {best.global_batch} has the highest goodput; within {tie_sigmas:g} "
            f"standard errors of it, the smallest batch, {chosen.global_batch}, is taken (with no "
            "noise scale, more updates cost nothing)"
        )
    if excluded:
        rule += (
            f"; batches {', '.join(map(str, excluded))} need more than {max_steps_ratio:g}× the "
            "fewest steps and were not considered"
        )
    return GoodputPlan(
        noise_scale,
        base_batch,
        world_size,
        tuple(points),
        chosen,
        best_goodput_batch=best.global_batch,
        tied=tuple(p.global_batch for p in tied),
        excluded=excluded,
        max_steps_ratio=max_steps_ratio,
        capped_by_memory=capped,
        rule=rule + ".",
    )


def _best_split(
    curve: SupportsThroughput,
    global_batch: int,
    noise_scale: float,
    base_batch: int,
    max_micro_batch: int,
    world_size: int,
) -> GoodputPoint | None:
    if global_batch % world_size:
        return None
    try:
        split = split_batch(
            global_batch, max_micro_batch=max_micro_batch, world_size=world_size, speed=curve
        )
    except BadInputError:
        return None  # no dividing micro-batch has a known speed
    micro = split.micro_batch
    speed = float(curve.samples_per_second_at(micro))
    samples_per_second = speed * world_size
    efficiency = statistical_efficiency(
        global_batch, noise_scale=noise_scale, base_batch=base_batch
    )
    return GoodputPoint(
        global_batch=global_batch,
        micro_batch=micro,
        accumulation_steps=split.accumulation_steps,
        world_size=world_size,
        samples_per_second=samples_per_second,
        efficiency=efficiency,
        goodput=samples_per_second * efficiency,
        steps_ratio=steps_to_target_ratio(global_batch, noise_scale=noise_scale),
        relative_uncertainty=_uncertainty(curve, micro),
    )


def _uncertainty(curve: SupportsThroughput, micro: int) -> float:
    """The curve's relative standard error at ``micro`` if it states one, else 0 (a plain table
    of speeds carries no uncertainty: its numbers are compared as given)."""
    method = getattr(curve, "relative_uncertainty_at", None)
    if method is None:
        return 0.0
    value = float(method(micro))
    return value if math.isfinite(value) and value >= 0 else 0.0


__all__ = [
    "MAX_STEPS_RATIO",
    "TIE_SIGMAS",
    "GoodputPlan",
    "GoodputPoint",
    "StepsCriticalBatch",
    "critical_batch_from_steps",
    "plan_goodput",
    "predicted_steps",
    "samples_to_target_ratio",
    "statistical_efficiency",
    "steps_to_target_ratio",
]
