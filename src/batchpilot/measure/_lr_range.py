"""The learning-rate range test (Smith 2015/2017), done so its answer can be trusted.

The lr grows from ``min_lr`` to ``max_lr`` (exponentially by default) over a fixed number of
optimizer steps at the batch you train with (micro-batch × accumulation steps). Each step gives one
point: the lr of the step and the training loss measured *after* it, on the next batch — the loss
that lr produced (tools that pair a step's lr with the loss measured before it read every point one
lr too high). Losses are per-sample means whatever the task's reduction, gradients are accumulated
exactly as in :func:`batchpilot.training._loop.train`, and every parameter group keeps its ratio to the
first group's lr.

The curve is smoothed by an exponential moving average debiased with the number of points averaged
so far, so the first smoothed point equals the first loss (Lightning divides by ``1 - β^(k+1)`` with
a ``k`` already counting the current point, and its first points read about half the true loss).
The test stops when the smoothed loss exceeds ``divergence_factor`` × its best value, or the loss
is not finite, and keeps the points before that step.

The test is repeated ``repeats`` times with different seeds (model initialisation and data order);
suggestions come from the mean curve (:mod:`batchpilot.measure._lr_suggest`), and the spread of each rule's
suggestion over the repeats says how sure the answer is.

>>> from batchpilot.loading import load_task
>>> result = find_lr(load_task(example="spiral"), micro_batch=10, steps=60, repeats=2)
>>> len(result.runs), result.suggestion, result.message[:17]   # 60 steps are too few here
(2, None, 'no descent found:')
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from batchpilot.checks import (
    MAX_RUN_STEPS,
    check_positive_float,
    check_positive_int,
    check_run_steps,
    check_trainable,
)
from batchpilot.devices import release_memory, resolve_device
from batchpilot.errors import BadInputError
from batchpilot.measure._lr_suggest import (
    METHODS,
    Method,
    Spread,
    check_method,
    spread,
    suggest,
)
from batchpilot.precision import make_scaler, optimizer_step
from batchpilot.state import preserved, preserved_rng
from batchpilot.task import Task
from batchpilot.training._loop import accumulate_gradients, micro_batches, train

Mode = Literal["exponential", "linear"]
MODES: tuple[Mode, ...] = ("exponential", "linear")

# The moving average spans a tenth of the test whatever its length: β = 1 - 10/steps (0.9 for
# 100 steps). Lightning's and fastai's fixed 0.98 averages over half of a 100-step test.
SMOOTHING_WINDOW = 0.1
# The rule behind `suggestion`; chosen by benchmarks/lr_find.py (see docs/lr-find.md).
DEFAULT_METHOD: Method = "minimum_over_10"
MIN_STEPS = 10
# One point per step, all kept: beyond a million the curve alone would not fit in memory.
MAX_STEPS = 1_000_000
# Verification candidates lie on a fixed grid of powers of √2 (so that repeated tests propose the
# same lrs): a ladder of VERIFY_RUNGS powers of 2 below the stability edge plus each rule's
# suggestion rounded to the grid, then the two grid points around the best. The best
# VERIFY_FINALISTS of the first round are re-trained with more seeds (VERIFY_SEEDS in all); the
# leader and the rivals still within reach of it end with VERIFY_FINAL_SEEDS seeds. Chosen with
# benchmarks/lr_find.py (see docs/lr-find.md).
VERIFY_RUNGS = 5
VERIFY_FACTOR = 2.0
VERIFY_SEEDS = 3
VERIFY_FINAL_SEEDS = 7
VERIFY_FINALISTS = 3

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class RangeRun:
    """One range test: its seed, points, and what each rule suggests from it alone."""

    seed: int
    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    smoothed: tuple[float, ...]
    initial_loss: float
    diverged_at: float | None
    suggestions: dict[str, float | None]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "lrs": list(self.lrs),
            "losses": list(self.losses),
            "smoothed": list(self.smoothed),
            "initial_loss": self.initial_loss,
            "diverged_at": self.diverged_at,
            "suggestions": dict(self.suggestions),
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class CandidateCheck:
    """Training runs at one candidate lr, one loss per seed in ``losses``.

    ``loss`` is their median (infinite when a run diverged): one seed that lands badly, or
    luckily, does not decide. ``mean_loss`` is their mean.
    """

    lr: float
    methods: tuple[str, ...]
    loss: float
    metric: float | None
    diverged: bool
    losses: tuple[float, ...] = ()

    @property
    def mean_loss(self) -> float:
        """The mean of ``losses`` (infinite when a run diverged, NaN when there are none)."""
        if self.diverged:
            return math.inf
        return float(np.mean(self.losses)) if self.losses else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "methods": list(self.methods),
            "loss": self.loss,
            "mean_loss": self.mean_loss,
            "metric": self.metric,
            "diverged": self.diverged,
            "losses": list(self.losses),
        }


@dataclass(frozen=True)
class Verification:
    """Which candidate lr reached the lowest loss after ``steps`` steps of real training.

    ``split`` says whether ``loss`` is the final validation loss, or (a task without validation
    data) the mean training loss of the last tenth of the steps. The winner is the lowest median
    loss among the candidates trained with the most seeds (``seed``, ``seed + 1``, …):
    ``seeds`` of them, or ``final_seeds`` after a tie-break round (:func:`verify_ladder`).
    """

    steps: int
    seed: int
    split: str
    candidates: tuple[CandidateCheck, ...]
    best_lr: float | None
    best_methods: tuple[str, ...]
    seeds: int = 1
    final_seeds: int | None = None

    @property
    def runs(self) -> int:
        """Training runs of ``steps`` steps behind the verification."""
        return sum(max(1, len(c.losses)) for c in self.candidates)

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "seed": self.seed,
            "seeds": self.seeds,
            "final_seeds": self.final_seeds,
            "runs": self.runs,
            "split": self.split,
            "candidates": [c.to_dict() for c in self.candidates],
            "best_lr": self.best_lr,
            "best_methods": list(self.best_methods),
        }


@dataclass(frozen=True)
class LRFinderResult:
    """A range test over ``repeats`` seeds, the suggestions from the mean curve, and their spread.

    ``lrs``, ``losses`` (raw, mean over repeats) and ``smoothed`` span the points every repeat
    reached. ``suggestion`` is ``suggestions[method]``; ``None`` with ``message`` saying why when
    the curve shows no descent. With ``verification``, ``suggestion`` is instead the candidate
    that reached the lowest loss in the verification runs (``verification.best_lr``).
    ``spread[rule]`` holds the median and quartiles, in lr, of that rule's suggestions from the
    single repeats.
    """

    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    smoothed: tuple[float, ...]
    suggestion: float | None
    method: str
    suggestions: dict[str, float | None]
    spread: dict[str, dict[str, float | None]]
    message: str | None
    notes: tuple[str, ...]
    runs: tuple[RangeRun, ...]
    micro_batch: int
    accumulation_steps: int
    global_batch: int
    min_lr: float
    max_lr: float
    steps: int
    mode: str
    smoothing: float
    divergence_factor: float
    reduction: str
    diverged_at: float | None
    seconds: float
    verification: Verification | None = None
    precision: str = "32"

    def to_dict(self) -> dict[str, Any]:
        return {
            "lrs": list(self.lrs),
            "losses": list(self.losses),
            "smoothed": list(self.smoothed),
            "suggestion": self.suggestion,
            "method": self.method,
            "suggestions": dict(self.suggestions),
            "spread": {name: dict(value) for name, value in self.spread.items()},
            "message": self.message,
            "notes": list(self.notes),
            "micro_batch": self.micro_batch,
            "accumulation_steps": self.accumulation_steps,
            "global_batch": self.global_batch,
            "min_lr": self.min_lr,
            "max_lr": self.max_lr,
            "steps": self.steps,
            "mode": self.mode,
            "smoothing": self.smoothing,
            "divergence_factor": self.divergence_factor,
            "reduction": self.reduction,
            "precision": self.precision,
            "diverged_at": self.diverged_at,
            "seconds": self.seconds,
            "runs": [run.to_dict() for run in self.runs],
            "verification": None if self.verification is None else self.verification.to_dict(),
        }


def lr_schedule(min_lr: float, max_lr: float, steps: int, mode: str = "exponential") -> np.ndarray:
    """The lr of each optimizer step, from ``min_lr`` to ``max_lr`` inclusive.

    >>> lr_schedule(1e-3, 1e-1, 3).tolist()
    [0.001, 0.01, 0.1]
    >>> lr_schedule(0.1, 0.3, 3, "linear").tolist()
    [0.1, 0.2, 0.3]
    """
    if mode == "exponential":
        return np.asarray(np.geomspace(min_lr, max_lr, steps), dtype=float)
    if mode == "linear":
        return np.asarray(np.linspace(min_lr, max_lr, steps), dtype=float)
    raise BadInputError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")


def default_smoothing(steps: int) -> float:
    """β of the moving average whose window is a tenth of a ``steps``-step test.

    >>> default_smoothing(100), default_smoothing(1000)
    (0.9, 0.99)
    """
    return max(0.0, 1.0 - 1.0 / (SMOOTHING_WINDOW * steps))


def debiased_ema(values: Sequence[float] | np.ndarray, beta: float) -> np.ndarray:
    """Exponential moving average started at zero and divided by ``1 - beta**k`` after ``k`` points.

    The correction makes every point a weighted mean of the values so far, so a constant
    sequence stays constant from its first point:

    >>> debiased_ema([2.0, 2.0, 2.0], 0.9).tolist()
    [2.0, 2.0, 2.0]
    """
    out = np.empty(len(values), dtype=float)
    average = 0.0
    for k, value in enumerate(values, start=1):
        average = beta * average + (1.0 - beta) * float(value)
        out[k - 1] = average / (1.0 - beta**k)
    return out


def find_lr(
    task: Task,
    *,
    micro_batch: int,
    accumulation_steps: int = 1,
    min_lr: float = 1e-6,
    max_lr: float = 10.0,
    steps: int = 100,
    mode: str = "exponential",
    repeats: int = 3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    divergence_factor: float = 4.0,
    smoothing: float | None = None,
    method: str = DEFAULT_METHOD,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    verify_steps: int | None = None,
    verify_seeds: int = VERIFY_SEEDS,
    verify_final_seeds: int = VERIFY_FINAL_SEEDS,
    on_step: ProgressFn | None = None,
) -> LRFinderResult:
    """Run the range test ``repeats`` times and suggest a learning rate.

    By default every repeat builds a fresh model and optimizer from the task (seed ``seed + r``
    for initialisation and data order) and the lr is the one passed to ``task.optimizer``.
    With ``model`` (and optionally ``optimizer``, else one from the task), the test runs on that
    model from its current state, on its device (``device`` is then ignored); the repeats differ
    in data order; the lr is that of the optimizer's first parameter group; and afterwards model,
    optimizer and RNG are restored bitwise from CPU snapshots (:func:`batchpilot.state.preserved`).

    ``verify_steps`` trains fresh models for that many steps at each rule's suggestion and on a
    ladder below the lr where the test diverged, the best with ``verify_seeds`` seeds and the
    closest contenders with ``verify_final_seeds`` (:func:`verify_ladder`); ``suggestion`` is
    then the lr that reached the lowest median loss over seeds (the validation loss, when the
    task has validation data).
    ``smoothing`` is the β of the debiased moving average; by default ``1 - 10/steps``, a
    window of a tenth of the test. ``on_step(done, total)`` is called after every optimizer step.
    """
    check_positive_int("micro_batch", micro_batch)
    check_positive_int("accumulation_steps", accumulation_steps)
    min_lr = check_positive_float("min_lr", min_lr)
    max_lr = check_positive_float("max_lr", max_lr)
    if max_lr <= min_lr:
        raise BadInputError(f"max_lr: expected more than min_lr ({min_lr:g}), got {max_lr:g}")
    check_positive_int("steps", steps)
    if steps < MIN_STEPS:
        raise BadInputError(f"steps: expected at least {MIN_STEPS} optimizer steps, got {steps}")
    if steps > MAX_STEPS:
        raise BadInputError(f"steps: expected at most {MAX_STEPS} optimizer steps, got {steps}")
    if mode not in MODES:
        raise BadInputError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    check_positive_int("repeats", repeats)
    if repeats * steps > MAX_RUN_STEPS:
        raise BadInputError(
            f"repeats: {repeats} repeats of {steps} steps are more than the {MAX_RUN_STEPS:,} "
            "optimizer steps a range test may take"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise BadInputError(f"seed: expected an integer, got {seed!r}")
    if not (isinstance(divergence_factor, int | float) and divergence_factor > 1.0):
        raise BadInputError(
            f"divergence_factor: expected a number above 1, got {divergence_factor!r}"
        )
    if smoothing is None:
        smoothing = default_smoothing(steps)
    if not (isinstance(smoothing, int | float) and 0.0 <= smoothing < 1.0):
        raise BadInputError(f"smoothing: expected a number in [0, 1), got {smoothing!r}")
    chosen = check_method(method)
    if verify_steps is not None:
        check_run_steps("verify_steps", verify_steps)
    check_positive_int("verify_seeds", verify_seeds)
    check_positive_int("verify_final_seeds", verify_final_seeds)
    if micro_batch > task.train_size:
        raise BadInputError(
            f"micro_batch: {micro_batch} is larger than the training set ({task.train_size} samples)"
        )
    if optimizer is not None and model is None:
        raise BadInputError("optimizer: give the model it optimizes too (model=...)")
    if model is not None:
        first = next(iter(model.parameters()), None)
        if first is None:
            raise BadInputError("model: it has no parameters to train")
        run_device = first.device
    else:
        run_device = device if isinstance(device, torch.device) else resolve_device(device)

    schedule = lr_schedule(min_lr, max_lr, steps, mode)
    total = repeats * steps
    start = time.perf_counter()
    runs: list[RangeRun] = []
    for r in range(repeats):

        def progress(done: int, r: int = r) -> None:
            if on_step is not None:
                on_step(r * steps + done, total)

        options = {
            "schedule": schedule,
            "micro_batch": micro_batch,
            "accumulation_steps": accumulation_steps,
            "seed": seed + r,
            "device": run_device,
            "beta": float(smoothing),
            "divergence_factor": float(divergence_factor),
            "progress": progress,
        }
        if model is None:
            runs.append(_fresh_run(task, min_lr=min_lr, **options))  # type: ignore[arg-type]
        else:
            runs.append(_run_on(task, model, optimizer, min_lr=min_lr, **options))  # type: ignore[arg-type]
        if on_step is not None:
            on_step((r + 1) * steps, total)

    points = min(len(run.losses) for run in runs)
    lrs = schedule[:points]
    losses = np.mean([run.losses[:points] for run in runs], axis=0) if points else np.array([])
    smoothed = debiased_ema(losses, smoothing)
    found = suggest(lrs, smoothed, losses=losses, smoothing=smoothing)
    spreads = {name: spread([run.suggestions[name] for run in runs]) for name in METHODS}
    diverged = [run.diverged_at for run in runs if run.diverged_at is not None]
    result = LRFinderResult(
        lrs=tuple(float(x) for x in lrs),
        losses=tuple(float(x) for x in losses),
        smoothed=tuple(float(x) for x in smoothed),
        suggestion=found.values[chosen],
        method=chosen,
        suggestions=dict(found.values),
        spread={name: value.to_dict() for name, value in spreads.items()},
        message=found.message,
        notes=_notes(found.values[chosen], spreads[chosen], runs, max_lr, chosen),
        runs=tuple(runs),
        micro_batch=micro_batch,
        accumulation_steps=accumulation_steps,
        global_batch=micro_batch * accumulation_steps,
        min_lr=min_lr,
        max_lr=max_lr,
        steps=steps,
        mode=mode,
        smoothing=float(smoothing),
        divergence_factor=float(divergence_factor),
        reduction=task.reduction,
        diverged_at=min(diverged) if diverged else None,
        seconds=time.perf_counter() - start,
        precision=task.precision,
    )
    if verify_steps is None:
        return result
    verification = verify_ladder(
        task,
        result,
        micro_batch=micro_batch,
        accumulation_steps=accumulation_steps,
        steps=verify_steps,
        seed=seed,
        seeds=verify_seeds,
        final_seeds=verify_final_seeds,
        device=run_device,
    )
    notes = result.notes
    if verification.best_lr is not None and result.suggestion is None:
        notes = (
            *notes,
            "the range test shows no descent: the lr comes from the verification runs alone",
        )
    return replace(
        result,
        verification=verification,
        suggestion=verification.best_lr,
        notes=notes,
        seconds=time.perf_counter() - start,
    )


def stability_edge(result: LRFinderResult) -> float | None:
    """The lr where training broke down in the range test: the smallest lr at which a repeat
    diverged, else the largest lr every repeat reached (``None`` for an empty curve)."""
    if result.diverged_at is not None:
        return result.diverged_at
    return result.lrs[-1] if result.lrs else None


def _grid_exponent(lr: float, factor: float) -> float:
    return math.log(lr) / math.log(factor)


def verification_candidates(
    result: LRFinderResult, *, rungs: int = VERIFY_RUNGS, factor: float = VERIFY_FACTOR
) -> dict[str, float]:
    """Name → lr of the first verification round, on the grid of powers of ``√factor``.

    The ladder: the ``rungs`` largest powers of ``factor`` at least ``√factor`` below the
    :func:`stability_edge` (named ``"edge/8"`` and so on, by how far below the edge they are, to
    the nearest power of ``√factor``). The rules: each suggestion rounded to the nearest grid point.
    The rules read the curve; the ladder covers the stable range below the edge, where the best
    lr for a real training budget usually lies (often above what the rules read off a short
    test), also when the curve shows no descent at all. A fixed grid makes repeated tests, whose
    edges differ a little, propose the same lrs.
    """
    check_positive_int("rungs", rungs)
    if not (isinstance(factor, int | float) and factor > 1.0):
        raise BadInputError(f"factor: expected a number above 1, got {factor!r}")
    named: dict[float, list[str]] = {}
    for name, lr in result.suggestions.items():
        if lr is not None:
            snapped = factor ** (round(2 * _grid_exponent(lr, factor)) / 2)
            named.setdefault(snapped, []).append(name)
    edge = stability_edge(result)
    if edge is not None:
        top = math.floor(_grid_exponent(edge, factor) - 0.5 + 1e-9)
        for k in range(top, top - rungs, -1):
            lr = factor**k
            if lr < result.min_lr:
                break
            below = factor ** (round(2 * _grid_exponent(edge / lr, factor)) / 2)
            named.setdefault(lr, []).append(f"edge/{below:.3g}")
    return {" & ".join(names): lr for lr, names in named.items()}


def verify_ladder(
    task: Task,
    result: LRFinderResult,
    *,
    micro_batch: int,
    accumulation_steps: int = 1,
    steps: int,
    seed: int = 0,
    seeds: int = VERIFY_SEEDS,
    final_seeds: int = VERIFY_FINAL_SEEDS,
    finalists: int = VERIFY_FINALISTS,
    device: torch.device | str = "cpu",
    rungs: int = VERIFY_RUNGS,
    factor: float = VERIFY_FACTOR,
) -> Verification:
    """Find the lr that trains best for ``steps`` steps, starting from the range test's result.

    1. Train every :func:`verification_candidates` lr once (seed ``seed``).
    2. Train the ``finalists`` best of them with seeds ``seed + 1`` … ``seed + seeds − 1`` too (one
       seed's ranking in a narrow valley is noisy).
    3. Train the two grid points around the leader (``best·√factor``, ``best/√factor``, when
       below the stability edge) with all ``seeds`` seeds.
    4. Tie-break: the leader and up to ``finalists − 1`` rivals still within reach of it (a rival
       whose median loss is below the leader's worst seed) are trained up to ``final_seeds``
       seeds. Skipped when no rival is within reach, or when ``final_seeds <= seeds``.

    Each candidate is scored by the median of its losses over seeds (a diverged run disqualifies
    it): training outcomes near the best lr are skewed, a rare seed gets stuck or lands far
    below the rest, and the mean of a few seeds follows that seed. The winner is the lowest
    median among the candidates trained with the most seeds: about
    ``rungs + 3 + (finalists + 2)·(seeds − 1) + 2`` runs before the tie-break (17 by default), and
    up to ``finalists·(final_seeds − seeds)`` in it (12 by default).
    """
    check_positive_int("steps", steps)
    check_positive_int("seeds", seeds)
    check_positive_int("final_seeds", final_seeds)
    check_positive_int("finalists", finalists)

    def verify(candidates: Mapping[str, float], first_seed: int, count: int) -> Verification:
        return verify_suggestions(
            task,
            candidates,
            micro_batch=micro_batch,
            accumulation_steps=accumulation_steps,
            steps=steps,
            seed=first_seed,
            seeds=count,
            device=device,
        )

    def add_seeds(check: CandidateCheck, total: int) -> CandidateCheck:
        return _more_seeds(
            task,
            check,
            list(range(seed + len(check.losses), seed + total)),
            micro_batch=micro_batch,
            accumulation_steps=accumulation_steps,
            steps=steps,
            device=device,
        )

    def ranked(count: int) -> list[CandidateCheck]:
        """Candidates trained with at least ``count`` seeds that never diverged, best first."""
        done = (c for c in checks.values() if len(c.losses) >= count and not c.diverged)
        return sorted(done, key=lambda c: (c.loss, c.lr))

    first = verify(verification_candidates(result, rungs=rungs, factor=factor), seed, 1)
    checks = {c.lr: c for c in first.candidates}
    for check in ranked(1)[:finalists]:
        checks[check.lr] = add_seeds(check, seeds)
    edge = stability_edge(result)
    leaders = ranked(seeds)
    if leaders:
        step = math.sqrt(factor)
        around = {
            f"refine ×{step:.3g}": leaders[0].lr * step,
            f"refine ÷{step:.3g}": leaders[0].lr / step,
        }
        fresh = {
            name: lr
            for name, lr in around.items()
            if (edge is None or lr < edge)
            and lr >= result.min_lr
            and all(abs(math.log(lr / other)) > 0.05 for other in checks)
        }
        if fresh:
            refined = verify(fresh, seed, seeds)
            checks.update({c.lr: c for c in refined.candidates})
    leaders = ranked(seeds)
    tie_break = None
    if leaders and final_seeds > seeds:
        leader = leaders[0]
        reach = max(leader.losses)
        rivals = [c for c in leaders[1:finalists] if c.loss < reach]
        if rivals:
            tie_break = final_seeds
            for check in (leader, *rivals):
                checks[check.lr] = add_seeds(check, final_seeds)
    done = [c for c in checks.values() if len(c.losses) >= seeds and not c.diverged]
    best = min(done, key=lambda c: (-len(c.losses), c.loss, c.lr), default=None)
    return Verification(
        steps=steps,
        seed=seed,
        split=first.split,
        candidates=tuple(sorted(checks.values(), key=lambda c: c.lr)),
        best_lr=None if best is None else best.lr,
        best_methods=() if best is None else best.methods,
        seeds=seeds,
        final_seeds=tie_break,
    )


def verify_suggestions(
    task: Task,
    suggestions: Mapping[str, float | None],
    *,
    micro_batch: int,
    accumulation_steps: int = 1,
    steps: int,
    seed: int = 0,
    seeds: int = 1,
    device: torch.device | str = "cpu",
) -> Verification:
    """Train a fresh model for ``steps`` steps at each distinct suggested lr, with seeds ``seed``
    … ``seed + seeds − 1``; the lowest median loss wins.

    With each seed every candidate trains from the same initialisation and data order, so only
    the lr differs. The loss is the final validation loss, or the mean training loss over the last
    tenth of the steps when the task has no validation data; a diverged run scores infinity.
    """
    check_positive_int("steps", steps)
    check_positive_int("seeds", seeds)
    by_lr: dict[float, list[str]] = {}
    for name, lr in suggestions.items():
        if lr is not None:
            by_lr.setdefault(float(lr), []).append(name)
    checks = [
        _more_seeds(
            task,
            CandidateCheck(lr, tuple(names), math.nan, None, False, ()),
            list(range(seed, seed + seeds)),
            micro_batch=micro_batch,
            accumulation_steps=accumulation_steps,
            steps=steps,
            device=device,
        )
        for lr, names in sorted(by_lr.items())
    ]
    finite = [c for c in checks if math.isfinite(c.loss)]
    best = min(finite, key=lambda c: (c.loss, c.lr)) if finite else None
    return Verification(
        steps=steps,
        seed=seed,
        split="val" if task.val_data is not None else "train",
        candidates=tuple(checks),
        best_lr=None if best is None else best.lr,
        best_methods=() if best is None else best.methods,
        seeds=seeds,
    )


def _more_seeds(
    task: Task,
    check: CandidateCheck,
    seeds: Sequence[int],
    *,
    micro_batch: int,
    accumulation_steps: int,
    steps: int,
    device: torch.device | str,
) -> CandidateCheck:
    """``check`` with a training run per seed in ``seeds`` added to its losses."""
    losses = list(check.losses)
    metrics = [] if check.metric is None else [check.metric] * len(losses)
    diverged = check.diverged
    for seed in seeds:
        run = train(
            task,
            micro_batch=micro_batch,
            accumulation_steps=accumulation_steps,
            lr=check.lr,
            steps=steps,
            seed=seed,
            device=device,
        )
        final = run.final
        if run.diverged:
            loss: float = math.inf
        elif final is not None:
            loss = final.loss
            if final.metric is not None:
                metrics.append(final.metric)
        else:
            tail = run.train_losses[-max(1, len(run.train_losses) // 10) :]
            loss = float(np.mean(tail))
        if not math.isfinite(loss):
            loss = math.inf
        diverged = diverged or run.diverged or loss == math.inf
        losses.append(loss)
    median = math.inf if diverged else float(np.median(losses))
    metric = float(np.median(metrics)) if metrics else None
    return replace(check, loss=median, metric=metric, diverged=diverged, losses=tuple(losses))


def _fresh_run(
    task: Task, *, min_lr: float, seed: int, device: torch.device, **options: Any
) -> RangeRun:
    with preserved_rng():
        torch.manual_seed(seed)
        model = task.make_model(device)
        check_trainable(model)
        optimizer = task.make_optimizer(model.parameters(), min_lr)
        try:
            # The factory's lr is min_lr: each group's ratio to it is kept all along the test.
            ratios = [_group_lr(group) / min_lr for group in optimizer.param_groups]
            return _range_run(task, model, optimizer, ratios, seed=seed, device=device, **options)
        finally:
            del model, optimizer
            release_memory(device)


def _run_on(
    task: Task,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    min_lr: float,
    seed: int,
    device: torch.device,
    **options: Any,
) -> RangeRun:
    with preserved(model, optimizer):
        torch.manual_seed(seed)  # dropout draws; restored on exit with every other RNG stream
        opt = task.make_optimizer(model.parameters(), min_lr) if optimizer is None else optimizer
        # The lr is the first group's (for a factory-made optimizer: the factory's lr).
        reference = min_lr if optimizer is None else _group_lr(opt.param_groups[0])
        if reference <= 0:
            raise BadInputError(
                f"optimizer: the first parameter group's lr must be positive, got {reference!r}"
            )
        ratios = [_group_lr(group) / reference for group in opt.param_groups]
        try:
            return _range_run(task, model, opt, ratios, seed=seed, device=device, **options)
        finally:
            del opt
            release_memory(device)


def _range_run(
    task: Task,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ratios: list[float],
    *,
    schedule: np.ndarray,
    micro_batch: int,
    accumulation_steps: int,
    seed: int,
    device: torch.device,
    beta: float,
    divergence_factor: float,
    progress: Callable[[int], None],
) -> RangeRun:
    start = time.perf_counter()
    source = micro_batches(task, micro_batch, seed=seed)
    # "16-mixed": the loss is scaled and the gradients unscaled before each step, as in training
    scaler = make_scaler(task.precision, device)

    def forward_backward() -> float:
        model.zero_grad(set_to_none=True)
        optimizer.zero_grad(set_to_none=True)
        batches = [next(source) for _ in range(accumulation_steps)]
        return accumulate_gradients(task, model, batches, device=device, scaler=scaler)

    model.train()
    initial = forward_backward()
    if not math.isfinite(initial):
        raise BadInputError(
            f"Task.loss(model, batch): the loss before the first step is {initial}, not finite"
        )
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    average, best = 0.0, math.inf
    diverged_at: float | None = None
    for step, lr in enumerate(schedule):
        for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
            _set_group_lr(group, float(lr) * ratio)
        optimizer_step(optimizer, scaler)
        # The loss after this step (on the next batch) is the point for this step's lr; its
        # gradients drive the next step.
        loss = forward_backward()
        progress(step + 1)
        if not math.isfinite(loss):
            diverged_at = float(lr)
            break
        average = beta * average + (1.0 - beta) * loss
        value = average / (1.0 - beta ** (len(losses) + 1))
        if best > 0 and value > divergence_factor * best:
            diverged_at = float(lr)
            break
        best = min(best, value)
        lrs.append(float(lr))
        losses.append(loss)
        smoothed.append(value)
    model.zero_grad(set_to_none=True)
    found = suggest(lrs, smoothed, losses=losses, smoothing=beta) if lrs else None
    return RangeRun(
        seed=seed,
        lrs=tuple(lrs),
        losses=tuple(losses),
        smoothed=tuple(smoothed),
        initial_loss=initial,
        diverged_at=diverged_at,
        suggestions=dict(found.values) if found else dict.fromkeys(METHODS, None),
        seconds=time.perf_counter() - start,
    )


def _group_lr(group: dict[str, Any]) -> float:
    lr = group["lr"]
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)


def _set_group_lr(group: dict[str, Any], lr: float) -> None:
    # A tensor lr (capturable / fused optimizers) is updated in place so captured graphs see it.
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def _notes(
    suggestion: float | None,
    spread_: Spread,
    runs: Sequence[RangeRun],
    max_lr: float,
    method: str,
) -> tuple[str, ...]:
    notes: list[str] = []
    if all(run.diverged_at is None for run in runs):
        notes.append(
            f"the loss did not diverge up to max_lr {max_lr:g}: the curve may not show the "
            "whole descent; raise max_lr to see where training breaks down"
        )
    if (
        suggestion is not None
        and spread_.q1 is not None
        and spread_.q3 is not None
        and spread_.q1 > 0
        and spread_.q3 / spread_.q1 > 3.0
    ):
        notes.append(
            f"the {method} suggestion varies by ×{spread_.q3 / spread_.q1:.1f} (q3/q1) between "
            "repeats: add repeats or use a larger batch before trusting one value"
        )
    return tuple(notes)


__all__ = [
    "DEFAULT_METHOD",
    "MODES",
    "SMOOTHING_WINDOW",
    "VERIFY_FACTOR",
    "VERIFY_FINALISTS",
    "VERIFY_RUNGS",
    "VERIFY_SEEDS",
    "CandidateCheck",
    "LRFinderResult",
    "RangeRun",
    "Verification",
    "debiased_ema",
    "default_smoothing",
    "find_lr",
    "lr_schedule",
    "stability_edge",
    "verification_candidates",
    "verify_ladder",
    "verify_suggestions",
]
