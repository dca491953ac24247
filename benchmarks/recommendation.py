"""Is ``batchpilot tune``'s recommendation right? Graded against an oracle grid it never sees.

**The oracle grid.** For each task of ``benchmarks/tasks/`` named in ``DEFAULT_TASKS`` (each file
has ``task()`` and a ``TARGET_VAL_LOSS``), at every batch B = 4, 8, …, 4096 (none above the
training set), a constant lr (no warm-up, no schedule) on the factor-2 grid lr = 2^k is searched
until the optimum is interior: the best lr and every lr within 1.2× of its steps have both
neighbours evaluated, and worse (or diverging above). Each (B, lr) is trained from 3 seeds by this
file's own plain PyTorch loop (``train_to_target``; not batchpilot's) to the task's fixed
validation target: the validation loss is evaluated after every step up to 64 and then every
⌊t/64⌋ steps (so steps are resolved to ~1.6 %), and the CPU seconds to the target are
``time.process_time()`` around the training steps only (evaluation excluded) under
``torch.set_num_threads(1)``, one process. A run not at the target within the step cap (20,000;
inside a batch 2× the best median found so far, and the first lr at B 2× S(B/2), as S(B) does
not grow with B: both far above the 1.2× the good range needs) is "not reached"; a non-finite loss or a
validation loss above 10× a fresh model's is "diverged". Medians over seeds count a missing run
as infinitely slow (a cell stops early once most of its seeds cannot reach). Per B: the best lr,
its median steps S(B) and CPU seconds, and the good-lr range [lo, hi] (the lrs whose median steps
are within 1.2× of the best). Batches where no lr reaches are skipped (listed). Over the batches
that reached, S(B) = S_min (1 + B_crit / B) (McCandlish et al. 2018) is fitted by least squares in
log space. The grid records the 1-minute load average before and after each task and the CPU count,
and is written after every batch (``--grid-out``); ``--grid-from`` reuses it.

**The tune part.** ``batchpilot tune TASKFILE:task --seed S --format json --out TMP`` runs in a
subprocess for 3 seeds per task; its CPU cost is the ``getrusage(RUSAGE_CHILDREN)`` delta. The
keys read are in ``TUNE_KEYS`` (a missing one reads as None). Its recommendation (global batch as
micro-batch × accumulation, lr, linear warm-up from ``reference_lr`` over ``warmup_steps``, betas
and eps when given) is trained by the same loop from 3 seeds to the target. The grid's fastest
cell is rerun beside it, so both CPU times are taken under the same load (the grid's own figure,
a minimum over many noisy cells, is shown too).

**Goals** (PASS/FAIL per task, each holding for most of tune's seeds):

* (a) the critical batch tune's plan uses (``recommendation.noise_scale``: the gradient noise scale,
  or, when ``critical_batch_source`` is "steps at two batches", the one measured from the steps
  to the target at the reference and the checked batch) within 3× of the fitted B_crit; and,
  once over all tasks, the order of tasks by tune's noise scale (log-median over seeds) equals
  their order by fitted B_crit, a pair whose fitted B_crit are within 1.5× of each other never
  counting as an order error;
* (b) tune's lr inside the grid's good-lr range at tune's batch (interpolated in log B, both ends
  in log lr, between the neighbouring grid batches when tune's batch is not one of them), read at
  the grid's resolution: the lr rounds to a grid point inside [lo, hi], i.e. lies in
  [lo/√2, hi·√2] (a range is often one grid point, which no continuous lr hits exactly; the
  strict [lo, hi] check is in the JSON as ``b_strict``);
* (c) tune's recommendation reaches the target in ≤ 1.2× the CPU seconds of the grid's fastest
  (B, lr) (its rerun);
* (d) tune's CPU cost ≤ 10 % of the grid's whole CPU cost for that task (the process's CPU time
  for the task's grid, evaluation included).

    .venv/bin/python benchmarks/recommendation.py --grid-out grid.json        # the grid, then tune
    .venv/bin/python benchmarks/recommendation.py --grid-from grid.json --out results.json
    .venv/bin/python benchmarks/recommendation.py --quick      # smoke: 2 tasks, 3 batches, 1 seed
    .venv/bin/python benchmarks/recommendation.py --tasks realizable_sum,adam_classifier --markdown

``--grid-only`` stops after the grid. The exit code is 0 when every goal passes, 1 otherwise
(``--quick`` enforces none).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from batchpilot import Task

ROOT = Path(__file__).resolve().parent.parent
BATCHPILOT = ROOT / ".venv" / "bin" / "batchpilot"
OWN_TASKS = Path(__file__).resolve().parent / "tasks"

# --------------------------------------------------------------------------------------------
# The protocol's numbers


SMALLEST_BATCH = 4
LARGEST_BATCH = 4096
SEEDS = 3
STEP_CAP = 20_000  # a run not at the target after this many steps is "not reached"
EVALS_PER_DOUBLING = 64  # every step up to 64, then every ⌊t/64⌋ steps: steps resolved to ~1.6 %
CAP_FACTOR = 2.0  # within a batch, runs stop at 2× the best median steps found so far
PREVIOUS_BATCH_CAP = 2.0  # the first lr at batch B runs at most 2× S(B/2) steps
DIVERGE_FACTOR = 10.0  # validation loss above 10× a fresh model's: diverged
MAX_LRS_PER_BATCH = 14

# The goals.
GOOD_LR_FACTOR = 1.2  # the good-lr range: median steps within 1.2× of the best at that batch
NOISE_FACTOR = 3.0  # (a) tune's noise scale within 3× of the fitted B_crit
ORDER_TIE = 1.5  # (a) pairs whose fitted B_crit are within 1.5× are not order errors
CPU_RATIO_MAX = 1.2  # (c) tune's recommendation within 1.2× the fastest grid cell's CPU seconds
COST_SHARE_MAX = 0.10  # (d) tune's CPU cost at most 10 % of the grid's

DEFAULT_TASKS = (
    "realizable_sum",
    "adam_classifier",
    "rings_classifier",
    "adam_sum_regression",
    "mlp_regression_64k",
    "noisy_linear_64k",
)
QUICK_TASKS = ("realizable_sum", "adam_classifier")


# --------------------------------------------------------------------------------------------
# Tasks


@dataclass
class BenchTask:
    name: str
    task: Task
    target: float
    path: Path

    @property
    def spec(self) -> str:
        return f"{self.path}:task"


def load_bench_task(name: str) -> BenchTask:
    """A task of ``benchmarks/tasks/`` (or a ``path.py``) with its ``TARGET_VAL_LOSS``."""
    path = Path(name)
    if path.suffix != ".py":
        path = OWN_TASKS / f"{name}.py"
    if not path.is_file():
        raise SystemExit(f"--tasks: no task file {path}")
    spec = importlib.util.spec_from_file_location(f"_bench_task_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    task = module.task()
    if not isinstance(task, Task):
        raise SystemExit(f"{path}:task() returned {type(task).__name__}, expected a Task")
    target = getattr(module, "TARGET_VAL_LOSS", None)
    if not isinstance(target, int | float):
        raise SystemExit(f"{path} has no numeric TARGET_VAL_LOSS")
    return BenchTask(name=path.stem, task=task, target=float(target), path=path.resolve())


def optimizer_family(task: Task) -> str:
    """``"adam"`` or ``"sgd"``: which lr the grid starts each batch from (a search hint only)."""
    probe = task.make_optimizer([torch.nn.Parameter(torch.zeros(1))], 1e-3)
    return "adam" if "betas" in probe.param_groups[0] else "sgd"


# --------------------------------------------------------------------------------------------
# The training loop: the oracle's, shared by the grid and by the evaluation of tune's answer


@dataclass(frozen=True)
class Setting:
    """One way to train: global batch = micro_batch × accumulation, constant lr after an optional
    linear warm-up from ``warmup_start_lr`` over ``warmup_steps`` steps, Adam overrides."""

    micro_batch: int
    lr: float
    accumulation: int = 1
    warmup_steps: int = 0
    warmup_start_lr: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None

    @property
    def batch(self) -> int:
        return self.micro_batch * self.accumulation

    def lr_at(self, step: int) -> float:
        """The lr of step ``step`` (0-based): ``start + (lr - start) · step / N`` while warming up.

        >>> setting = Setting(8, 1.0, warmup_steps=4, warmup_start_lr=0.2)
        >>> [round(setting.lr_at(t), 9) for t in (0, 2, 4, 9)]
        [0.2, 0.6, 1.0, 1.0]
        """
        if self.warmup_steps <= 0 or step >= self.warmup_steps:
            return self.lr
        start = self.lr if self.warmup_start_lr is None else self.warmup_start_lr
        return start + (self.lr - start) * step / self.warmup_steps


@dataclass
class RunResult:
    seed: int
    steps: int | None  # steps to the target; None: not reached
    cpu_seconds: float | None  # training CPU seconds to the target (evaluation excluded)
    diverged: bool
    steps_run: int
    best_val: float
    train_cpu_seconds: float  # training CPU seconds of the whole run, reached or not

    @property
    def reached(self) -> bool:
        return self.steps is not None


def eval_due(step: int) -> bool:
    """Whether the validation loss is evaluated after ``step`` steps: every step up to 64, then
    every ⌊step/64⌋ steps, so a step count is resolved to 1/64 of itself.

    >>> [t for t in range(60, 140) if eval_due(t)][:8], eval_due(6400), eval_due(6401)
    ([60, 61, 62, 63, 64, 65, 66, 67], True, False)
    """
    return step <= EVALS_PER_DOUBLING or step % (step // EVALS_PER_DOUBLING) == 0


def _tensors(dataset: Any) -> tuple[torch.Tensor, ...]:
    tensors = getattr(dataset, "tensors", None)
    if tensors is None:
        raise SystemExit("the benchmark's loop needs TensorDataset train and validation data")
    return tuple(tensors)


def val_loss(task: Task, model: torch.nn.Module, tensors: tuple[torch.Tensor, ...]) -> float:
    """The validation loss per sample (a sum-reduced loss divided by the sample count)."""
    model.eval()
    with torch.no_grad():
        loss = float(task.loss(model, tensors))
    model.train()
    return loss / len(tensors[0]) if task.reduction == "sum" else loss


def train_to_target(
    task: Task, setting: Setting, *, target: float, seed: int, max_steps: int
) -> RunResult:
    """Train a fresh model (initialised from ``seed``) until its validation loss is at or below
    ``target`` or ``max_steps`` steps; batches are drawn without replacement from a permutation
    per epoch (an incomplete last batch is dropped). Only the training steps are timed."""
    train = _tensors(task.train_data)
    val = _tensors(task.val_data)
    n = len(train[0])
    if setting.batch > n:
        raise ValueError(f"batch {setting.batch} exceeds the {n} training samples")
    torch.manual_seed(seed)
    model = task.make_model()
    optimizer = task.make_optimizer(model.parameters(), setting.lr_at(0))
    for group in optimizer.param_groups:
        if setting.betas is not None and "betas" in group:
            group["betas"] = tuple(setting.betas)
        if setting.eps is not None and "eps" in group:
            group["eps"] = setting.eps
    generator = torch.Generator().manual_seed(10_000 + seed)
    initial = val_loss(task, model, val)
    limit = DIVERGE_FACTOR * initial
    best = initial
    order = torch.randperm(n, generator=generator)
    position = 0
    mean = task.reduction == "mean"
    cpu = 0.0
    step = 0
    diverged = False
    reached_at: int | None = None
    reached_cpu: float | None = None
    model.train()
    while step < max_steps:
        start = time.process_time()
        if position + setting.batch > n:
            order = torch.randperm(n, generator=generator)
            position = 0
        indices = order[position : position + setting.batch]
        position += setting.batch
        lr = setting.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        finite = True
        for part in range(setting.accumulation):
            chosen = indices[part * setting.micro_batch : (part + 1) * setting.micro_batch]
            loss = task.loss(model, tuple(t[chosen] for t in train))
            (loss / setting.accumulation if mean else loss).backward()
            finite = finite and math.isfinite(float(loss.detach()))
        if finite:
            optimizer.step()
        step += 1
        cpu += time.process_time() - start
        if not finite:
            diverged = True
            break
        if eval_due(step) or step == max_steps:
            current = val_loss(task, model, val)
            if not math.isfinite(current) or current > limit:
                diverged = True
                break
            best = min(best, current)
            if current <= target:
                reached_at, reached_cpu = step, cpu
                break
    return RunResult(
        seed=seed,
        steps=reached_at,
        cpu_seconds=reached_cpu,
        diverged=diverged,
        steps_run=step,
        best_val=best,
        train_cpu_seconds=cpu,
    )


def median_or_inf(values: Sequence[float | None]) -> float:
    """The median with a missing value (not reached) counted as infinitely large.

    >>> median_or_inf([10, None, 12]), median_or_inf([10, None, None]), median_or_inf([3, 1, 2])
    (12, inf, 2)
    """
    ordered = sorted(math.inf if v is None else v for v in values)
    return statistics.median(ordered) if ordered else math.inf


# --------------------------------------------------------------------------------------------
# The lr search at one batch: a factor-2 grid, extended until the optimum is interior


def search_interior(
    evaluate: Callable[[int], tuple[float, bool]],
    start: int,
    *,
    good_factor: float = GOOD_LR_FACTOR,
    max_points: int = MAX_LRS_PER_BATCH,
) -> dict[int, tuple[float, bool]]:
    """Grid points ``k`` (lr = base · 2^k) evaluated from ``start`` and its two neighbours,
    extended one point at a time until the best point (the fewest median steps) and every point
    within ``good_factor`` of it have both neighbours evaluated, a neighbour above being allowed
    to diverge. ``evaluate(k)`` returns ``(median steps or inf, diverged)``.

    When nothing reaches the target it moves down while the lowest point diverged and up while
    nothing diverged, and stops where a diverging point sits right above a too-slow one.

    >>> steps = lambda k: (abs(k - 5) * 10.0 + 20.0, False) if k < 8 else (math.inf, True)
    >>> sorted(search_interior(steps, 0))
    [-1, 0, 1, 2, 3, 4, 5, 6]
    """
    results: dict[int, tuple[float, bool]] = {}
    for k in (start, start + 1, start - 1):
        results[k] = evaluate(k)
    while len(results) < max_points:
        low, high = min(results), max(results)
        finite = {k: s for k, (s, _) in results.items() if math.isfinite(s)}
        if not finite:
            if results[low][1]:
                results[low - 1] = evaluate(low - 1)
            elif not any(d for _, d in results.values()):
                results[high + 1] = evaluate(high + 1)
            else:
                break
            continue
        best = min(finite.values())
        good = {k for k, s in finite.items() if s <= good_factor * best}
        if low in good:
            results[low - 1] = evaluate(low - 1)
        elif high in good and not results[high][1]:
            results[high + 1] = evaluate(high + 1)
        else:
            break
    return results


# --------------------------------------------------------------------------------------------
# The fit S(B) = S_min (1 + B_crit / B)


@dataclass(frozen=True)
class StepsFit:
    s_min: float
    b_crit: float
    residual: float  # RMS of the log residuals
    points: int
    at_bound: str = ""  # "upper" / "lower" when B_crit ran to the search bound

    def steps_at(self, batch: float) -> float:
        return self.s_min * (1.0 + self.b_crit / batch)


def fit_steps(batches: Sequence[float], steps: Sequence[float]) -> StepsFit | None:
    """Least squares in log space: min over B_crit of Σ (log S − log S_min − log(1 + B_crit/B))²,
    with log S_min the mean of ``log S − log(1 + B_crit/B)`` for each B_crit (McCandlish et al.
    2018). B_crit is searched over [min B / 1000, max B · 1000], a log grid refined by golden
    section.

    >>> fit = fit_steps([4, 8, 16, 32, 64], [100 * (1 + 20 / b) for b in (4, 8, 16, 32, 64)])
    >>> round(fit.s_min, 3), round(fit.b_crit, 3), fit.residual < 1e-6
    (100.0, 20.0, True)
    """
    pairs = [(float(b), float(s)) for b, s in zip(batches, steps, strict=True) if math.isfinite(s)]
    if len(pairs) < 2:
        return None
    log_b = [math.log(b) for b, _ in pairs]
    log_s = [math.log(s) for _, s in pairs]

    def residuals(log_crit: float) -> tuple[float, float]:
        crit = math.exp(log_crit)
        shape = [math.log1p(crit / math.exp(lb)) for lb in log_b]
        level = statistics.fmean(s - h for s, h in zip(log_s, shape, strict=True))
        sse = sum((s - level - h) ** 2 for s, h in zip(log_s, shape, strict=True))
        return sse, level

    low, high = min(log_b) - math.log(1000), max(log_b) + math.log(1000)
    grid = [low + (high - low) * i / 400 for i in range(401)]
    values = [residuals(g)[0] for g in grid]
    i = min(range(len(grid)), key=values.__getitem__)
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if residuals(c)[0] < residuals(d)[0]:
            b = d
        else:
            a = c
    log_crit = (a + b) / 2
    sse, level = residuals(log_crit)
    bound = "upper" if i == len(grid) - 1 else ("lower" if i == 0 else "")
    return StepsFit(
        s_min=math.exp(level),
        b_crit=math.exp(log_crit),
        residual=math.sqrt(sse / len(pairs)),
        points=len(pairs),
        at_bound=bound,
    )


# --------------------------------------------------------------------------------------------
# The grid


def grid_batches(train_size: int, *, smallest: int = SMALLEST_BATCH, largest: int = LARGEST_BATCH):
    """Powers of 2 from ``smallest`` to ``largest``, none above the training set.

    >>> grid_batches(512), grid_batches(100_000)[-1]
    ([4, 8, 16, 32, 64, 128, 256, 512], 4096)
    """
    batches = []
    batch = smallest
    while batch <= min(largest, train_size):
        batches.append(batch)
        batch *= 2
    return batches


def grid_point(lr: float) -> int:
    """The factor-2 grid point (lr = 2^k) nearest ``lr`` in log space.

    >>> grid_point(0.001), grid_point(0.3), 2.0 ** grid_point(0.05)
    (-10, -2, 0.0625)
    """
    return round(math.log2(lr))


def first_lr_point(task: Task, family: str) -> int:
    """Where the search starts at the smallest batch: the task's reference lr carried to it by
    the usual rule (SGD mean: linear; Adam: square root; SGD sum: unchanged). A hint only: the
    search moves until the optimum is interior."""
    lr = task.reference_lr or (1e-3 if family == "adam" else 0.01)
    ref = task.reference_batch or 32
    ratio = SMALLEST_BATCH / ref
    if family == "adam":
        lr *= math.sqrt(ratio)
    elif task.reduction == "mean":
        lr *= ratio
    return grid_point(lr)


def next_start(best_k: int, family: str, reduction: str) -> int:
    """Where the search at 2B starts from the best point at B: ×2 for SGD on a mean loss (the
    linear rule), unchanged otherwise (Adam's square root is half a grid step; a summed SGD loss
    keeps its lr under the linear rule)."""
    return best_k + 1 if family == "sgd" and reduction == "mean" else best_k


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def evaluate_cell(
    task: Task,
    setting: Setting,
    *,
    target: float,
    seeds: int,
    max_steps: int,
) -> dict[str, Any]:
    """``seeds`` runs of one setting (stopping once most of them cannot reach), with the medians."""
    runs: list[RunResult] = []
    needed = seeds // 2 + 1
    for seed in range(seeds):
        runs.append(train_to_target(task, setting, target=target, seed=seed, max_steps=max_steps))
        if sum(not r.reached for r in runs) >= needed:
            break
    missing = seeds - len(runs)
    steps = [r.steps for r in runs] + [None] * missing
    cpu = [r.cpu_seconds for r in runs] + [None] * missing
    return {
        "lr": setting.lr,
        "max_steps": max_steps,
        "median_steps": _finite(median_or_inf(steps)),
        "median_cpu_seconds": _finite(median_or_inf(cpu)),
        "diverged": sum(r.diverged for r in runs) >= needed,
        "runs": [asdict(r) for r in runs],
    }


def good_range(cells: Sequence[dict[str, Any]], factor: float = GOOD_LR_FACTOR):
    """The best cell (fewest median steps; ties: fewer mean steps over its runs) and [lo, hi], the
    lrs whose median steps are within ``factor`` of it."""
    reached = [c for c in cells if c["median_steps"] is not None]
    if not reached:
        return None, None

    def key(cell: dict[str, Any]) -> tuple[float, float]:
        steps = [r["steps"] for r in cell["runs"] if r["steps"] is not None]
        return cell["median_steps"], statistics.fmean(steps)

    best = min(reached, key=key)
    good = [c["lr"] for c in reached if c["median_steps"] <= factor * best["median_steps"]]
    return best, [min(good), max(good)]


def search_batch(
    bench: BenchTask,
    batch: int,
    *,
    start_k: int,
    previous_steps: float | None,
    seeds: int,
    step_cap: int,
) -> dict[int, dict[str, Any]]:
    """The cells of one batch: :func:`search_interior` over ``evaluate_cell``, each run capped
    at ``CAP_FACTOR`` × the best median so far (before any: ``PREVIOUS_BATCH_CAP`` × S(B/2))."""
    cells: dict[int, dict[str, Any]] = {}

    def cap() -> int:
        best = [c["median_steps"] for c in cells.values() if c["median_steps"] is not None]
        if best:
            return min(step_cap, math.ceil(CAP_FACTOR * min(best)))
        if previous_steps is not None:
            return min(step_cap, math.ceil(PREVIOUS_BATCH_CAP * previous_steps))
        return step_cap

    def evaluate(k: int) -> tuple[float, bool]:
        cell = evaluate_cell(
            bench.task, Setting(batch, 2.0**k), target=bench.target, seeds=seeds, max_steps=cap()
        )
        cell["k"] = k
        cells[k] = cell
        steps = cell["median_steps"]
        print(
            f"  {bench.name} B={batch} lr=2^{k} ({2.0**k:.4g}): "
            + (f"{steps:g} steps" if steps is not None else "not reached")
            + (" (diverged)" if cell["diverged"] else "")
            + f", cap {cell['max_steps']}",
            file=sys.stderr,
            flush=True,
        )
        return (math.inf if steps is None else float(steps)), bool(cell["diverged"])

    search_interior(evaluate, start_k)
    return cells


def grid_task(
    bench: BenchTask,
    *,
    seeds: int,
    step_cap: int,
    batches: Sequence[int] | None = None,
    save: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The grid of one task: at every batch, the factor-2 lr search with an interior optimum."""
    task = bench.task
    family = optimizer_family(task)
    batches = list(batches or grid_batches(task.train_size))
    record: dict[str, Any] = {
        "task": bench.name,
        "optimizer": family,
        "reduction": task.reduction,
        "train_size": task.train_size,
        "val_size": len(task.val_data) if task.val_data is not None else 0,
        "target": bench.target,
        "seeds": seeds,
        "step_cap": step_cap,
        "batches_planned": batches,
        "load_before": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "batches": [],
        "complete": False,
    }
    usage = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter()
    start_k = first_lr_point(task, family)
    previous_steps: float | None = None
    for batch in batches:
        cells = search_batch(
            bench,
            batch,
            start_k=start_k,
            previous_steps=previous_steps,
            seeds=seeds,
            step_cap=step_cap,
        )
        ordered = [cells[k] for k in sorted(cells)]
        best, lr_range = good_range(ordered)
        entry: dict[str, Any] = {"batch": batch, "cells": ordered}
        if best is None:
            entry.update(reached=False, note="no lr reaches the target within its cap")
        else:
            entry.update(
                reached=True,
                best_lr=best["lr"],
                steps=best["median_steps"],
                cpu_seconds=best["median_cpu_seconds"],
                good_lr=lr_range,
                interior=min(cells) < best["k"] < max(cells),
            )
            previous_steps = best["median_steps"]
            start_k = next_start(best["k"], family, task.reduction)
        record["batches"].append(entry)
        record.update(summarize_grid(record))
        now = resource.getrusage(resource.RUSAGE_SELF)
        record["cpu_seconds_total"] = (now.ru_utime - usage.ru_utime) + (
            now.ru_stime - usage.ru_stime
        )
        record["wall_seconds"] = time.perf_counter() - wall
        if save is not None:
            save(record)
    record["load_after"] = list(os.getloadavg())
    record["complete"] = True
    if save is not None:
        save(record)
    return record


def summarize_grid(record: dict[str, Any]) -> dict[str, Any]:
    """The fit over the batches that reached, and the fastest cell of the whole grid."""
    reached = [b for b in record["batches"] if b.get("reached")]
    fit = fit_steps([b["batch"] for b in reached], [b["steps"] for b in reached])
    cells = [
        (cell["median_cpu_seconds"], b["batch"], cell["lr"], cell["median_steps"])
        for b in record["batches"]
        for cell in b["cells"]
        if cell["median_cpu_seconds"] is not None
    ]
    fastest = None
    if cells:
        cpu, batch, lr, steps = min(cells)
        fastest = {"batch": batch, "lr": lr, "cpu_seconds": cpu, "steps": steps}
    train_cpu = sum(
        run["train_cpu_seconds"] for b in record["batches"] for c in b["cells"] for run in c["runs"]
    )
    return {
        "fit": None if fit is None else asdict(fit),
        "fastest": fastest,
        "train_cpu_seconds": train_cpu,
        "skipped": [b["batch"] for b in record["batches"] if not b.get("reached")],
    }


def good_range_at(record: dict[str, Any], batch: float) -> tuple[list[float] | None, str]:
    """The good-lr range at any batch: the grid's own at a grid batch, else interpolated in log B
    (both ends, in log lr) between the neighbouring grid batches; outside the grid, the nearest
    grid batch's (said so)."""
    rows = [(b["batch"], b["good_lr"]) for b in record["batches"] if b.get("reached")]
    if not rows:
        return None, "no batch reached"
    for grid_b, lr_range in rows:
        if grid_b == batch:
            return list(lr_range), "grid batch"
    below = [(b, r) for b, r in rows if b < batch]
    above = [(b, r) for b, r in rows if b > batch]
    if not below or not above:
        b, r = below[-1] if below else above[0]
        return list(r), f"outside the grid: the range at batch {b}"
    (b1, r1), (b2, r2) = below[-1], above[0]
    w = math.log(batch / b1) / math.log(b2 / b1)
    return [
        math.exp((1 - w) * math.log(r1[i]) + w * math.log(r2[i])) for i in range(2)
    ], f"interpolated between batches {b1} and {b2}"


# --------------------------------------------------------------------------------------------
# The tune part

# Where the numbers sit in ``tune --format json``; a missing key reads as None.
TUNE_KEYS = {
    "global_batch": "recommendation.global_batch",
    "micro_batch": "recommendation.micro_batch",
    "accumulation_steps": "recommendation.accumulation_steps",
    "lr": "recommendation.lr",
    "rule_lr": "recommendation.rule_lr",
    "warmup_steps": "recommendation.warmup_steps",
    "reference_lr": "recommendation.reference_lr",
    "betas": "recommendation.betas",
    "eps": "recommendation.eps",
    "noise_scale": "recommendation.noise_scale",
    "noise_interval": "recommendation.noise_interval",
    "critical_batch_source": "recommendation.critical_batch_source",
    "gradient_noise_scale": "noise.plan_noise_scale",
    "predicted_steps": "recommendation.predicted_steps",
    "window_steps": "noise.window_steps",
    "critical_batch": "noise.critical_batch",
    "tune_seconds": "phase_seconds.total",
}


def lookup(result: dict[str, Any], path: str) -> Any:
    """The value at a dotted path, or None.

    >>> lookup({"a": {"b": 2}}, "a.b"), lookup({"a": {}}, "a.b")
    (2, None)
    """
    node: Any = result
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def run_tune(
    bench: BenchTask,
    *,
    seed: int,
    time_budget: float | None,
    timeout: float,
    given_target: bool = False,
) -> dict[str, Any]:
    """``batchpilot tune TASK --seed S --format json`` in a subprocess, with its CPU cost
    (``getrusage(RUSAGE_CHILDREN)`` before and after) and the keys of ``TUNE_KEYS``;
    ``given_target`` passes the task's ``TARGET_VAL_LOSS`` as ``--target-loss``."""
    with tempfile.TemporaryDirectory(prefix="batchpilot-recommendation-") as tmp:
        command = [
            str(BATCHPILOT),
            "tune",
            bench.spec,
            "--seed",
            str(seed),
            "--format",
            "json",
            "--out",
            tmp,
        ]
        if time_budget is not None:
            command += ["--time-budget", str(time_budget)]
        if given_target:
            command += ["--target-loss", repr(bench.target)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        load_before = os.getloadavg()[0]
        wall = time.perf_counter()
        try:
            completed = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, cwd=ROOT
            )
            exit_code: int | None = completed.returncode
            stdout, stderr = completed.stdout, completed.stderr
        except subprocess.TimeoutExpired:
            exit_code, stdout, stderr = None, "", f"timed out after {timeout:g} s"
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out: dict[str, Any] = {
        "seed": seed,
        "exit_code": exit_code,
        "wall_seconds": time.perf_counter() - wall,
        "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }
    if exit_code != 0:
        lines = [line for line in stderr.splitlines() if line.strip()]
        out["error"] = lines[-1] if lines else f"exit code {exit_code}"
        return out
    try:
        result = json.loads(stdout)
    except json.JSONDecodeError as exc:
        out["error"] = f"stdout is not JSON ({exc})"
        return out
    for name, path in TUNE_KEYS.items():
        out[name] = lookup(result, path)
    return out


def tune_setting(answer: dict[str, Any]) -> Setting:
    """tune's answer as a :class:`Setting`: its split, lr, warm-up and Adam overrides."""
    batch = int(answer["global_batch"])
    micro = int(answer.get("micro_batch") or batch)
    accumulation = int(answer.get("accumulation_steps") or max(1, batch // micro))
    betas = answer.get("betas")
    return Setting(
        micro_batch=micro,
        lr=float(answer["lr"]),
        accumulation=accumulation,
        warmup_steps=int(answer.get("warmup_steps") or 0),
        warmup_start_lr=answer.get("reference_lr"),
        betas=None if betas is None else (float(betas[0]), float(betas[1])),
        eps=answer.get("eps"),
    )


def train_setting(
    bench: BenchTask, setting: Setting, *, seeds: int, step_cap: int
) -> dict[str, Any]:
    """All ``seeds`` runs of a setting (no early stop), with the median steps and CPU seconds."""
    runs = [
        train_to_target(bench.task, setting, target=bench.target, seed=s, max_steps=step_cap)
        for s in range(seeds)
    ]
    return {
        "setting": asdict(setting),
        "median_steps": _finite(median_or_inf([r.steps for r in runs])),
        "median_cpu_seconds": _finite(median_or_inf([r.cpu_seconds for r in runs])),
        "reached": sum(r.reached for r in runs),
        "runs": [asdict(r) for r in runs],
    }


def tune_task(
    bench: BenchTask,
    grid: dict[str, Any],
    *,
    tune_seeds: int,
    seeds: int,
    step_cap: int,
    time_budget: float | None,
    timeout: float,
    given_target: bool = False,
) -> dict[str, Any]:
    """tune's answers for one task, each trained to the target, beside a fresh rerun of the grid's
    fastest cell (same loop, same session, so both are timed under the same load)."""
    out: dict[str, Any] = {"task": bench.name, "answers": [], "load_before": list(os.getloadavg())}
    fastest = grid.get("fastest")
    if fastest is not None:
        out["fastest_rerun"] = train_setting(
            bench, Setting(fastest["batch"], fastest["lr"]), seeds=seeds, step_cap=step_cap
        )
    for seed in range(tune_seeds):
        answer = run_tune(
            bench, seed=seed, time_budget=time_budget, timeout=timeout, given_target=given_target
        )
        if "error" not in answer and answer.get("global_batch") and answer.get("lr"):
            answer["training"] = train_setting(
                bench, tune_setting(answer), seeds=seeds, step_cap=step_cap
            )
        out["answers"].append(answer)
        training = answer.get("training") or {}
        print(
            f"  {bench.name} tune seed {seed}: batch {answer.get('global_batch')}, "
            f"lr {answer.get('lr')}, noise scale {answer.get('noise_scale')}, "
            f"tune CPU {answer['cpu_seconds']:.1f} s, to target "
            f"{training.get('median_cpu_seconds')} CPU s"
            + (f" ERROR {answer['error']}" if "error" in answer else ""),
            file=sys.stderr,
            flush=True,
        )
    out["load_after"] = list(os.getloadavg())
    return out


# --------------------------------------------------------------------------------------------
# The goals


def log_median(values: Sequence[float]) -> float | None:
    """The median in log space (the geometric mean of the middle two for an even count).

    >>> round(log_median([16, 64]), 9), log_median([])
    (32.0, None)
    """
    if not values:
        return None
    return float(math.exp(statistics.median(math.log(v) for v in values)))


def within(value: float, centre: float, factor: float) -> bool:
    return abs(math.log(value / centre)) <= math.log(factor) + 1e-9


def judge_answer(answer: dict[str, Any], grid: dict[str, Any], fresh_fastest: float | None):
    """The goals (a)–(d) for one of tune's answers: True, False or None (cannot tell)."""
    fit = grid.get("fit")
    verdict: dict[str, Any] = {}
    noise = answer.get("noise_scale")
    verdict["a"] = (
        None
        if fit is None or not noise or noise <= 0
        else within(float(noise), fit["b_crit"], NOISE_FACTOR)
    )
    batch, lr = answer.get("global_batch"), answer.get("lr")
    lr_range, how = (None, "") if not batch else good_range_at(grid, float(batch))
    verdict["good_lr"], verdict["good_lr_how"] = lr_range, how
    verdict["b"] = None if lr_range is None or not lr else lr_in_range(float(lr), lr_range)
    verdict["b_strict"] = (
        None if lr_range is None or not lr else lr_in_range(float(lr), lr_range, half_step=False)
    )
    training = answer.get("training") or {}
    cpu = training.get("median_cpu_seconds")
    cached = (grid.get("fastest") or {}).get("cpu_seconds")
    verdict["cpu_ratio"] = None if cpu is None or not fresh_fastest else cpu / fresh_fastest
    verdict["cpu_ratio_cached"] = None if cpu is None or not cached else cpu / cached
    if "error" in answer or not training:
        verdict["c"] = False if "error" in answer else None
    else:
        verdict["c"] = verdict["cpu_ratio"] is not None and verdict["cpu_ratio"] <= CPU_RATIO_MAX
    total = grid.get("cpu_seconds_total")
    verdict["cost_ratio"] = answer["cpu_seconds"] / total if total else None
    verdict["d"] = (
        None if verdict["cost_ratio"] is None else verdict["cost_ratio"] <= COST_SHARE_MAX
    )
    return verdict


def lr_in_range(lr: float, lr_range: Sequence[float], *, half_step: bool = True) -> bool:
    """Whether ``lr`` is in the good range at the grid's resolution: it rounds (in log space) to a
    grid point inside [lo, hi], i.e. lies in [lo/√2, hi·√2]; ``half_step=False``: in [lo, hi].

    >>> lr_in_range(0.0125, [0.0156, 0.0156]), lr_in_range(0.0105, [0.0156, 0.0156])
    (True, False)
    >>> lr_in_range(0.0125, [0.0156, 0.0156], half_step=False)
    False
    """
    slack = math.sqrt(2.0) if half_step else 1.0
    return lr_range[0] / slack * (1 - 1e-9) <= lr <= lr_range[1] * slack * (1 + 1e-9)


def majority(values: Sequence[bool | None]) -> bool | None:
    """A goal holds for a task when it holds for most of tune's seeds (None: none could tell).

    >>> majority([True, False, True]), majority([True, False, None]), majority([None])
    (True, False, None)
    """
    known = [v for v in values if v is not None]
    if not known:
        return None
    return sum(known) > len(values) / 2


def order_errors(pairs: dict[str, tuple[float, float]]) -> list[tuple[str, str]]:
    """Pairs of tasks whose order by tune's noise scale differs from the order by fitted B_crit,
    ``pairs[task] = (b_crit, noise_scale)``; pairs whose B_crit are within ``ORDER_TIE`` of each
    other are not errors.

    >>> order_errors({"a": (10, 5), "b": (1000, 900), "c": (1200, 800)})
    []
    >>> order_errors({"a": (10, 500), "b": (1000, 400)})
    [('a', 'b')]
    """
    errors = []
    names = sorted(pairs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            (crit_a, noise_a), (crit_b, noise_b) = pairs[a], pairs[b]
            if within(crit_a, crit_b, ORDER_TIE):
                continue
            if (crit_a < crit_b) != (noise_a < noise_b):
                errors.append((a, b))
    return errors


# --------------------------------------------------------------------------------------------
# Tables


def _g(value: Any, fmt: str = ".4g") -> str:
    return "—" if value is None else format(value, fmt)


def _verdict(value: bool | None) -> str:
    return "—" if value is None else ("PASS" if value else "FAIL")


def _range(lr_range: Sequence[float] | None) -> str:
    return "—" if not lr_range else f"[{lr_range[0]:.3g}, {lr_range[1]:.3g}]"


GRID_COLUMNS = (
    "task",
    "optimizer, loss",
    "train",
    "target",
    "batches reached",
    "B_crit",
    "S_min",
    "fit resid",
    "fastest B",
    "fastest lr",
    "CPU s",
    "grid CPU s",
    "load",
)
BATCH_COLUMNS = ("task", "B", "best lr", "S(B)", "CPU s", "good lr", "lrs tried", "interior")
TUNE_COLUMNS = (
    "task",
    "seed",
    "batch",
    "lr",
    "warm-up",
    "plan's B_crit (source)",
    "÷ B_crit",
    "good lr at batch (±½ step)",
    "CPU s to target",
    "fastest (rerun)",
    "ratio (vs grid)",
    "tune CPU s",
    "cost ratio",
    "a b c d",
)
GOAL_COLUMNS = ("task", "(a) noise ×3", "(b) lr in range", "(c) CPU ≤ 1.2×", "(d) cost ≤ 10 %")


def grid_rows(grids: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for g in grids:
        fit, fastest = g.get("fit"), g.get("fastest") or {}
        reached = sum(1 for b in g["batches"] if b.get("reached"))
        load = f"{g['load_before'][0]:.2f}→{(g.get('load_after') or [math.nan])[0]:.2f}"
        crit = (
            "—" if fit is None else f"{fit['b_crit']:.3g}" + (" (bound)" if fit["at_bound"] else "")
        )
        rows.append(
            [
                g["task"],
                f"{'SGD m=0.9' if g['optimizer'] == 'sgd' else 'Adam'}, {g['reduction']}",
                str(g["train_size"]),
                f"{g['target']:g}",
                f"{reached}/{len(g['batches'])} ({g['batches'][0]['batch']}–{g['batches'][-1]['batch']})",
                crit,
                "—" if fit is None else f"{fit['s_min']:.3g}",
                "—" if fit is None else f"{fit['residual']:.2f}",
                _g(fastest.get("batch"), "d"),
                _g(fastest.get("lr")),
                _g(fastest.get("cpu_seconds"), ".3f"),
                _g(g.get("cpu_seconds_total"), ".0f"),
                load,
            ]
        )
    return rows


def batch_rows(grids: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for g in grids:
        for b in g["batches"]:
            tried = ", ".join(f"{c['lr']:.3g}" for c in b["cells"])
            if not b.get("reached"):
                rows.append([g["task"], str(b["batch"]), "—", "not reached", "—", "—", tried, "—"])
                continue
            rows.append(
                [
                    g["task"],
                    str(b["batch"]),
                    f"{b['best_lr']:.3g}",
                    f"{b['steps']:g}",
                    f"{b['cpu_seconds']:.3f}",
                    _range(b["good_lr"]),
                    tried,
                    "yes" if b["interior"] else "NO",
                ]
            )
    return rows


def tune_rows(results: Sequence[dict[str, Any]], grids: dict[str, dict[str, Any]]):
    rows = []
    for result in results:
        grid = grids[result["task"]]
        fit = grid.get("fit")
        rerun = (result.get("fastest_rerun") or {}).get("median_cpu_seconds")
        for answer in result["answers"]:
            v = answer["verdict"]
            training = answer.get("training") or {}
            if "error" in answer:
                rows.append([result["task"], str(answer["seed"]), f"ERROR: {answer['error']}"])
                rows[-1] += [""] * (len(TUNE_COLUMNS) - 3)
                continue
            split = f"{answer['global_batch']}"
            if (answer.get("accumulation_steps") or 1) > 1:
                split += f" ({answer['micro_batch']}×{answer['accumulation_steps']})"
            noise = answer.get("noise_scale")
            ratio = "—" if not noise or fit is None else f"{noise / fit['b_crit']:.2f}"
            warm = answer.get("warmup_steps") or 0
            reached = f"{training.get('reached', 0)}/{len(training.get('runs', []))}"
            rows.append(
                [
                    result["task"],
                    str(answer["seed"]),
                    split,
                    _g(answer.get("lr")),
                    f"{warm} from {answer.get('reference_lr'):.3g}" if warm else "none",
                    _g(noise, ".3g") + _source(answer),
                    ratio,
                    _range(v["good_lr"]) + ("" if v["good_lr_how"] == "grid batch" else " *"),
                    f"{_g(training.get('median_cpu_seconds'), '.3f')} ({reached})",
                    _g(rerun, ".3f"),
                    f"{_g(v['cpu_ratio'], '.2f')} ({_g(v['cpu_ratio_cached'], '.2f')})",
                    f"{answer['cpu_seconds']:.1f}",
                    _g(v["cost_ratio"], ".2f"),
                    " ".join(_verdict(v[g])[0] if v[g] is not None else "—" for g in "abcd"),
                ]
            )
    return rows


def _source(answer: dict[str, Any]) -> str:
    """Where the plan's critical batch came from, with the gradient noise scale when the
    critical batch was measured through the steps at two batches."""
    if answer.get("critical_batch_source") != "steps at two batches":
        return " (noise)"
    return f" (2 batches; noise {_g(answer.get('gradient_noise_scale'), '.3g')})"


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], md: bool):
    if md:
        print(f"{title}\n\n{markdown_table(columns, rows)}\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for cells in rows:
        table.add_row(*cells)
    Console(width=240).print(table)


# --------------------------------------------------------------------------------------------
# The benchmark


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def settings_record(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "seeds": args.seeds,
        "step_cap": args.step_cap,
        "batches": args.batches,
        "evaluation": f"validation loss after every step up to {EVALS_PER_DOUBLING}, then every "
        f"⌊t/{EVALS_PER_DOUBLING}⌋ steps (steps resolved to ~1/{EVALS_PER_DOUBLING} of themselves)",
        "timing": "time.process_time() around the training steps only (evaluation excluded), "
        "torch.set_num_threads(1), one process",
        "lr_grid": "lr = 2^k, searched per batch until the best and every lr within "
        f"{GOOD_LR_FACTOR}× of it have both neighbours evaluated",
        "caps": f"step cap {args.step_cap}; within a batch {CAP_FACTOR}× the best median so far; "
        f"the first lr at batch B {PREVIOUS_BATCH_CAP}× S(B/2)",
        "diverged": f"non-finite training loss or validation loss above {DIVERGE_FACTOR}× a fresh "
        "model's",
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", default=None, help="comma-separated names in benchmarks/tasks/")
    parser.add_argument("--grid-out", type=Path, default=None, help="write the grid here (JSON)")
    parser.add_argument(
        "--grid-from", type=Path, default=None, help="reuse the grid of this file's tasks"
    )
    parser.add_argument("--grid-only", action="store_true", help="compute the grid, no tune part")
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds per cell (default {SEEDS})")
    parser.add_argument("--tune-seeds", type=int, default=None, help="tune seeds (default 3)")
    parser.add_argument("--step-cap", type=int, default=None, help=f"default {STEP_CAP}")
    parser.add_argument(
        "--time-budget", type=float, default=None, help="passed to tune as --time-budget"
    )
    parser.add_argument("--tune-timeout", type=float, default=900.0, help="seconds per tune run")
    parser.add_argument("--out", type=Path, default=None, help="full results (JSON)")
    parser.add_argument("--markdown", action="store_true", help="Markdown tables")
    parser.add_argument(
        "--given-target",
        action="store_true",
        help="pass each task's TARGET_VAL_LOSS to tune as --target-loss (the user who knows "
        "the loss they train to); default: tune's own target",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {','.join(QUICK_TASKS)}, batches 8/32/128, 1 seed, goals not enforced",
    )
    args = parser.parse_args(argv)
    args.tasks = (
        args.tasks.split(",") if args.tasks else list(QUICK_TASKS if args.quick else DEFAULT_TASKS)
    )
    args.seeds = args.seeds or (1 if args.quick else SEEDS)
    args.tune_seeds = args.tune_seeds or (1 if args.quick else 3)
    args.step_cap = args.step_cap or (3000 if args.quick else STEP_CAP)
    args.batches = [8, 32, 128] if args.quick else None
    if args.quick and args.time_budget is None:
        args.time_budget = 20.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    benches = [load_bench_task(name) for name in args.tasks]
    document: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "settings": settings_record(args),
        "tasks": {},
    }
    if args.grid_from is not None:
        previous = json.loads(args.grid_from.read_text())
        document = {**previous, "tasks": dict(previous.get("tasks", {}))}

    def save(record: dict[str, Any]) -> None:
        document["tasks"][record["task"]] = record
        if args.grid_out is not None:
            args.grid_out.parent.mkdir(parents=True, exist_ok=True)
            args.grid_out.write_text(json.dumps(document, indent=1) + "\n")

    grids: dict[str, dict[str, Any]] = {}
    for bench in benches:
        cached = document["tasks"].get(bench.name)
        if cached is not None and cached.get("complete"):
            print(f"{bench.name}: grid from {args.grid_from}", file=sys.stderr)
            grids[bench.name] = cached
            continue
        print(f"{bench.name}: computing the grid", file=sys.stderr, flush=True)
        grids[bench.name] = grid_task(
            bench, seeds=args.seeds, step_cap=args.step_cap, batches=args.batches, save=save
        )
    ordered = [grids[b.name] for b in benches]
    heading = (
        f"oracle grid: {args.seeds} seeds per (B, lr), constant lr on a factor-2 grid, "
        f"step cap {args.step_cap}, CPU s = training only (process_time, 1 thread), "
        f"{os.cpu_count()} CPUs; load = 1-min load average before→after the task's grid"
    )
    print_table(heading, GRID_COLUMNS, grid_rows(ordered), args.markdown)
    print_table("grid per batch", BATCH_COLUMNS, batch_rows(ordered), args.markdown)
    for g in ordered:
        if g["skipped"]:
            print(
                f"{g['task']}: batches {g['skipped']} not reached within the cap (not in the fit)"
            )
    if args.grid_only:
        return 0

    results = []
    for bench in benches:
        print(f"{bench.name}: tune", file=sys.stderr, flush=True)
        result = tune_task(
            bench,
            grids[bench.name],
            tune_seeds=args.tune_seeds,
            seeds=args.seeds,
            step_cap=args.step_cap,
            time_budget=args.time_budget,
            timeout=args.tune_timeout,
            given_target=args.given_target,
        )
        fresh = (result.get("fastest_rerun") or {}).get("median_cpu_seconds")
        for answer in result["answers"]:
            answer["verdict"] = judge_answer(answer, grids[bench.name], fresh)
        result["goals"] = {
            g: majority([a["verdict"][g] for a in result["answers"]]) for g in "abcd"
        }
        results.append(result)
    print_table(
        "tune's answers (* good-lr range interpolated; ratio = CPU s to target ÷ the fastest grid "
        "cell rerun now, in brackets ÷ its grid value; cost ratio = tune CPU s ÷ grid CPU s)",
        TUNE_COLUMNS,
        tune_rows(results, grids),
        args.markdown,
    )
    pairs = {}
    for result in results:
        fit = grids[result["task"]].get("fit")
        noise = log_median([a["noise_scale"] for a in result["answers"] if a.get("noise_scale")])
        if fit is not None and noise is not None:
            pairs[result["task"]] = (fit["b_crit"], noise)
    errors = order_errors(pairs)
    order_ok = len(pairs) == len(results) and not errors
    goal_rows = [[r["task"]] + [_verdict(r["goals"][g]) for g in "abcd"] for r in results]
    print_table("goals per task (most of tune's seeds)", GOAL_COLUMNS, goal_rows, args.markdown)
    by_crit = sorted(pairs, key=lambda t: pairs[t][0])
    by_noise = sorted(pairs, key=lambda t: pairs[t][1])
    print(f"order by fitted B_crit: {', '.join(by_crit)}")
    print(f"order by tune's noise scale (log-median over seeds): {', '.join(by_noise)}")
    print(
        f"(a) order: {_verdict(order_ok)} ({len(errors)} order errors"
        + (": " + "; ".join(f"{a}/{b}" for a, b in errors) if errors else "")
        + f"; pairs with B_crit within {ORDER_TIE}× are not errors)"
    )
    passed = order_ok and all(r["goals"][g] is True for r in results for g in "abcd")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "machine": machine(),
                    "settings": {
                        **settings_record(args),
                        "tune_seeds": args.tune_seeds,
                        "given_target": args.given_target,
                    },
                    "grid": document,
                    "tune": results,
                    "order": {"pairs": pairs, "errors": errors, "pass": order_ok},
                    "pass": passed,
                },
                indent=1,
            )
            + "\n"
        )
    if args.quick:
        print(f"overall: {'PASS' if passed else 'FAIL'} (quick: goals not enforced)")
        return 0
    print(f"overall: {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
