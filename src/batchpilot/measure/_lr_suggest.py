"""Learning-rate suggestions read off a range-test curve, apart from any plot.

Every rule takes the learning rates and the *smoothed* loss of one range test and returns a learning
rate, or ``None`` when the curve shows no real descent (a flat or only rising loss): a clear "no
answer" is better than the arg-min of noise.

The rules:

* ``steepest`` — where the smoothed loss falls fastest against **log** lr (the x axis of the plot,
  and the quantity an exponential schedule is uniform in), searched only before the minimum of the
  loss so that the rise towards divergence is never read as descent.
* ``valley`` — fastai's rule: the longest decreasing stretch (longest strictly decreasing
  subsequence) of the smoothed loss, and the point half-way along it.
* ``minimum_over_10`` — the lr at the minimum of the smoothed loss, divided by 10.

Before any rule runs, the first ``skip_begin`` and last ``skip_end`` fractions of the points are
trimmed (the start is dominated by the warm-up of the average, the end by the blow-up), and the
trimmed curve must fall below its first value by at least ``min_drop`` (relative) and by at least
four standard deviations of its noise (see :func:`noise_level`): a noisy flat curve always has a
lowest point, and it means nothing.

>>> import numpy as np
>>> lrs = np.logspace(-4, 0, 41)
>>> loss = 2.0 - np.tanh(np.log10(lrs) + 2.0)     # falls fastest at lr = 1e-2
>>> suggestion = suggest(lrs, loss)
>>> round(suggestion.values["steepest"], 6)
0.01
>>> suggest(lrs, np.full(41, 2.0)).values["steepest"] is None
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from batchpilot.errors import BadInputError
from batchpilot.jsonio import fields_dict

Method = Literal["steepest", "valley", "minimum_over_10"]
METHODS: tuple[Method, ...] = ("steepest", "valley", "minimum_over_10")

# Defaults, documented in docs/lr-find.md.
SKIP_BEGIN = 0.1
SKIP_END = 0.05
MIN_DROP = 0.02
NOISE_MARGIN = 4.0


@dataclass(frozen=True)
class Suggestions:
    """One lr per rule (``None`` where the rule found nothing) and why, when nothing was found."""

    values: dict[str, float | None]
    message: str | None = None
    window: tuple[int, int] = field(default=(0, 0))  # the trimmed points [begin, end) the rules saw

    def to_dict(self) -> dict[str, Any]:
        return fields_dict(self)


def check_method(method: str) -> Method:
    if method not in METHODS:
        raise BadInputError(
            f"method: unknown method {method!r}; expected one of {', '.join(METHODS)}"
        )
    return method


def trim_window(
    points: int, skip_begin: float = SKIP_BEGIN, skip_end: float = SKIP_END
) -> tuple[int, int]:
    """The ``[begin, end)`` indices left after trimming fractions of ``points`` at both ends.

    >>> trim_window(100)
    (10, 95)
    >>> trim_window(5)
    (0, 5)
    """
    for name, value in (("skip_begin", skip_begin), ("skip_end", skip_end)):
        if not (isinstance(value, int | float) and 0.0 <= value < 0.5):
            raise BadInputError(f"{name}: expected a fraction in [0, 0.5), got {value!r}")
    begin = math.floor(skip_begin * points)
    end = points - math.floor(skip_end * points)
    return begin, end


def steepest(lrs: np.ndarray, smoothed: np.ndarray) -> float | None:
    """The lr where ``smoothed`` falls fastest against log lr, before its minimum.

    No trimming happens here; :func:`suggest` trims first.

    >>> lrs = np.logspace(-3, 0, 31)
    >>> round(steepest(lrs, 1.0 - np.tanh(np.log10(lrs) + 1.5)), 6)
    0.031623
    """
    if len(lrs) < 3:
        return None
    stop = int(np.argmin(smoothed)) + 1
    if stop < 2:
        return None
    slope = np.gradient(smoothed[:stop], np.log(lrs[:stop]))
    index = int(np.argmin(slope))
    return float(lrs[index]) if slope[index] < 0 else None


def valley(lrs: np.ndarray, smoothed: np.ndarray) -> float | None:
    """fastai's valley: half-way along the longest strictly decreasing subsequence of the loss.

    >>> lrs = np.logspace(-3, 0, 7)
    >>> valley(lrs, np.array([5.0, 4.0, 3.0, 2.0, 1.0, 9.0, 9.0]))  # descent over points 0..4
    0.01
    """
    n = len(smoothed)
    if n < 2:
        return None
    length = np.ones(n, dtype=int)
    first = np.arange(n)  # where the longest decreasing run ending at i starts
    for i in range(1, n):
        for j in range(i):
            if smoothed[i] < smoothed[j] and length[j] + 1 > length[i]:
                length[i] = length[j] + 1
                first[i] = first[j]
    end = int(np.argmax(length))
    if length[end] < 2:
        return None
    return float(lrs[(int(first[end]) + end) // 2])


def minimum_over_10(lrs: np.ndarray, smoothed: np.ndarray) -> float | None:
    """A tenth of the lr at the minimum of the smoothed loss.

    >>> minimum_over_10(np.array([0.1, 1.0, 10.0]), np.array([3.0, 1.0, 2.0]))
    0.1
    """
    if len(lrs) == 0:
        return None
    return float(lrs[int(np.argmin(smoothed))]) / 10.0


_RULES = {"steepest": steepest, "valley": valley, "minimum_over_10": minimum_over_10}


def suggest(
    lrs: Sequence[float] | np.ndarray,
    smoothed: Sequence[float] | np.ndarray,
    *,
    skip_begin: float = SKIP_BEGIN,
    skip_end: float = SKIP_END,
    min_drop: float = MIN_DROP,
    losses: Sequence[float] | np.ndarray | None = None,
    smoothing: float = 0.0,
) -> Suggestions:
    """Every rule's suggestion for one smoothed range-test curve.

    Returns ``None`` for every rule, with a message, when the trimmed curve does not fall by at
    least ``min_drop`` (a fraction of its first value) and, given the raw ``losses`` that
    ``smoothing`` (β) smoothed, by at least ``NOISE_MARGIN`` standard deviations of the drop's
    noise (:func:`noise_level` of the raw losses up to the smoothed minimum, before any blow-up).
    """
    x = np.asarray(lrs, dtype=float)
    y = np.asarray(smoothed, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise BadInputError(
            f"smoothed: expected as many losses as lrs, got {y.shape} and {x.shape}"
        )
    if np.any(~np.isfinite(x)) or np.any(x <= 0):
        raise BadInputError("lrs: expected positive finite learning rates")
    if not (isinstance(min_drop, int | float) and 0.0 <= min_drop < 1.0):
        raise BadInputError(f"min_drop: expected a fraction in [0, 1), got {min_drop!r}")
    begin, end = trim_window(len(x), skip_begin, skip_end)
    none: dict[str, float | None] = dict.fromkeys(METHODS, None)
    if end - begin < 3:
        return Suggestions(
            none,
            f"no descent found: only {len(x)} points were recorded before the test stopped; "
            "lower the minimum lr or raise the number of steps",
            (begin, end),
        )
    xs, ys = x[begin:end], y[begin:end]
    finite = np.isfinite(ys)
    if not finite.all():  # a run that stopped on a non-finite loss keeps only the points before it
        cut = int(np.argmin(finite))
        xs, ys = xs[:cut], ys[:cut]
        end = begin + cut
    if not (isinstance(smoothing, int | float) and 0.0 <= smoothing < 1.0):
        raise BadInputError(f"smoothing: expected a number in [0, 1), got {smoothing!r}")
    noise = 0.0
    if losses is not None:
        raw = np.asarray(losses, dtype=float)
        if raw.shape != x.shape:
            raise BadInputError(
                f"losses: expected as many losses as lrs, got {raw.shape} and {x.shape}"
            )
        noise = noise_level(raw[: begin + int(np.argmin(ys)) + 1])
    # The drop compares the first trimmed point (an average of begin + 1 losses) with a later one.
    drop_noise = math.hypot(
        smoothed_noise(noise, smoothing, begin + 1), smoothed_noise(noise, smoothing)
    )
    message = _no_descent(xs, ys, min_drop, drop_noise)
    if message is not None:
        return Suggestions(none, message, (begin, end))
    values: dict[str, float | None] = {name: _RULES[name](xs, ys) for name in METHODS}
    return Suggestions(values, None, (begin, end))


def noise_level(losses: Sequence[float] | np.ndarray) -> float:
    """The standard deviation of the noise in raw range-test ``losses``.

    Point-to-point differences cancel the slow trend (their spread is √2 × the noise). A plain
    standard deviation, not a robust one: heavy-tailed batch losses must count fully, or their
    spikes pass for descent; so leave the blow-up at the end out (:func:`suggest` does).

    >>> round(noise_level(np.random.default_rng(0).normal(1.0, 0.1, 2000)), 2)
    0.1
    """
    values = np.asarray(losses, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 3:
        return 0.0
    return float(np.std(np.diff(values))) / math.sqrt(2.0)


def smoothed_noise(noise: float, smoothing: float, points: int | None = None) -> float:
    """The noise left after a debiased moving average with factor ``smoothing`` over ``points``
    raw points of independent noise ``noise`` (``None``: the steady state, many points on).

    The average keeps ``sqrt((1 - β) / (1 + β))`` of the noise in the steady state; its first
    points average fewer losses and keep more, ``× sqrt((1 + β^k) / (1 - β^k))`` after ``k``.

    >>> smoothed_noise(1.0, 0.9, 1)
    1.0
    """
    beta = smoothing
    variance = (1.0 - beta) / (1.0 + beta)
    if points is not None and beta > 0:
        variance *= (1.0 + beta**points) / (1.0 - beta**points)
    return noise * math.sqrt(variance)


def _no_descent(lrs: np.ndarray, smoothed: np.ndarray, min_drop: float, noise: float) -> str | None:
    if len(smoothed) < 3:
        return (
            "no descent found: too few finite points before the loss diverged; lower the minimum lr"
        )
    start, low = float(smoothed[0]), float(np.min(smoothed))
    needed = max(min_drop * abs(start), NOISE_MARGIN * noise)
    if start - low >= needed and start - low > 0:
        return None
    where = f"between lr {lrs[0]:.3g} and {lrs[-1]:.3g}"
    rises = float(smoothed[-1]) > start + needed
    if rises and float(smoothed[len(smoothed) // 4]) > start + needed:
        hint = "the loss only rises: lower the minimum lr"
    elif rises:
        hint = (
            "the loss stays flat, then rises: the model may need more steps to start learning "
            "(raise the number of steps), or a larger batch for a less noisy curve"
        )
    else:
        hint = "the loss stays flat: raise the maximum lr or the number of steps"
    drop = (start - low) / abs(start) if start != 0 else 0.0
    share = needed / abs(start) if start != 0 else needed
    return (
        f"no descent found: the smoothed loss fell by {max(drop, 0.0):.1%} {where}, less than "
        f"the {share:.1%} needed to stand out from its noise; {hint}"
    )


@dataclass(frozen=True)
class Spread:
    """Median and interquartile range of one rule's suggestions over repeats (``None`` if none)."""

    median: float | None
    q1: float | None
    q3: float | None
    count: int

    def to_dict(self) -> dict[str, float | None]:
        return fields_dict(self)


def spread(values: Sequence[float | None]) -> Spread:
    """Median and quartiles of the suggestions that exist.

    >>> spread([0.01, 0.02, None, 0.04]).to_dict()
    {'median': 0.02, 'q1': 0.015, 'q3': 0.03, 'count': 3}
    """
    found = np.array([v for v in values if v is not None], dtype=float)
    if len(found) == 0:
        return Spread(None, None, None, 0)
    q1, median, q3 = np.percentile(found, [25, 50, 75])
    return Spread(float(median), float(q1), float(q3), len(found))


__all__ = [
    "METHODS",
    "MIN_DROP",
    "NOISE_MARGIN",
    "SKIP_BEGIN",
    "SKIP_END",
    "Method",
    "Spread",
    "Suggestions",
    "check_method",
    "minimum_over_10",
    "noise_level",
    "smoothed_noise",
    "spread",
    "steepest",
    "suggest",
    "trim_window",
    "valley",
]
