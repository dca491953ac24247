"""``tune``: from a task to one recommendation, running every measurement in order.

memory limit → throughput curve → LR range test at a reference batch → noise scale during a short
training at that lr, its window set by the run's own progress → goodput → recommendation → the lr
checked by short runs at the recommended batch (√2 grid around the rule's lr) → (optional)
verification runs at ×0.5, ×1 and ×2 of the recommended batch, the practitioners'
halve-or-double check. Each phase's own result is kept, so the report can show the evidence
behind every number.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from batchpilot.checks import check_positive_float, check_positive_int, check_precision
from batchpilot.errors import BadInputError, BatchpilotError
from batchpilot.measure._hygiene import (
    MeasurementConditions,
    choose_threads,
    fixed_threads,
    seconds_since_process_start,
)
from batchpilot.measure._lr_check import (
    BetasCheck,
    LrCheck,
    check_betas,
    check_lr,
    with_adam_scaling,
)
from batchpilot.measure._lr_range import LRFinderResult, find_lr, stability_edge
from batchpilot.measure._memory_search import MaxBatchResult, find_max_batch
from batchpilot.measure._noise import WINDOW_SPACING, NoiseScaleResult, measure_noise_scale
from batchpilot.measure._throughput import ThroughputCurve, measure_throughput
from batchpilot.plan._goodput import StepsCriticalBatch
from batchpilot.plan._lr_rule import lr_for_batch
from batchpilot.plan._recommend import (
    Recommendation,
    recommend,
    with_checked_lr,
    with_measured_critical_batch,
    without_rescaled_betas,
)
from batchpilot.plan._split import BatchSplit, split_batch
from batchpilot.progress import NoProgress, PhaseProgress
from batchpilot.summary import TaskSummary, summarize_task
from batchpilot.task import Task
from batchpilot.training._loop import (
    RESOLVED_STEPS,
    evaluation_seconds,
    progress_evaluations,
    steps_to,
    train,
)

PHASES = (
    "memory",
    "throughput",
    "lr range test",
    "reference lr check",
    "noise scale",
    "recommendation",
    "lr check",
    "verify",
)

# The whole run's default wall-clock budget: every phase is sized to fit in it.
DEFAULT_TIME_BUDGET_SECONDS = 60.0
# Share of the budget for memory and throughput together (the later phases share what is left).
MEASURE_SHARE = 0.2


# Share of a command's --time-budget kept for writing the report once the phases are done (six
# plots and a page: 1-3 s on a 2-core machine, more under load).
REPORT_SHARE = 0.08
# Seeds per lr of the reference lr check: two, so that a tie (a median within the best's worst
# seed) can be seen at all; one seed has no spread to compare against.
REFERENCE_CHECK_SEEDS = 2
# Steps of the run that times what one lr-check run costs beyond its steps (model, optimizer,
# loader, its progress evaluations and the final one), before the check is sized.
PROBE_RUN_STEPS = 5


def phases_budget(total_seconds: float) -> float:
    """The seconds of a command's whole ``--time-budget`` left to tune's phases: less what the
    process has spent starting (importing torch, loading the task: seconds on a busy machine)
    and ``REPORT_SHARE`` kept for the report; never under a quarter of it.

    >>> 0.25 * 60 <= phases_budget(60.0) <= 60 * (1 - REPORT_SHARE)
    True
    """
    total = check_positive_float("time_budget", total_seconds)
    spent = seconds_since_process_start()
    return max(total * (1.0 - REPORT_SHARE) - spent, 0.25 * total)


class TuneIncomplete(BatchpilotError):
    """A phase failed or could not run: ``partial`` holds every result measured before it, as
    JSON-ready dicts, so a caller can still write them (the CLI writes ``result.json``)."""

    def __init__(self, phase: str, error: BaseException, partial: dict[str, Any]) -> None:
        super().__init__(f"{phase}: {error}")
        self.phase = phase
        self.error = error
        self.partial = partial


# Where ``tune`` reports progress: one bar per phase (the CLI draws them on stderr).
TuneProgress = PhaseProgress


@dataclass(frozen=True)
class TuneOptions:
    """Budgets and settings of every phase; defaults finish the built-in examples in a minute.

    ``precision`` (``"32"``, ``"bf16-mixed"``, ``"16-mixed"``) overrides the task's
    :attr:`~batchpilot.Task.precision`; ``None`` measures in the task's own.
    """

    device: str = "cpu"
    seed: int = 0
    world_size: int = 1
    reference_batch: int | None = None
    lr: float | None = None
    budget_bytes: int | None = None
    margin: float = 0.05
    max_batch: int | None = None
    memory_mode: str = "auto"
    throughput_steps: int = 3
    lr_steps: int = 100
    lr_repeats: int = 3
    min_lr: float = 1e-6
    max_lr: float = 10.0
    noise_steps: int = 2000
    noise_micro_batches: int = 4
    check_lr: bool = True
    check_seeds: int = 3
    target_loss: float | None = None
    verify: bool = False
    verify_epochs: float = 5.0
    time_budget_seconds: float | None = DEFAULT_TIME_BUDGET_SECONDS
    threads: int | None = None
    precision: str | None = None

    def __post_init__(self) -> None:
        check_positive_int("world_size", self.world_size)
        check_positive_int("throughput_steps", self.throughput_steps)
        check_positive_int("lr_steps", self.lr_steps)
        check_positive_int("lr_repeats", self.lr_repeats)
        check_positive_int("noise_steps", self.noise_steps)
        check_positive_int("check_seeds", self.check_seeds)
        check_positive_float("verify_epochs", self.verify_epochs)
        if self.noise_micro_batches < 2:
            raise BadInputError(
                f"noise_micro_batches: expected at least 2 (two batch sizes are compared), "
                f"got {self.noise_micro_batches}"
            )
        if self.reference_batch is not None:
            check_positive_int("reference_batch", self.reference_batch)
        if self.lr is not None:
            check_positive_float("lr", self.lr)
        if self.target_loss is not None:
            check_positive_float("target_loss", self.target_loss)
        if self.time_budget_seconds is not None:
            check_positive_float("time_budget", self.time_budget_seconds)
        if self.threads is not None:
            check_positive_int("threads", self.threads)
        if self.precision is not None:
            check_precision(self.precision)


@dataclass(frozen=True)
class VerifyRun:
    global_batch: int
    micro_batch: int
    accumulation_steps: int
    lr: float
    steps: int
    val_loss: float | None
    train_loss: float | None
    metric: float | None
    seconds: float
    diverged: bool

    @property
    def score(self) -> float | None:
        """Validation loss, or the final training loss when the task has no validation data."""
        return self.val_loss if self.val_loss is not None else self.train_loss


@dataclass(frozen=True)
class Verification:
    runs: tuple[VerifyRun, ...]
    best_batch: int
    epochs: float
    agrees: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": [asdict(run) for run in self.runs],
            "best_batch": self.best_batch,
            "epochs": self.epochs,
            "agrees": self.agrees,
        }


@dataclass(frozen=True)
class TuneResult:
    task: TaskSummary
    options: TuneOptions
    memory: MaxBatchResult
    throughput: ThroughputCurve
    lr_find: LRFinderResult
    noise: NoiseScaleResult | None
    recommendation: Recommendation
    verification: Verification | None
    lr_check: LrCheck | None = None
    reference_check: LrCheck | None = None
    betas_check: BetasCheck | None = None
    critical_batch: StepsCriticalBatch | None = None
    phase_seconds: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    conditions: MeasurementConditions | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "recommendation": self.recommendation.to_dict(),
            "precision": self.task.precision,
            "task": self.task.to_dict(),
            "options": asdict(self.options),
            "memory": self.memory.to_dict(),
            "throughput": self.throughput.to_dict(),
            "lr_find": self.lr_find.to_dict(),
            "noise": None if self.noise is None else self.noise.to_dict(),
            "verification": None if self.verification is None else self.verification.to_dict(),
            "lr_check": None if self.lr_check is None else self.lr_check.to_dict(),
            "reference_check": None
            if self.reference_check is None
            else self.reference_check.to_dict(),
            "betas_check": None if self.betas_check is None else self.betas_check.to_dict(),
            "critical_batch": None
            if self.critical_batch is None
            else self.critical_batch.to_dict(),
            "phase_seconds": dict(self.phase_seconds),
            "notes": list(self.notes),
            "conditions": None if self.conditions is None else self.conditions.to_dict(),
        }


def _optimizer_defaults(task: Task) -> tuple[tuple[float, float], float]:
    """The betas and eps the task's optimizer factory uses (Adam's defaults otherwise)."""
    model = torch.nn.Linear(1, 1)
    optimizer = task.make_optimizer(model.parameters(), 1e-3)
    group = optimizer.param_groups[0]
    betas = tuple(group.get("betas", (0.9, 0.999)))
    return (float(betas[0]), float(betas[1])), float(group.get("eps", 1e-8))


def tune(
    task: Task, options: TuneOptions | None = None, *, progress: TuneProgress | None = None
) -> TuneResult:
    """Run every phase on ``task`` and return the recommendation with each phase's evidence.

    Every measurement runs with one intra-op thread count, chosen at the start from the cores
    that are free (:func:`~batchpilot.measure._hygiene.choose_threads`), and every phase is sized
    to fit ``options.time_budget_seconds``. If a phase fails, :class:`TuneIncomplete` carries
    what was measured before it. Every phase runs in ``options.precision``, else the task's
    precision (memory, throughput, the range test, the noise scale and every training run).
    """
    options = options or TuneOptions()
    task = task.with_precision(options.precision)
    if task.train_size < 4:
        raise BadInputError(
            f"task: tune needs at least 4 training samples (the range test and the noise scale "
            f"train at a batch of 2 or more, half the data at most), got {task.train_size}"
        )
    device = torch.device(options.device)
    conditions = choose_threads(device, threads=options.threads)
    with fixed_threads(conditions.threads):
        return _tune(task, options, progress or NoProgress(), device, conditions)


def _tune(
    task: Task,
    options: TuneOptions,
    bar: TuneProgress,
    device: torch.device,
    conditions: MeasurementConditions,
) -> TuneResult:
    started = time.perf_counter()
    budget = options.time_budget_seconds
    seconds: dict[str, float] = {}
    notes: list[str] = []
    if conditions.busy:
        notes.append(
            f"The machine was busy when tune started (1-min load {conditions.load_1min:.1f} on "
            f"{conditions.cores} cores): measurements used {conditions.threads} thread(s) "
            f"({conditions.reason}); timings are noisier than on an idle machine."
        )
    partial: dict[str, Any] = {"conditions": conditions.to_dict(), "notes": notes}
    summary = summarize_task(task, device=device, seed=options.seed)
    partial["task"] = summary.to_dict()

    def timed(phase: str, run: Callable[[], Any]) -> Any:
        begin = time.perf_counter()
        try:
            value = run()
        except Exception as exc:
            seconds[phase] = time.perf_counter() - begin
            partial["phase_seconds"] = dict(seconds)
            raise TuneIncomplete(phase, exc, partial) from exc
        seconds[phase] = time.perf_counter() - begin
        partial["phase_seconds"] = dict(seconds)
        to_dict = getattr(value, "to_dict", None)
        if to_dict is not None:
            partial[phase.replace(" ", "_")] = to_dict()
        return value

    top = min(options.max_batch or task.train_size, task.train_size)
    measure_budget = None if budget is None else MEASURE_SHARE * budget
    # a step of seconds is no useful batch on a CPU; with a budget, no step may take 1 % of it
    max_step = None if budget is None else max(0.25, budget / 100)

    def memory_phase(max_batch: int | None) -> MaxBatchResult:
        bar.start("memory", 1)
        result: MaxBatchResult = timed(
            "memory",
            lambda: find_max_batch(
                task,
                device=device,
                budget_bytes=options.budget_bytes,
                margin=options.margin,
                max_batch=max_batch,
                mode=options.memory_mode,
                seed=options.seed,
            ),
        )
        bar.finish("memory", f"max micro-batch {result.max_micro_batch}")
        return result

    def throughput_phase(max_batch: int, share: float | None) -> ThroughputCurve:
        bar.start("throughput", 1)
        curve: ThroughputCurve = timed(
            "throughput",
            lambda: measure_throughput(
                task,
                max_batch=max_batch,
                device=device,
                timed_steps=options.throughput_steps,
                seed=options.seed,
                time_budget_seconds=share,
                max_step_seconds=max_step if device.type == "cpu" else None,
                stop_when_flat=device.type == "cpu",
                conditions=conditions,
            ),
        )
        bar.finish("throughput", f"knee at micro-batch {curve.knee_batch}")
        return curve

    if device.type == "cpu":
        # On a CPU, memory is probed only as far as throughput still rises: a batch of seconds
        # per step, or one past the point where doubling buys nothing, is no batch to train with.
        throughput = throughput_phase(top, measure_budget)
        memory = memory_phase(max(p.batch for p in throughput.points))
    else:
        memory = memory_phase(options.max_batch)
        left = None if measure_budget is None else measure_budget - seconds["memory"]
        throughput = throughput_phase(min(memory.max_micro_batch, top), left and max(left, 1.0))
    notes.extend(throughput.warnings)
    max_micro = min(memory.max_micro_batch, throughput.usable_max_batch)
    if throughput.usable_max_batch < max(p.batch for p in throughput.points):
        notes.append(
            f"Micro-batches above {throughput.usable_max_batch} ran slower than the step-time fit "
            "(the speed saturates there): they are not used."
        )

    asked = options.reference_batch or task.reference_batch or 32
    reference_batch = max(2, min(asked, max_micro, task.train_size // 2))
    if reference_batch != asked:
        limit = (
            f"the largest usable micro-batch, {max_micro}"
            if reference_batch == max_micro
            else f"half the {task.train_size}-sample training set"
            if reference_batch == task.train_size // 2
            else "the smallest batch the noise scale can split, 2"
        )
        notes.append(
            f"Reference batch {asked} (of the range test and the noise scale) lowered to "
            f"{reference_batch}: {limit}."
        )
    lr_steps, lr_repeats, noise_steps, verify_epochs = _fit_budget(
        options,
        throughput,
        reference_batch,
        task.train_size,
        spent=time.perf_counter() - started,
        notes=notes,
    )

    bar.start("lr range test", lr_steps * lr_repeats)
    lr_find_result: LRFinderResult = timed(
        "lr range test",
        lambda: find_lr(
            task,
            micro_batch=reference_batch,
            min_lr=options.min_lr,
            max_lr=options.max_lr,
            steps=lr_steps,
            repeats=lr_repeats,
            seed=options.seed,
            device=device,
            on_step=lambda done, total: bar.update("lr range test", done),
        ),
    )
    good_lr = options.lr or lr_find_result.suggestion or task.reference_lr
    edge = stability_edge(lr_find_result)
    if good_lr is None and edge is not None and options.check_lr:
        # No descent and no lr known: an order of magnitude below where the test broke down
        # (or its top), as Smith (2017) reads a range test; the check at the batch corrects it.
        good_lr = edge / 10
        notes.append(
            f"The range test found no descent ({lr_find_result.message}) and the task has no "
            f"reference lr: training started from {good_lr:.3g}, a tenth of {edge:.3g} where the "
            "test stopped, and the lr check at the recommended batch chose the lr."
        )
    if good_lr is None:
        raise TuneIncomplete(
            "lr range test",
            BadInputError(
                "lr: the range test found no descent and the task has no reference lr; give "
                f"--lr ({lr_find_result.message})"
            ),
            partial,
        )
    if options.lr is None and lr_find_result.suggestion is None and task.reference_lr:
        notes.append(
            f"The range test found no descent ({lr_find_result.message}); the task's reference lr "
            f"{good_lr:g} was used."
        )
    bar.finish("lr range test", f"lr {good_lr:.3g} at batch {reference_batch}")
    reference_check: LrCheck | None = None
    if options.check_lr and options.lr is None:
        # The noise scale depends on where training goes, and so on the lr it trains at: the
        # range test's reading (seeds spread it 2-3×) is checked by a run of the range test's
        # length at the lr grid points around it, so the noise run trains at a checked lr.
        share = None
        if budget is not None:
            share = max(0.15 * (budget - (time.perf_counter() - started)), 1.0)
        read_lr = good_lr
        reference_check = timed(
            "reference lr check",
            lambda: check_lr(
                task,
                rule_lr=read_lr,
                micro_batch=reference_batch,
                steps=lr_steps,
                seeds=REFERENCE_CHECK_SEEDS,
                seed=options.seed,
                device=device,
                time_budget_seconds=share,
            ),
        )
        assert reference_check is not None
        if reference_check.lr != good_lr:
            notes.append(
                f"Reference lr {good_lr:.3g} at batch {reference_batch} checked by {lr_steps}-step "
                f"runs: {reference_check.lr:.3g} ({reference_check.reason})."
            )
        good_lr = reference_check.lr
    reach = _reached_by(reference_check)
    if budget is not None:
        # re-plan the noise phase from the range test's own seconds per step (the throughput
        # fit's estimate misses evaluation, data loading and load that came since)
        per_step = seconds["lr range test"] / max(lr_steps * lr_repeats, 1)
        left = budget - (time.perf_counter() - started)
        share = _later_shares(options)["noise scale"]
        noise_seconds = max(share * left, 1.0)
        noise_step = per_step * _noise_step_cost(
            throughput, reference_batch, micro_batches_for(options, reference_batch)
        )
        affordable = max(20, int(share * left / max(noise_step, 1e-9)))
        if affordable < noise_steps:
            notes.append(
                f"Noise scale: {affordable} steps instead of {noise_steps}, to stay within the "
                f"time budget (the range test ran at {per_step * 1e3:.1f} ms per step)."
            )
            noise_steps = affordable

    else:
        noise_seconds = None
    micro_batches = micro_batches_for(options, reference_batch)
    noise: NoiseScaleResult | None = None
    bar.start("noise scale", noise_steps)
    if reference_batch % micro_batches == 0:
        noise = timed(
            "noise scale",
            lambda: measure_noise_scale(
                task,
                batch=reference_batch,
                steps=noise_steps,
                lr=good_lr,
                micro_batches=micro_batches,
                device=device,
                seed=options.seed,
                on_step=lambda step, loss: bar.update("noise scale", step + 1),
                window=True,
                time_budget_seconds=noise_seconds,
                reach=reach,
            ),
        )
    else:
        notes.append(f"Batch {reference_batch} cannot be split in micro-batches: no noise scale.")
    noise_scale = None
    if noise is not None and math.isfinite(noise.plan_noise_scale) and noise.plan_noise_scale > 0:
        noise_scale = noise.plan_noise_scale
    bar.finish(
        "noise scale",
        f"B_crit ≈ {noise_scale:.0f} over {noise.window_steps} steps"
        if noise is not None and noise_scale
        else "not measured",
    )

    bar.start("recommendation", 1)
    betas, eps = _optimizer_defaults(task)

    def plan(noise_scale: float | None, interval: tuple[float, float] | None) -> Recommendation:
        return recommend(
            train_size=task.train_size,
            max_micro_batch=max_micro,
            reference_batch=reference_batch,
            reference_lr=good_lr,
            optimizer_name=summary.optimizer,
            reduction=task.reduction,
            world_size=options.world_size,
            noise_scale=noise_scale,
            throughput=throughput,
            knee_batch=throughput.knee_batch,
            betas=betas,
            eps=eps,
            has_batchnorm=summary.has_batchnorm,
            noise_lr=None if noise is None else noise.lr,
            max_global_batch=options.max_batch * options.world_size if options.max_batch else None,
            noise_interval=interval,
            window_steps=None if noise is None else noise.window_steps,
            stable_lr=edge,
        )

    recommendation: Recommendation = timed(
        "recommendation",
        lambda: plan(
            noise_scale,
            None if noise is None or noise_scale is None else noise.plan_interval,
        ),
    )
    bar.finish("recommendation", f"batch {recommendation.global_batch}, lr {recommendation.lr:.3g}")

    lr_checked: LrCheck | None = None
    betas_checked: BetasCheck | None = None
    steps_critical: StepsCriticalBatch | None = None
    if options.check_lr:
        target = _target(options, noise)
        plain_step = seconds["lr range test"] / max(lr_steps * lr_repeats, 1)
        check_budget = None
        if budget is not None:
            left = budget - (time.perf_counter() - started)
            check_budget = max(_later_shares(options, after_noise=True)["lr check"] * left, 1.0)
        checks = timed(
            "lr check",
            lambda: _check(
                task,
                recommendation,
                options,
                max_micro,
                throughput,
                reference_step=plain_step,
                fallback_steps=options.lr_steps if noise is None else noise.window_steps,
                target_loss=target,
                budget=check_budget,
                notes=notes,
                bar=bar,
            ),
        )
        assert checks is not None
        lr_checked, betas_checked = checks
        if betas_checked is not None and not betas_checked.keep_rescaled:
            recommendation = without_rescaled_betas(recommendation, betas_checked.reason)
        elif betas_checked is None and recommendation.betas is not None:
            # not checked (no time left, or no finite run at the chosen lr): no evidence to
            # change settings the user did not ask to change
            recommendation = without_rescaled_betas(
                recommendation, "not checked, so the optimizer's own are kept"
            )
        recommendation = with_checked_lr(
            recommendation,
            lr_checked.lr,
            reason=lr_checked.reason,
            verified_runs=lr_checked.seeds if lr_checked.stable else 0,
            stable_lr=edge,
        )
        measured = _critical_from_steps(
            noise, lr_checked, reference_batch, task.train_size, lr_checked.target_loss
        )
        if measured is not None and not _resolved(measured):
            notes.append(
                f"The critical batch through the steps at two batches is not used: the target "
                f"loss {measured.target_loss:.4g} was reached in {measured.reference_steps:.3g} "
                f"steps at batch {measured.reference_batch} and {measured.steps:.3g} at batch "
                f"{measured.batch}, and a count under {RESOLVED_STEPS:.0f} steps is the first "
                "updates' granularity, not a training speed (it would read B_crit ≈ "
                f"{measured.critical_batch:,.0f}); the gradient noise scale is kept."
            )
        if measured is not None and _resolved(measured) and 0 < measured.critical_batch < math.inf:
            recommendation = with_measured_critical_batch(recommendation, measured)
            replanned = plan(measured.critical_batch, measured.interval)
            if replanned.global_batch != recommendation.global_batch:
                notes.append(
                    f"With the critical batch measured through steps at two batches "
                    f"({measured.critical_batch:,.0f}, against the noise scale's "
                    f"{noise_scale or math.nan:,.0f}) the goodput plan would choose global batch "
                    f"{replanned.global_batch}, not {recommendation.global_batch}; the lr was "
                    "checked at the latter only, which is the one recommended."
                )
        steps_critical = measured
        partial["recommendation"] = recommendation.to_dict()
        partial["critical_batch"] = None if measured is None else measured.to_dict()

    verification = None
    if options.verify:
        verification = timed(
            "verify",
            lambda: _verify(
                task,
                recommendation,
                summary,
                options,
                max_micro,
                throughput,
                betas,
                eps,
                verify_epochs,
                bar,
            ),
        )
    seconds["total"] = time.perf_counter() - started
    if budget is not None and seconds["total"] > 1.1 * budget:
        notes.append(
            f"tune took {seconds['total']:.0f} s against a budget of {budget:g} s: the phases' "
            "minimum step counts did not fit (a slow step, or a busy machine)."
        )
    return TuneResult(
        task=summary,
        options=options,
        memory=memory,
        throughput=throughput,
        lr_find=lr_find_result,
        noise=noise,
        recommendation=recommendation,
        verification=verification,
        lr_check=lr_checked,
        reference_check=reference_check,
        betas_check=betas_checked,
        critical_batch=steps_critical,
        phase_seconds=seconds,
        notes=tuple(notes),
        conditions=conditions,
    )


def _reached_by(check: LrCheck | None) -> tuple[float, int] | None:
    """(loss, steps): the median loss the check's chosen lr reached and the steps it ran, the
    evidence the noise run (same lr, same batch) is not to stop above; None without one."""
    chosen = None if check is None else next((t for t in check.trials if t.lr == check.lr), None)
    if check is None or chosen is None or not math.isfinite(chosen.median):
        return None
    return chosen.median, chosen.steps or check.steps


def _target(options: TuneOptions, noise: NoiseScaleResult | None) -> float | None:
    """The loss the lr check and the two-batch critical batch count steps to: the user's
    ``target_loss``, else the noise window's (:attr:`NoiseScaleResult.target_loss`)."""
    if options.target_loss is not None:
        return options.target_loss
    return None if noise is None else noise.target_loss


def _critical_from_steps(
    noise: NoiseScaleResult | None,
    check: LrCheck,
    reference_batch: int,
    train_size: int,
    target: float | None,
) -> StepsCriticalBatch | None:
    """The critical batch through the steps to ``target`` at two batches: the noise run's at
    the reference batch, the lr check's median at its chosen lr (when it scored by steps to
    that loss); None when either is missing, or the noise run never reached it."""
    at_batch = next((t for t in check.trials if t.lr == check.lr), None)
    if noise is None or target is None or check.score != "steps to target" or at_batch is None:
        return None
    if check.deepened_from is not None:
        # a check that looked past a plateau counts the steps until its runs stay below a loss,
        # not the first crossing the noise run's steps are read as: not one quantity
        return None
    reached = [r for r in at_batch.reached if math.isfinite(r)]
    reference_steps = steps_to(noise.progress, target)
    if not reached or not math.isfinite(reference_steps):
        return None
    return StepsCriticalBatch.measure(
        target,
        reference=(reference_batch, reference_steps),
        reference_resolution=WINDOW_SPACING / 2,
        checked=(check.global_batch, at_batch.median_steps, (min(reached), max(reached))),
        dataset_size=train_size,
    )


def _resolved(measured: StepsCriticalBatch) -> bool:
    """Whether a critical batch through the steps at two batches rests on step counts of at
    least ``RESOLVED_STEPS`` at both: a loss reached within the first few steps is read to a
    whole step, and the ratio of two such counts is the first updates' granularity (Adam's first
    steps move every weight by about the lr at any batch), not the law ``S(B) = S_min (1 +
    B_crit / B)`` it is read through."""
    return min(measured.reference_steps, measured.steps) >= RESOLVED_STEPS


def _later_shares(options: TuneOptions, *, after_noise: bool = False) -> dict[str, float]:
    """How the time left after the range test (``after_noise``: after the noise scale) is shared
    among the phases still to run."""
    weights = {
        "noise scale": 0.0 if after_noise else 0.35,
        "lr check": 0.35 if options.check_lr else 0.0,
        "verify": 0.3 if options.verify else 0.0,
    }
    total = sum(weights.values()) or 1.0
    return {phase: weight / total for phase, weight in weights.items()}


def _check(
    task: Task,
    recommendation: Recommendation,
    options: TuneOptions,
    max_micro: int,
    throughput: ThroughputCurve,
    *,
    reference_step: float,
    fallback_steps: int,
    target_loss: float | None,
    budget: float | None,
    notes: list[str],
    bar: TuneProgress,
) -> tuple[LrCheck, BetasCheck | None]:
    """Short runs at the recommended batch around the rule's lr (:func:`check_lr`), sized to the
    steps the plan predicts to the noise window's loss (``target_loss``, which lengthens them
    while the best lr has not reached it) and to the time left, with the optimizer's own betas;
    for Adam, whose rule rescales them, then the rescaled betas at the chosen lr
    (:func:`check_betas`)."""
    batch = min(recommendation.global_batch, task.train_size)
    split = split_batch(batch, max_micro_batch=max_micro, speed=throughput)
    reference = recommendation.reference_batch
    if recommendation.predicted_steps is not None and math.isfinite(recommendation.predicted_steps):
        steps = recommendation.predicted_steps
    else:  # no noise scale: the window's samples again
        steps = fallback_steps * reference / batch
    steps_wanted = max(10, min(round(steps), 100_000))
    steps = steps_wanted
    seeds = options.check_seeds
    # a step at the batch, from the fit, scaled by how the range test's real steps compared
    fit_reference = reference / max(throughput.samples_per_second_at(reference), 1e-12)
    fit_batch = (
        split.accumulation_steps
        * split.micro_batch
        / max(throughput.samples_per_second_at(split.micro_batch), 1e-12)
    )
    step_seconds = fit_batch * max(1.0, reference_step / max(fit_reference, 1e-12))
    run_seconds = None
    if budget is not None:
        run_seconds = _run_cost(task, split, recommendation.lr, step_seconds, options)
        while seeds > 1 and 3 * seeds * run_seconds(steps) > budget:
            seeds -= 1
        while steps > 10 and 3 * seeds * run_seconds(steps) > budget:
            steps = max(10, int(steps * 0.8))
        if (seeds, steps) != (options.check_seeds, steps_wanted):
            notes.append(
                f"lr check: {seeds} seed(s) × {steps} steps per lr instead of "
                f"{options.check_seeds} × {steps_wanted}, to stay within the time budget."
            )
    bar.start("lr check", 3 * seeds)
    # The lr is checked with the optimizer's own betas and eps (the rule's fallback, lr · √κ);
    # Adam's rescaled ones (Malladi et al. 2022) are then tried at the chosen lr, and kept only if
    # they train clearly better: a setting the user did not ask to change changes on evidence.
    result = check_lr(
        task,
        rule_lr=recommendation.lr,
        micro_batch=split.micro_batch,
        accumulation_steps=split.accumulation_steps,
        steps=steps,
        seeds=seeds,
        seed=options.seed,
        device=options.device,
        time_budget_seconds=budget,
        on_run=lambda done: bar.update("lr check", done * seeds),
        target_loss=target_loss,
        # a loss the user gave is the one they train to, plateau or not
        look_past_plateau=options.target_loss is None,
    )
    betas = None
    if recommendation.lr_rule == "adam" and recommendation.betas is not None:
        left = None if budget is None else budget - result.seconds
        if left is not None and run_seconds and left < seeds * run_seconds(result.steps):
            notes.append(
                f"Adam's rescaled betas and eps were not checked: {max(left, 0):.1f} s of the lr "
                f"check's {budget:.0f} s were left, and one more lr takes about "
                f"{seeds * run_seconds(result.steps):.1f} s; the optimizer's own are kept."
            )
        else:
            rescaled = with_adam_scaling(task, ref_batch=reference, batch=batch)
            betas = check_betas(rescaled, result, seed=options.seed, device=options.device)
    bar.finish("lr check", f"lr {result.lr:.3g} ({'rule' if result.kept_rule else 'checked'})")
    return result, betas


def _run_cost(
    task: Task, split: BatchSplit, lr: float, step_seconds: float, options: TuneOptions
) -> Callable[[int], float]:
    """Seconds one lr-check run of a given number of steps takes. Beyond its steps, a run
    following the progress signal evaluates it at every progress point and the whole validation
    set at its end (on a small batch that costs more than the steps), and builds its model,
    optimizer and loader: a real ``PROBE_RUN_STEPS``-step run measures all that once, and one
    timed evaluation what each further progress point adds."""
    progress_eval = evaluation_seconds(task, device=options.device)
    begin = time.perf_counter()
    train(
        task,
        micro_batch=split.micro_batch,
        accumulation_steps=split.accumulation_steps,
        lr=lr,
        steps=PROBE_RUN_STEPS,
        seed=options.seed,
        device=options.device,
        progress=True,
    )
    probe_run = time.perf_counter() - begin
    probe_points = progress_evaluations(PROBE_RUN_STEPS)

    def run_seconds(steps: int) -> float:
        more_steps = max(steps - PROBE_RUN_STEPS, 0)
        more_points = max(progress_evaluations(steps) - probe_points, 0)
        return probe_run + more_steps * step_seconds + more_points * progress_eval

    return run_seconds


def micro_batches_for(options: TuneOptions, batch: int) -> int:
    """The micro-batches the noise scale splits ``batch`` into: the asked number, lowered until
    it divides the batch (the estimator compares the micro-batch and batch gradients)."""
    micro_batches = options.noise_micro_batches
    while micro_batches > 2 and batch % micro_batches:
        micro_batches -= 1
    return micro_batches


def _noise_step_cost(throughput: ThroughputCurve, batch: int, micro_batches: int) -> float:
    """A noise-scale step against a plain step at ``batch``: it runs ``micro_batches`` forward
    and backward passes of ``batch / micro_batches`` samples, so by the step-time model it costs
    ``micro_batches · T(batch / micro_batches) / T(batch)`` times as much."""
    micro = max(1, batch // micro_batches)
    plain = batch / max(throughput.samples_per_second_at(batch), 1e-12)
    split = micro / max(throughput.samples_per_second_at(micro), 1e-12)
    return max(1.0, micro_batches * split / plain)


def _fit_budget(
    options: TuneOptions,
    throughput: ThroughputCurve,
    batch: int,
    train_size: int,
    *,
    spent: float,
    notes: list[str],
) -> tuple[int, int, int, float]:
    """Shrink the later phases' step counts to fit ``--time-budget``, from measured step times."""
    lr_steps, repeats, noise_steps = options.lr_steps, options.lr_repeats, options.noise_steps
    verify_epochs = options.verify_epochs
    if options.time_budget_seconds is None:
        return lr_steps, repeats, noise_steps, verify_epochs
    step_seconds = batch / max(throughput.samples_per_second_at(batch), 1e-9)
    left = max(options.time_budget_seconds - spent, 0.0)
    if options.check_lr:
        shares = (0.2, 0.25, 0.25) if options.verify else (0.3, 0.35, 0.0)
    else:
        shares = (0.4, 0.3, 0.3) if options.verify else (0.55, 0.45, 0.0)
    lr_budget = int(shares[0] * left / step_seconds)
    while repeats > 1 and lr_steps * repeats > lr_budget:
        repeats -= 1
    lr_steps = max(20, min(lr_steps, lr_budget // repeats))
    noise_step = step_seconds * _noise_step_cost(throughput, batch, options.noise_micro_batches)
    noise_steps = max(20, min(noise_steps, int(shares[1] * left / noise_step)))
    if options.verify:
        # three runs of equal epochs at ×0.5, ×1, ×2 the batch: ~3 × epochs × train_size samples
        affordable = shares[2] * left / (3 * step_seconds * train_size / batch)
        verify_epochs = max(0.5, min(verify_epochs, affordable))
    if (lr_steps, repeats, noise_steps, verify_epochs) != (
        options.lr_steps,
        options.lr_repeats,
        options.noise_steps,
        options.verify_epochs,
    ):
        notes.append(
            f"--time-budget {options.time_budget_seconds:g} s: range test {lr_steps} steps × "
            f"{repeats}, noise scale {noise_steps} steps"
            + (f", verification {verify_epochs:.2g} epochs" if options.verify else "")
            + f" (a step at batch {batch} takes {step_seconds * 1e3:.1f} ms)."
        )
    return lr_steps, repeats, noise_steps, verify_epochs


def _verify(
    task: Task,
    recommendation: Recommendation,
    summary: TaskSummary,
    options: TuneOptions,
    max_micro: int,
    throughput: ThroughputCurve,
    betas: tuple[float, float],
    eps: float,
    epochs: float,
    bar: TuneProgress,
) -> Verification:
    """The halve-or-double check: train at ×0.5, ×1 and ×2 the batch for equal epochs, keep the best."""
    batch = recommendation.global_batch
    ladder = [b for b in (batch // 2, batch, batch * 2) if 1 <= b <= task.train_size]
    bar.start("verify", len(ladder))
    runs = []
    for done, global_batch in enumerate(ladder):
        # one device stands in for world_size devices: the same global batch by accumulation
        split = split_batch(global_batch, max_micro_batch=max_micro, speed=throughput)
        # from the final lr at the recommended batch (checked, when the check ran)
        lr = lr_for_batch(
            recommendation.lr,
            ref_batch=recommendation.global_batch,
            batch=global_batch,
            optimizer=summary.optimizer,
            reduction=task.reduction,
            noise_scale=recommendation.noise_scale,
            betas=betas,
            eps=eps,
        ).lr
        result = train(
            task,
            micro_batch=split.micro_batch,
            accumulation_steps=split.accumulation_steps,
            lr=lr,
            epochs=epochs,
            device=options.device,
            seed=options.seed,
        )
        final = result.final
        tail = result.train_losses[-10:]
        runs.append(
            VerifyRun(
                global_batch=global_batch,
                micro_batch=split.micro_batch,
                accumulation_steps=split.accumulation_steps,
                lr=lr,
                steps=result.steps,
                val_loss=None if final is None else final.loss,
                train_loss=sum(tail) / len(tail) if tail else None,
                metric=None if final is None else final.metric,
                seconds=result.seconds,
                diverged=result.diverged,
            )
        )
        bar.update("verify", done + 1)
    scored = [r for r in runs if r.score is not None and not r.diverged]
    best = min(scored, key=lambda r: r.score or math.inf).global_batch if scored else batch
    bar.finish("verify", f"best batch {best}")
    return Verification(runs=tuple(runs), best_batch=best, epochs=epochs, agrees=best == batch)
