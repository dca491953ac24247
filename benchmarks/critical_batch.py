"""Critical batch: batchpilot's noise-scale estimate against steps-to-target measured over a ladder.

For each built-in example this script

1. measures the steps a fresh model needs to bring its training loss to a target, at every batch
   of a ladder, with the learning rate re-tuned per batch by a small grid (×2 steps around
   ``ref_lr·√(B/ref_batch)``, widened while the best lr sits at an edge);
2. fits ``S = S_min (1 + B_crit / B)`` to those points (least squares on relative error);
3. runs :func:`batchpilot.measure._noise.measure_noise_scale` once, at one batch of the ladder with that
   batch's tuned lr, for as many steps as that batch needed to reach the target, and reports its
   estimate of the run's critical batch beside the fit (goal: within a factor of 3);
4. times training steps without the estimator, with it observing the step and with it passing
   the step through (in turn on one model), and counts the steps the default estimator
   (``max_overhead=0.03``) observes in a run of its own: the overhead of the default is that
   share of observed steps plus the rest passed through (goal: ≤ 5% on CPU).

Run: ``.venv/bin/python benchmarks/critical_batch.py`` (about 5–10 minutes on 2 loaded CPU cores);
``--examples spiral`` for one; ``--plot docs/img/critical_batch.png`` to draw the curves.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from batchpilot.loading import load_task
from batchpilot.measure._noise import GradientNoiseScale, NoiseScaleResult, measure_noise_scale
from batchpilot.state import preserved_rng
from batchpilot.task import Task
from batchpilot.training._loop import accumulate_gradients, evaluate, micro_batches

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Setup:
    """How one example is measured."""

    example: str
    ladder: tuple[int, ...]
    measure_batch: int
    target_loss: float
    max_steps: int
    eval_samples: int | None  # a fixed subset of the training set for the target check


SETUPS = {
    "digits": Setup("digits", (8, 16, 32, 64, 128, 256, 512), 64, 0.1, 1500, 256),
    "spiral": Setup("spiral", (4, 8, 16, 32, 64, 128), 32, 0.4, 8000, None),
    "xor4": Setup("xor4", (1, 2, 4, 8, 16), 8, 0.2, 6000, None),
}


# --------------------------------------------------------------------------- steps to target


def _target_task(task: Task, eval_samples: int | None) -> Task:
    """The task whose 'val' split is the (subset of the) training set the target is checked on."""
    if eval_samples is None or eval_samples >= task.train_size:
        subset = task.train_data
    else:
        order = torch.randperm(task.train_size, generator=torch.Generator().manual_seed(1))
        subset = Subset(task.train_data, order[:eval_samples].tolist())
    return dataclasses.replace(task, val_data=subset)


def steps_to_target(
    task: Task, *, batch: int, lr: float, target: float, max_steps: int, seed: int = 0
) -> float:
    """Optimizer steps until the training loss (eval mode) first reaches ``target``; inf if not
    within ``max_steps`` or if the run diverges.

    The loss is checked at every step up to 10, then every ~5% of the steps so far, and only
    once a moving average of the batch losses is within 2× of the target (a free pre-filter).
    """
    with preserved_rng():
        torch.manual_seed(seed)
        model = task.make_model(CPU)
        model.train()
        optimizer = task.make_optimizer(model.parameters(), lr)
        source = micro_batches(task, batch, seed=seed)
        smoothed, weight, first_loss = 0.0, 0.0, None
        next_check = 1
        for step in range(1, max_steps + 1):
            optimizer.zero_grad(set_to_none=True)
            loss = accumulate_gradients(task, model, [next(source)], device=CPU)
            if first_loss is None:
                first_loss = loss
            if not math.isfinite(loss) or loss > 4 * first_loss + 1.0:
                return math.inf
            optimizer.step()
            smoothed, weight = 0.9 * smoothed + 0.1 * loss, 0.9 * weight + 0.1
            if step >= next_check and smoothed / weight <= 2 * target:
                if evaluate(task, model, device=CPU).loss <= target:
                    return float(step)
                next_check = step + max(1, step // 20)
    return math.inf


@dataclass(frozen=True)
class LadderPoint:
    batch: int
    steps: float
    lr: float
    tried: tuple[tuple[float, float], ...]  # (lr, steps) of every grid point run


def tune_batch(task: Task, setup: Setup, batch: int, *, seed: int) -> LadderPoint:
    """Fewest steps to target over a small lr grid at ``batch``.

    Runs that can no longer beat the best one so far are cut at 1.5× its steps (they cannot win).
    """
    assert task.reference_lr is not None and task.reference_batch is not None
    center = task.reference_lr * math.sqrt(batch / task.reference_batch)
    results: dict[int, float] = {}  # grid index (lr = center · 2^i) -> steps

    def run(index: int) -> None:
        best = min(results.values(), default=math.inf)
        cap = setup.max_steps if math.isinf(best) else min(setup.max_steps, math.ceil(1.5 * best))
        results[index] = steps_to_target(
            task, batch=batch, lr=center * 2.0**index, target=setup.target_loss,
            max_steps=cap, seed=seed,
        )  # fmt: skip

    for index in (0, 1, -1):
        run(index)
    while len(results) < 7:
        best_index = min(results, key=lambda i: (results[i], -i))
        if math.isinf(results[best_index]):
            step = max(results) + 1 if max(results) < 3 else min(results) - 1
        elif best_index == max(results):
            step = best_index + 1
        elif best_index == min(results):
            step = best_index - 1
        else:
            break
        if step in results:
            break
        run(step)
    best_index = min(results, key=lambda i: (results[i], -i))
    tried = tuple(sorted((center * 2.0**i, s) for i, s in results.items()))
    return LadderPoint(batch, results[best_index], center * 2.0**best_index, tried)


@dataclass(frozen=True)
class Fit:
    min_steps: float
    critical_batch: float
    max_relative_error: float


def fit_steps(batches: list[int], steps: list[float], *, dataset_size: int | None = None) -> Fit:
    """Least squares of ``S = S_min + S_min·B_crit / B`` on relative errors (rows divided by S).

    With ``dataset_size`` N, ``1/B`` becomes ``(N − B)/(B (N − 1))``: the gradient noise of a batch
    drawn without replacement, which vanishes at the full dataset.
    """
    pairs = [(b, s) for b, s in zip(batches, steps, strict=True) if math.isfinite(s)]
    if len(pairs) < 2:
        return Fit(math.nan, math.nan, math.nan)
    b = np.array([p[0] for p in pairs], dtype=float)
    s = np.array([p[1] for p in pairs], dtype=float)
    inverse = 1.0 / b if dataset_size is None else (dataset_size - b) / (b * (dataset_size - 1))
    design = np.stack([np.ones_like(b), inverse], axis=1) / s[:, None]
    (intercept, slope), *_ = np.linalg.lstsq(design, np.ones_like(s), rcond=None)
    if intercept <= 0:  # steps still fall as 1/B at the largest batch: B_crit beyond the ladder
        return Fit(math.nan, math.inf, math.nan)
    critical = max(slope / intercept, 0.0)
    predicted = intercept * (1 + critical * inverse)
    return Fit(float(intercept), float(critical), float(np.max(np.abs(predicted / s - 1))))


# ------------------------------------------------------------------------------- overhead


def step_overhead(
    task: Task, batch: int, *, steps: int, micro_batches_per_step: int = 4
) -> dict[str, float]:
    """CPU seconds per training step without the estimator, with it observing the step, and with
    it passing the step through; and the share of steps the default estimator observes.

    One model takes its steps in a rotation of four, so drifting machine speed hits all alike
    (blocks of steps were tried and swing by ±10% between identical blocks on this shared
    machine): a step observed by an estimator that observes every step (``max_overhead=None``);
    a step without an estimator right after it, which absorbs what the observed step leaves
    behind (freed copies, cold caches); a clean step without an estimator (the baseline); a step
    passed through by an estimator that observes nothing after its first step. An observed step
    costs ``(observed − clean) + (after − clean)``; a passed step (an attribute check per call,
    no tensor work) costs the CPU time of its calls, timed over many passed steps in a row: the
    rotation cannot resolve it (its noise is ±1-2% of a step). A budgeted
    estimator decides from its own clock which steps to observe, so it cannot take part in the
    rotation; its overhead is the share ``f`` of steps it observes in a continuous run of its
    own times the cost of an observed step, plus ``1 − f`` times the cost of a passed step.
    """
    assert task.reference_lr is not None
    micro = batch // micro_batches_per_step
    kinds = ("observed", "after", "without", "passed")
    cpu: dict[str, list[float]] = {kind: [] for kind in kinds}
    wall: dict[str, list[float]] = {kind: [] for kind in kinds}
    inside: list[float] = []  # CPU time in the estimator's own calls, per observed step
    with preserved_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = task.make_model(CPU)
        optimizer = task.make_optimizer(model.parameters(), task.reference_lr * 0.01)
        estimators = {
            "after": None,
            "without": None,
            "observed": GradientNoiseScale(model, reduction=task.reduction, max_overhead=None),
            "passed": GradientNoiseScale(
                model, reduction=task.reduction, every=10**9, max_overhead=None
            ),
        }
        source = micro_batches(task, micro, seed=0)
        parts = [next(source) for _ in range(64 * micro_batches_per_step)]

        def one_step(step: int, noise: GradientNoiseScale | None, timed: bool) -> float:
            spent = 0.0
            optimizer.zero_grad(set_to_none=True)
            for k in range(micro_batches_per_step):
                part = parts[(step * micro_batches_per_step + k) % len(parts)]
                loss = task.compute_loss(model, part)
                (loss / micro_batches_per_step).backward()
                if noise is not None:
                    before = time.thread_time() if timed else 0.0
                    noise.record_micro_batch(micro)
                    spent += time.thread_time() - before if timed else 0.0
            if noise is not None:
                before = time.thread_time() if timed else 0.0
                noise.finish_step()
                spent += time.thread_time() - before if timed else 0.0
            optimizer.step()
            return spent

        for step in range(4 * steps + 40):
            kind = kinds[step % 4]
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            spent = one_step(step, estimators[kind], timed=kind == "observed")
            if step >= 40:
                cpu[kind].append(time.process_time() - start_cpu)
                wall[kind].append(time.perf_counter() - start_wall)
                if kind == "observed":
                    inside.append(spent)
        # A passed step's calls, timed over many steps in a row (timing each call would cost more
        # than the call).
        passing = estimators["passed"]
        assert passing is not None
        repeats = 20_000
        start_cpu = time.process_time()
        for _ in range(repeats):
            for _ in range(micro_batches_per_step):
                passing.record_micro_batch(micro)
            passing.finish_step()
        passed_calls = (time.process_time() - start_cpu) / repeats
        # The default estimator alone, in a continuous run: which share of the steps it observes.
        budgeted = GradientNoiseScale(model, reduction=task.reduction)
        for step in range(3 * steps):
            one_step(step, budgeted, timed=False)
        observed = budgeted.steps / (3 * steps)
    # process_time ticks coarsely on some systems: compare means of CPU time, medians of wall.
    result = {f"cpu_{kind}": statistics.fmean(cpu[kind]) for kind in kinds}
    result |= {f"wall_{kind}": statistics.median(wall[kind]) for kind in kinds}
    result["inside"] = statistics.fmean(inside)
    result["inside_passed"] = passed_calls
    result["observed_share"] = observed
    return result


# ---------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class ExampleResult:
    setup: Setup
    points: tuple[LadderPoint, ...]
    fit: Fit
    finite_fit: Fit
    noise: NoiseScaleResult | None
    seconds: float
    train_size: int


def run_example(setup: Setup, *, seed: int, log: Callable[[str], None]) -> ExampleResult:
    start = time.perf_counter()
    task = _target_task(load_task(example=setup.example), setup.eval_samples)
    points = []
    for batch in setup.ladder:
        point = tune_batch(task, setup, batch, seed=seed)
        grid = ", ".join(f"{lr:.3g}:{'—' if math.isinf(s) else int(s)}" for lr, s in point.tried)
        log(
            f"  {setup.example} batch {batch:4d}: {point.steps:6.0f} steps at lr {point.lr:.3g}  [{grid}]"
        )
        points.append(point)
    fit = fit_steps([p.batch for p in points], [p.steps for p in points])
    finite_fit = fit_steps(
        [p.batch for p in points], [p.steps for p in points], dataset_size=task.train_size
    )
    at_measure = next(p for p in points if p.batch == setup.measure_batch)
    noise = None
    if math.isfinite(at_measure.steps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            noise = measure_noise_scale(
                task, batch=setup.measure_batch, steps=int(at_measure.steps), lr=at_measure.lr,
                micro_batches=4, seed=seed,
            )  # fmt: skip
    return ExampleResult(
        setup, tuple(points), fit, finite_fit, noise, time.perf_counter() - start, task.train_size
    )


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if math.isinf(value):
        return "∞"
    return f"{value:.{digits}g}"


def print_tables(results: list[ExampleResult], overheads: dict[str, dict[str, float]]) -> None:
    print()
    print("Steps to the target training loss, lr re-tuned per batch, and the fits")
    print()
    for result in results:
        setup = result.setup
        cells = {
            "batch": [str(p.batch) for p in result.points],
            "steps": [_fmt(p.steps, 4) for p in result.points],
            "best lr": [_fmt(p.lr, 2) for p in result.points],
            "fit": [_predict(result.fit, p.batch, None) for p in result.points],
        }
        print(
            f"{setup.example} (training loss ≤ {setup.target_loss}, {result.train_size} samples):"
        )
        for index, (name, row) in enumerate(cells.items()):
            print(f"| {name} | {' | '.join(row)} |")
            if index == 0:
                print("|---" * (len(row) + 1) + "|")
        print()
    print("batchpilot's estimate of the run's critical batch beside the fitted B_crit")
    print()
    print(
        "| example | N | law | fitted B_crit (max err) | estimate | ratio | within 3× "
        "| noise scale at target [95% interval] |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        fit, finite, noise = result.fit, result.finite_fit, result.noise
        n = result.train_size
        # The estimator corrects for batches drawn without replacement, so its critical batch
        # (critical_batch_over_run with dataset_size) belongs to the finite-data law; written in
        # the 1/B law's terms it is B' N / (N − 1 − B') (the two laws are affine in each other).
        estimate = noise.critical_batch if noise else math.nan
        rows = [
            ("S_min(1 + B_crit/B)", fit, as_one_over_b_law(estimate, n)),
            ("S_N(1 + B_crit (N−B)/(B(N−1)))", finite, estimate),
        ]
        end = (
            f"{_fmt(noise.noise_scale)} [{_fmt(noise.noise_scale_interval[0])}, "
            f"{_fmt(noise.noise_scale_interval[1])}]"
            if noise
            else "—"
        )
        for index, (law, fitted, value) in enumerate(rows):
            ratio = _ratio(value, fitted.critical_batch)
            within = "—" if not math.isfinite(ratio) else ("yes" if 1 / 3 <= ratio <= 3 else "no")
            print(
                f"| {result.setup.example if index == 0 else ''} | {n if index == 0 else ''} "
                f"| {law} | {_fmt(fitted.critical_batch)} "
                f"({_fmt(100 * fitted.max_relative_error, 2)}%) | {_fmt(value)} "
                f"| {_fmt(ratio, 2)} | {within} | {end if index == 0 else ''} |"
            )
    print()
    print(
        "estimate: NoiseScaleResult.critical_batch (progress-weighted mean of the noise scale over "
        "the run, with the finite-population correction for the N training samples) of "
        "measure_noise_scale at one batch of the ladder, its best lr, for the steps that batch "
        "needed; in the 1/B law's terms B' N/(N − 1 − B'). The finite-data law replaces 1/B by "
        "(N − B)/(B(N − 1)), the noise of a batch drawn without replacement from N samples"
    )
    for result in results:
        if result.noise is not None:
            print(
                f"  {result.setup.example}: measured at batch {result.setup.measure_batch} "
                f"({result.noise.micro_batches} × {result.noise.micro_batch}), lr "
                f"{result.noise.lr:.3g}, {result.noise.steps} steps, {result.noise.seconds:.1f} s"
            )
    print()
    print(
        "Estimator step-time overhead (4 micro-batches per step; steps taken in turn: observed, "
        "the step after it, a clean step without an estimator, passed through; CPU time of this "
        "process)"
    )
    print()
    print(
        "| example | batch | CPU ms/step without | observed step (with the next) "
        "| in the estimator's calls "
        "| passed step (its calls) | default max_overhead=0.03: steps observed | overhead "
        "| goal ≤ 5% |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, times in overheads.items():
        base = times["cpu_without"]
        observed_cost = (times["cpu_observed"] + times["cpu_after"]) / base - 2
        passed_cost = times["inside_passed"] / base
        share = times["observed_share"]
        default = share * observed_cost + (1 - share) * passed_cost
        print(
            f"| {name} | {SETUPS[name].measure_batch} | {1e3 * base:.3f} "
            f"| {100 * observed_cost:+.1f}% | {1e3 * times['inside']:.3f} ms "
            f"= {100 * times['inside'] / base:.1f}% | {1e6 * times['inside_passed']:.1f} µs "
            f"= {100 * passed_cost:.2f}% "
            f"| {100 * share:.0f}% | {100 * default:+.1f}% | {'yes' if default <= 0.05 else 'no'} |"
        )
    print()
    print(
        "overhead = steps observed × observed step + the rest × passed step. Wall ms/step "
        "(medians): "
        + "; ".join(
            f"{name} {1e3 * t['wall_without']:.3f} / {1e3 * t['wall_observed']:.3f} / "
            f"{1e3 * t['wall_after']:.3f} / {1e3 * t['wall_passed']:.3f}"
            for name, t in overheads.items()
        )
        + " (clean / observed / after / passed)"
    )


def as_one_over_b_law(critical: float, dataset_size: int) -> float:
    """A critical batch of the finite-data law written as the ``B_crit`` of ``S_min(1 + B_crit/B)``.

    ``(N − B)/(B(N − 1)) = N/((N − 1) B) − 1/(N − 1)``, so ``S_N(1 + B' (N − B)/(B(N − 1)))`` is
    ``S_min(1 + B_crit/B)`` with ``S_min = S_N(1 − B'/(N − 1))`` and ``B_crit = B' N/(N − 1 − B')``
    (infinite when ``B' ≥ N − 1``: no 1/B law fits it).
    """
    if not math.isfinite(critical):
        return critical
    if critical >= dataset_size - 1:
        return math.inf
    return critical * dataset_size / (dataset_size - 1 - critical)


def _ratio(estimate: float, fitted: float) -> float:
    if not (math.isfinite(estimate) and math.isfinite(fitted)) or fitted <= 0:
        return math.nan
    return estimate / fitted


def _predict(fit: Fit, batch: int, dataset_size: int | None) -> str:
    if not math.isfinite(fit.critical_batch):
        return "—"
    inverse = (
        1 / batch if dataset_size is None else (dataset_size - batch) / (batch * (dataset_size - 1))
    )
    return _fmt(fit.min_steps * (1 + fit.critical_batch * inverse), 4)


def plot(results: list[ExampleResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        batches = [p.batch for p in result.points if math.isfinite(p.steps)]
        steps = [p.steps for p in result.points if math.isfinite(p.steps)]
        ax.loglog(batches, steps, "o", label="measured (best lr)")
        fit = result.fit
        if math.isfinite(fit.critical_batch) and batches:
            grid = np.geomspace(min(batches) / 1.5, max(batches) * 1.5, 100)
            ax.loglog(grid, fit.min_steps * (1 + fit.critical_batch / grid), "-", label="fit")
            ax.axvline(
                fit.critical_batch,
                color="C1",
                ls=":",
                label=f"fitted B_crit {fit.critical_batch:.3g}",
            )
        estimate = (
            as_one_over_b_law(result.noise.critical_batch, result.train_size)
            if result.noise is not None
            else math.nan
        )
        if math.isfinite(estimate):
            ax.axvline(
                estimate, color="C2", ls="--",
                label=f"noise-scale estimate {estimate:.3g}",
            )  # fmt: skip
        ax.set_title(f"{result.setup.example}: loss ≤ {result.setup.target_loss}")
        ax.set_xlabel("batch")
        ax.set_ylabel("steps to target")
        ax.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overhead-steps", type=int, default=300)
    parser.add_argument("--plot", type=Path, default=None, help="write the curves as a PNG here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPU cores, 1 intra-op thread, "
        f"load average at start {load:.2f} (the machine is shared: step times are noisy)"
    )
    start = time.perf_counter()
    results = []
    for name in args.examples:
        log(f"{name}: steps to target over the ladder")
        results.append(run_example(SETUPS[name], seed=args.seed, log=log))
    overheads = {}
    for name in args.examples:
        setup = SETUPS[name]
        task = load_task(example=name)
        steps = args.overhead_steps
        overheads[name] = step_overhead(task, setup.measure_batch, steps=steps)
    print_tables(results, overheads)
    print()
    print(
        f"total {time.perf_counter() - start:.0f} s; load average at end {os.getloadavg()[0]:.2f}"
    )
    if args.plot is not None:
        plot(results, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
