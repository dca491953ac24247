"""Checking an lr at the batch it will train with: short runs on a √2 grid around the rule's lr.

A scaling rule (linear, square-root, noise-aware, Adam's) carries an lr measured at one batch to
another, and every input to it is a measurement with its own noise: the range test's lr, the noise
scale. :func:`check_lr` trains the new batch at the grid point nearest the rule's lr and at its
neighbours (``×√2``, ``÷√2``), with a few seeds each. The grid is fixed (powers of √2, as in
:func:`~batchpilot.measure._lr_range.verification_candidates`), so two runs whose rule lrs differ
a little propose the same lrs, and adjacent answers differ by at most ×1.41.

**Score.** Given the loss the run is meant to reach (``target_loss``, the noise-scale window's),
every seed stops at the first progress point at or below it and scores its steps to it (log-loss
interpolation, :func:`~batchpilot.training.steps_to`): the question a practitioner asks is "how
soon does this lr get there", and steps to a target do not depend on how long the check ran
past it. Until some candidate's median reaches the target the check scores by the loss after its
steps (validation loss, or the mean training loss over the last tenth). Without a target it
always scores by loss.

**Ties.** An lr ties with the best candidate (the lowest median) unless the best beat it both
ways: its median past the best's worst seed, and seed against seed in every seed. Seeds are
paired — seed ``s`` is the same initialisation and data order at every lr — so the second test
compares lrs on the same draw, where an offset between draws (one seed's validation loss sits
0.03 above another's at every lr on a noisy task) cancels; the first keeps a candidate whose
every seed lost by less than the spread between seeds. Scored by steps, the reach and each
seed's margin are one progress interval (``PROGRESS_SPACING`` of the steps) longer: a seed's
steps are read between two progress points, and seeds that cross the target between the same two
points agree more closely than the measurement resolves. A tie's ends are thus where the best is
ahead by every measure, on the rising sides of the optimum, not where one noisy seed put them.

**Bracketing.** The grid grows until the tie is bounded on both sides by an lr that is clearly
worse (outside the tie) or diverged, the optimum interior as in a grid search done by hand
(Shallue et al. 2019 re-tune the lr at every batch for the same reason). While the best sits at
the edge of what was tried, the steps grow (×√2, ×2, ×4, …: a rule's lr can be off by an order of
magnitude, and a walk of √2 steps would not get there); the gaps next to the tie are then filled
in. A loss that sits on a plateau, where every lr ties, is pushed up the grid until some lr leaves
it.

**Horizon.** Short runs favour large lrs (Wu et al. 2018, "short-horizon bias"): an lr that is
fastest for 50 steps may stall above the loss a longer run reaches. With a target, the check
doubles its horizon while no candidate's median has reached it or while a seed of the best has
not; candidates whose every seed reached it (and diverged ones) keep their result, the others
are re-run. Without a target it doubles while the tie is wider than the grid resolves
(``MAX_TIE_SPAN``: runs too short to tell the lrs apart, as on a plateau). It decides at the
longest horizon it ran.

**Deepening.** A target the best lr reaches in fewer than ``RESOLVED_STEPS`` steps, when the runs
moved less from where they started to it than they differ from each other (after their first
step, or at their end: a loss on a plateau, a hair below the start), ranks the first updates, not
the training: a wide tie there says nothing. The tie's top ``DEEP_LRS`` lrs, ×2 apart (a plateau
is left sooner by a larger lr), then train without a target for as long as the time left allows
(``MAX_DEEPENING`` times the last horizon at most), and are scored by the steps until they stay
at or below a loss taken from those runs: halfway in log-loss from the target to the deepest loss
one of them ended at in every seed. Where the plateau ends depends on the lr, and that is what
the deeper loss sees; when no lr came down from the target (in every seed) by more than one lr's
seeds differ after one step, they are still on the plateau and the tie stands.

**Decision.** The grid point at the centre of the final tie (of two middle points, the one with
the lower median): a flat optimum answers its middle whatever noise ranked first, a sharp one its
best.

>>> round(grid_point(0.1), 4), round(grid_point(0.3), 4)
(0.0884, 0.3536)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np
import torch

from batchpilot.checks import check_positive_float, check_positive_int
from batchpilot.plan._lr_rule import lr_for_batch
from batchpilot.task import Task
from batchpilot.training._loop import PROGRESS_SPACING, RESOLVED_STEPS, steps_to, train

GRID_FACTOR = math.sqrt(2.0)
# The most lrs one horizon may add to those it starts with while bracketing the tie: with steps
# of ×√2, ×2, ×4, ×16 the grid reaches a factor 256 past its first points, and fills the gaps.
MAX_NEW_LRS = 9
# How many times the horizon may double while the best has not reached the target loss, or while
# the tie is wider than MAX_TIE_SPAN grid points (×2 from end to end: the centre of such a tie is
# within ×√2 of every lr in it, the resolution the grid promises).
MAX_DOUBLINGS = 3
MAX_TIE_SPAN = 2
# How many shallower losses a tie by steps to the target, wider than MAX_TIE_SPAN, is re-read at
# (each halfway to the one before in log-loss, from where the runs started).
MAX_NARROWINGS = 3
# How many times its last horizon a deepened check's runs may train (the longest power of two up
# to it that fits the time left): a target reached within the first updates ranks nothing, and
# the descent that does (the escape from a plateau) comes hundreds of steps later.
MAX_DEEPENING = 64
# How many of a plateau tie's lrs (its top ones, ×2 apart) those longer runs train.
DEEP_LRS = 3


def grid_point(lr: float) -> float:
    """The power of √2 nearest ``lr`` in log scale."""
    exponent = round(math.log(check_positive_float("lr", lr)) / math.log(GRID_FACTOR))
    return float(GRID_FACTOR**exponent)


@dataclass(frozen=True)
class LrTrial:
    """One candidate lr: its loss per seed (validation loss after the run, or the mean training
    loss over its last tenth), their median, whether a seed diverged, the steps it was given,
    and, with a target loss, each seed's steps to it (``reached``; infinite when a seed did not
    get there within ``steps``) and its progress signal up to there (``progress``)."""

    lr: float
    losses: tuple[float, ...]
    median: float
    diverged: bool
    steps: int = 0
    reached: tuple[float, ...] = ()
    progress: tuple[tuple[tuple[int, float], ...], ...] = ()

    @property
    def median_steps(self) -> float:
        """The median steps to the target over the seeds (infinite unless most reached it)."""
        if self.diverged or not self.reached:
            return math.inf
        return float(np.median(self.reached))


@dataclass(frozen=True)
class LrCheck:
    """Short runs at one batch around a rule's lr, and the lr they choose. ``deepened_from``:
    the target the check was asked for when it was deepened (``target_loss`` is then the deeper
    loss its last runs were scored by; see the module docstring)."""

    global_batch: int
    micro_batch: int
    accumulation_steps: int
    steps: int
    seeds: int
    rule_lr: float
    rule_grid_lr: float
    trials: tuple[LrTrial, ...]
    best_lr: float | None
    lr: float
    kept_rule: bool
    reason: str
    split: str
    seconds: float
    complete: bool
    horizons: tuple[int, ...] = ()
    earlier: tuple[LrTrial, ...] = ()
    target_loss: float | None = None
    reached: bool | None = None
    score: Score = "loss"
    deepened_from: float | None = None

    @property
    def steps_to_target(self) -> float | None:
        """The median steps to the target loss at the chosen lr, when the check scored by them."""
        trial = next((t for t in self.trials if t.lr == self.lr), None)
        if self.score != "steps to target" or trial is None:
            return None
        return trial.median_steps

    @property
    def stable(self) -> bool:
        """Every seed at the chosen lr trained without diverging (at a constant lr, no warm-up)."""
        return any(t.lr == self.lr and not t.diverged for t in self.trials)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["trials"] = [_trial_dict(trial) for trial in self.trials]
        data["earlier"] = [_trial_dict(trial) for trial in self.earlier]
        data["horizons"] = list(self.horizons)
        data["stable"] = self.stable
        data["steps_to_target"] = self.steps_to_target
        return data


def _seed_run(
    task: Task,
    lr: float,
    seed: int,
    *,
    micro_batch: int,
    accumulation_steps: int,
    steps: int,
    device: torch.device | str,
    target_loss: float | None,
    progress: bool = False,
) -> tuple[float, float, tuple[tuple[int, float], ...]]:
    """One training run: its loss (validation loss at its end, else the mean training loss over
    its last tenth; infinite when it diverged), its steps to ``target_loss`` (infinite when it
    did not get there; the run ends once it does) and its progress signal."""
    run = train(
        task,
        micro_batch=micro_batch,
        accumulation_steps=accumulation_steps,
        lr=lr,
        steps=steps,
        seed=seed,
        device=device,
        target_loss=target_loss,
        progress=progress,
    )
    if run.diverged:
        return math.inf, math.inf, run.progress
    final = run.final
    if final is not None:
        loss = final.loss
    else:
        loss = float(np.mean(run.train_losses[-max(1, len(run.train_losses) // 10) :]))
    if not math.isfinite(loss):
        return math.inf, math.inf, run.progress
    return loss, run.steps_to_target, run.progress


def _trial(
    task: Task,
    lr: float,
    *,
    seeds: range,
    micro_batch: int,
    accumulation_steps: int,
    steps: int,
    device: torch.device | str,
    target_loss: float | None = None,
    progress: bool = False,
) -> LrTrial:
    """Train ``task`` at ``lr`` for ``steps`` steps, once per seed (each ending early at
    ``target_loss``): the candidate's trial (its median infinite when a seed diverged).
    ``progress`` keeps each seed's progress signal also without a target (``reached`` is then
    filled in by whoever picks the loss, :func:`_at_level`)."""
    runs = [
        _seed_run(
            task,
            lr,
            seed,
            micro_batch=micro_batch,
            accumulation_steps=accumulation_steps,
            steps=steps,
            device=device,
            target_loss=target_loss,
            progress=progress,
        )
        for seed in seeds
    ]
    losses = tuple(loss for loss, _, _ in runs)
    diverged = any(math.isinf(loss) for loss in losses)
    median = math.inf if diverged else float(np.median(losses))
    reached = tuple(r for _, r, _ in runs) if target_loss is not None else ()
    kept = tuple(p for _, _, p in runs) if target_loss is not None or progress else ()
    return LrTrial(lr, losses, median, diverged, steps, reached, kept)


def _trial_dict(trial: LrTrial) -> dict[str, Any]:
    return asdict(trial) | {
        "losses": list(trial.losses),
        "reached": list(trial.reached),
        "median_steps": trial.median_steps,
        "progress": [[list(point) for point in seed] for seed in trial.progress],
    }


Score = Literal["loss", "steps to target"]


def _scored(trials: dict[float, LrTrial]) -> tuple[Score, dict[float, LrTrial]]:
    """What the check compares its lrs by, and the trials as that score sees them.

    Steps to the target loss, once some lr reached it in most seeds: the fewest steps to the
    loss the run must reach is what a grid search to a target measures (Shallue et al. 2019),
    and unlike the loss at a horizon it does not depend on how long the check happened to run
    (an overfitting task's best lr at a horizon falls as the horizon grows; a loss at the float
    floor compares noise). Else the loss at the horizon. In the steps view a trial's ``losses``
    are its seeds' steps (infinite: not reached), ``median`` their median.
    """
    if not any(math.isfinite(t.median_steps) for t in trials.values()):
        return "loss", trials
    return "steps to target", {
        lr: replace(t, losses=t.reached, median=t.median_steps) for lr, t in trials.items()
    }


@dataclass(frozen=True)
class BetasCheck:
    """Adam's rescaled betas and eps against the optimizer's own, at the lr and horizon the lr
    check chose with the optimizer's own.

    The rescaled ones are kept when they train to a lower median loss and the optimizer's own do
    not tie with them (their median above the rescaled runs' worst seed): a setting the user
    did not ask to change changes only on evidence.
    """

    lr: float
    steps: int
    rescaled: LrTrial
    unchanged: LrTrial
    keep_rescaled: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "steps": self.steps,
            "rescaled": _trial_dict(self.rescaled),
            "unchanged": _trial_dict(self.unchanged),
            "keep_rescaled": self.keep_rescaled,
            "reason": self.reason,
        }


def check_betas(
    rescaled_task: Task,
    check: LrCheck,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> BetasCheck | None:
    """Train ``rescaled_task`` (the task with Adam's rescaled betas and eps,
    :func:`with_adam_scaling`) at ``check``'s chosen lr, batch, horizon and seeds, and compare
    with the check's run at that lr, which trained with the optimizer's own. None when the check
    has no finite run at its lr.

    The lr was chosen for the optimizer's own betas, so the comparison leans their way: the
    rescaled ones must win clearly to be kept.
    """
    unchanged = next((t for t in check.trials if t.lr == check.lr), None)
    if unchanged is None or not math.isfinite(unchanged.median):
        return None
    rescaled = _trial(
        rescaled_task,
        check.lr,
        seeds=range(seed, seed + check.seeds),
        micro_batch=check.micro_batch,
        accumulation_steps=check.accumulation_steps,
        steps=check.steps,
        device=device,
        target_loss=check.target_loss if check.score == "steps to target" else None,
    )
    # compared by the score the lr check decided by: steps to the target, or the loss
    score: Score = "loss"
    own, new = unchanged, rescaled
    if check.score == "steps to target":
        score, view = _scored({0.0: unchanged, 1.0: rescaled})
        own, new = view[0.0], view[1.0]
    what = "steps to the target loss" if score == "steps to target" else "loss"
    keep = new.median < own.median and own.median > _reach(new, score)
    if keep:
        reason = (
            f"the rescaled betas and eps trained to median {what} {new.median:.4g} against "
            f"{own.median:.4g} with the optimizer's own (above every rescaled seed)"
        )
    elif new.median < own.median:
        reason = (
            f"the optimizer's own betas and eps tie with the rescaled ones (median {what} "
            f"{own.median:.4g} against {new.median:.4g}, within the rescaled seeds' "
            "spread): they are kept"
        )
    else:
        reason = (
            f"the optimizer's own betas and eps trained as well or better (median {what} "
            f"{own.median:.4g} against {new.median:.4g} rescaled): they are kept"
        )
    return BetasCheck(check.lr, check.steps, rescaled, unchanged, keep, reason)


def with_adam_scaling(task: Task, *, ref_batch: int, batch: int) -> Task:
    """``task`` whose optimizer factory also rescales each group's betas and eps from the values
    the factory sets at ``ref_batch`` to ``batch`` (Malladi et al. 2022; beyond the rule's reach
    they stay as they are and only the lr moves, see :func:`~batchpilot.plan.lr_for_batch`)."""
    make = task.optimizer

    def optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
        built = make(params, lr)
        for group in built.param_groups:
            if "betas" in group and "eps" in group:
                scaled = lr_for_batch(
                    group["lr"],
                    ref_batch=ref_batch,
                    batch=batch,
                    rule="adam",
                    betas=tuple(group["betas"]),
                    eps=group["eps"],
                    reduction=task.reduction,
                )
                if scaled.betas is not None and scaled.eps is not None:
                    group["betas"], group["eps"] = scaled.betas, scaled.eps
        return built

    return replace(task, optimizer=optimizer)


def _exponent(lr: float) -> int:
    return round(math.log(lr) / math.log(GRID_FACTOR))


def _reach(best: LrTrial, score: Score) -> float:
    """How far the best trial's score reaches: its worst seed, and when scored by steps to the
    target one progress interval more (a seed's steps are read between two progress points, so
    interpolated seeds that agree closely may still be one interval off)."""
    worst = max(best.losses)
    if score == "steps to target":
        return worst + max(1.0, PROGRESS_SPACING * worst)
    return worst


def _beaten(best: LrTrial, other: LrTrial, score: Score) -> bool:
    """Whether ``best`` did better than ``other`` in every seed, paired: a seed is the same
    initialisation and data order at every lr, so seed against seed compares lrs on the same
    draw, free of the offsets between draws. Scored by steps to the target, by more than one
    progress interval (the resolution a seed's steps are read to)."""
    if not best.losses or len(best.losses) != len(other.losses):
        return True
    for own, theirs in zip(best.losses, other.losses, strict=True):
        margin = 0.0
        if score == "steps to target" and math.isfinite(own):
            margin = max(1.0, PROGRESS_SPACING * own)
        if not theirs > own + margin:
            return False
    return True


def _ties(best: LrTrial, other: LrTrial, score: Score) -> bool:
    """Whether ``other`` ties with ``best``: the seeds cannot tell them apart unless the best
    beat it both ways, its median past the best's worst seed (:func:`_reach`) and seed against
    seed in every seed (:func:`_beaten`); a trial that did not train to a finite median never
    ties."""
    if not math.isfinite(other.median):
        return False
    return other.median <= _reach(best, score) or not _beaten(best, other, score)


def _tie(trials: dict[float, LrTrial], score: Score = "loss") -> tuple[LrTrial, list[float]] | None:
    """The best trial (lowest median) and the lrs that tie with it (:func:`_ties`), or None
    when every trial diverged."""
    finite = [t for t in trials.values() if math.isfinite(t.median)]
    if not finite:
        return None
    best = min(finite, key=lambda t: (t.median, t.lr))
    return best, sorted(t.lr for t in finite if _ties(best, t, score))


def _narrowed(
    trials: dict[float, LrTrial], tied: list[float], target_loss: float | None
) -> tuple[list[float], list[str], dict[float, LrTrial]]:
    """A tie by steps to the target too wide for the grid's promise (more than
    ``MAX_TIE_SPAN`` grid points), narrowed by the steps to shallower losses: halfway to the
    target in log-loss from where the runs started (the median loss after their first step),
    then halfway to that, at most ``MAX_NARROWINGS`` times, each among the lrs still tied.

    Lrs that reach the target in the same steps can still differ on the way: a run that got
    half-way sooner leads at every earlier stopping point, so it is the one to prefer (on a
    realizable task every lr of a momentum method converges at the same rate to the float floor,
    and only the descent before it tells them apart). A level the best reaches in fewer than
    ``RESOLVED_STEPS`` steps is not used: a step there is more than the progress points'
    spacing. Returns the tie, what each level did, and the trials as the last level scored
    them."""
    said: list[str] = []
    scored = trials
    level = target_loss
    for _ in range(MAX_NARROWINGS):
        if level is None or _exponent(tied[-1]) - _exponent(tied[0]) <= MAX_TIE_SPAN:
            break
        firsts = [seed[0][1] for lr in tied for seed in trials[lr].progress if seed]
        start = float(np.median(firsts)) if firsts else math.nan
        if not (math.isfinite(start) and start > level > 0):
            break
        level = math.sqrt(start * level)
        view = {}
        for lr in tied:
            seeds = tuple(steps_to(p, level) if p else math.inf for p in trials[lr].progress)
            median = float(np.median(seeds)) if seeds else math.inf
            view[lr] = replace(trials[lr], losses=seeds, median=median)
        tie = _tie(view, "steps to target")
        if tie is None or not math.isfinite(tie[0].median):
            break
        best, narrower = tie
        if best.median < RESOLVED_STEPS:
            # a loss reached within the first few steps is read to a single step, coarser than
            # the progress points' spacing: it ranks the first updates, not the training speed
            break
        said.append(
            f"by steps to {level:.3g} (halfway there in log-loss) {len(narrower)} of them tie "
            f"with {best.lr:.3g} (median {best.median:.4g} steps)"
        )
        tied, scored = narrower, view
    return tied, said, scored


def _on_plateau(trials: dict[float, LrTrial], tied: list[float], target_loss: float) -> bool:
    """Whether the tied runs' loss moved less from where they started (the median loss after
    their first step) to ``target_loss`` than it differs between them (the spread, in log-loss,
    of every tied seed's loss after its first step, or of every one's final loss, whichever is
    wider): the target then measures no progress, only where each run's draw happened to put
    it (a loss on a plateau, a hair below the start). A fast task that reaches its target within
    a few steps has come down a long way to it."""
    firsts = [seed[0][1] for lr in tied for seed in trials[lr].progress if seed]
    finals = [loss for lr in tied for loss in trials[lr].losses if math.isfinite(loss)]
    firsts = [loss for loss in firsts if math.isfinite(loss) and loss > 0]
    finals = [loss for loss in finals if loss > 0]
    if len(firsts) < 2 or not target_loss > 0:
        return False
    start = float(np.median(firsts))
    spread = max(math.log(max(f) / min(f)) for f in (firsts, finals or firsts))
    return start > target_loss and math.log(start / target_loss) < spread


def _plateau_tie(
    trials: dict[float, LrTrial],
    score: Score,
    tie: tuple[LrTrial, list[float]],
    target_loss: float,
) -> bool:
    """Whether a tie by steps to ``target_loss`` is one that longer runs must look past: the
    best got there in fewer than ``RESOLVED_STEPS`` steps, the tie is wider than
    ``MAX_TIE_SPAN`` and the target sits on a plateau (:func:`_on_plateau`)."""
    best, tied = tie
    return (
        score == "steps to target"
        and best.median < RESOLVED_STEPS
        and _exponent(tied[-1]) - _exponent(tied[0]) > MAX_TIE_SPAN
        and _on_plateau(trials, tied, target_loss)
    )


def _seed_spread(trial: LrTrial) -> float:
    """How far apart, in log-loss, a trial's seeds were after their first step (0 without two
    finite ones)."""
    firsts = [seed[0][1] for seed in trial.progress if seed]
    firsts = [loss for loss in firsts if math.isfinite(loss) and loss > 0]
    return math.log(max(firsts) / min(firsts)) if len(firsts) > 1 else 0.0


def _deepest_reached(trials: dict[float, LrTrial]) -> float:
    """The deepest loss some lr ended at in every seed: over the trials that did not diverge,
    the lowest of their worst seed's end (the mean of its last two progress points, as
    :func:`settled_at` smooths them), infinite when there is none."""
    deepest = math.inf
    for trial in trials.values():
        if trial.diverged or not trial.progress or not all(trial.progress):
            continue
        worst = max(float(np.median([loss for _, loss in seed[-2:]])) for seed in trial.progress)
        deepest = min(deepest, worst)
    return deepest


def settled_at(progress: tuple[tuple[int, float], ...], level: float) -> float:
    """The step from which a progress signal, each point the median of itself and its
    neighbours, stays at or below ``level`` to its end (interpolated past its last point above,
    as :func:`~batchpilot.training.steps_to` reads a crossing); infinite when it ends above. A run that dips below the level and
    spikes back has not got there: the lr that escapes a plateau first and then oscillates
    trains worse than one that escapes a little later and stays down.

    >>> settled_at(((1, 1.0), (2, 0.9), (3, 0.2), (4, 0.6), (5, 0.3), (6, 0.3)), 0.5)
    3.26
    """
    losses = [loss for _, loss in progress]
    # each point as the median of itself and its neighbours: one evaluation that caught a spike
    # is not the run's level, two in a row are
    smooth = [float(np.median(losses[max(i - 1, 0) : i + 2])) for i in range(len(losses))]
    progress = tuple((step, loss) for (step, _), loss in zip(progress, smooth, strict=True))
    above = [i for i, (_, loss) in enumerate(progress) if not loss <= level]
    if not above:
        return float(progress[0][0]) if progress else math.inf
    if above[-1] == len(progress) - 1:
        return math.inf
    return steps_to(progress[above[-1] :], level)


def _at_level(trials: dict[float, LrTrial], level: float) -> dict[float, LrTrial]:
    """The trials with each seed's steps to stay at or below ``level`` (:func:`settled_at`,
    infinite where it never did), as ``reached``."""
    return {
        lr: replace(t, reached=tuple(settled_at(p, level) if p else math.inf for p in t.progress))
        for lr, t in trials.items()
    }


def _decide(
    trials: dict[float, LrTrial],
    best: LrTrial,
    centre: float,
    score: Score = "loss",
    target_loss: float | None = None,
) -> tuple[float, str]:
    """The centre of the tie (:func:`_ties`): the grid point halfway between the tie's lowest
    and highest lr is chosen (of two middle points, the one with the lower median). Scored by steps to
    ``target_loss``, a tie wider than the grid resolves is first narrowed (:func:`_narrowed`)."""
    reach = _reach(best, score)
    tied = sorted(t.lr for t in trials.values() if _ties(best, t, score))
    wide = len(tied)
    said: list[str] = []
    if score == "steps to target":
        tied, said, scored = _narrowed(trials, tied, target_loss)
    else:
        scored = trials
    low, high = _exponent(tied[0]), _exponent(tied[-1])
    middle = [k for k in {math.floor((low + high) / 2), math.ceil((low + high) / 2)}]
    by_exponent = {_exponent(lr): t for lr, t in scored.items()}
    choices = [by_exponent[k] for k in middle if k in by_exponent and by_exponent[k].lr in tied]
    if not choices:  # the middle was not run, or fell out of a narrowed tie: the nearest in it
        gap = min(abs(_exponent(lr) - (low + high) / 2) for lr in tied)
        choices = [scored[lr] for lr in tied if abs(_exponent(lr) - (low + high) / 2) == gap]
    chosen = min(choices, key=lambda t: (t.median, t.lr))
    rule = trials.get(centre)
    what = "steps to the target loss" if score == "steps to target" else "loss"
    slack = " plus one progress interval" if score == "steps to target" else ""
    rule_text = f"{rule.median:.4g}" if rule is not None else "not run at this horizon"
    if wide == 1:
        reason = (
            f"the rule's {centre:.3g} trained best of {len(trials)} lrs (median {what} "
            f"{chosen.median:.4g})"
            if chosen.lr == centre
            else f"{chosen.lr:.3g} beat every other lr in every seed (median {what} "
            f"{chosen.median:.4g}; the rule's {centre:.3g}: {rule_text})"
        )
    else:
        narrowed = f"; wider than the check resolves, so {'; then '.join(said)}" if said else ""
        reason = (
            f"{wide} lrs tie with the best {best.lr:.3g} (each with its median {what} at or "
            f"below the best's worst seed's{slack}, {reach:.4g}, or ahead of it in some seed)"
            f"{narrowed}; the tie's centre {chosen.lr:.3g} is chosen"
            + (", the rule's own" if chosen.lr == centre else f" (the rule gave {centre:.3g})")
        )
    return chosen.lr, reason


def _next_lr(
    trials: dict[float, LrTrial], gallop: dict[int, int], score: Score = "loss"
) -> float | None:
    """The next grid point to run so that the tie becomes bounded, or None when it is.

    Upward first (a plateau is left by a larger lr, never a smaller one): the point above the
    tie's top when it is untried (the gap a gallop left), else, while the tie holds the highest
    lr tried, a step of ``2^k`` grid points (``k`` the steps already taken that way), never at or
    past the lowest lr that diverged. Then the same downward, where only a best that stands alone
    gallops (a tie reaching down walks in √2 steps); then any grid point inside the tie that a
    gallop skipped. ``gallop`` counts the steps taken each way.
    """
    exponents = {_exponent(lr): t for lr, t in trials.items()}
    tie = _tie(trials, score)
    if tie is None:  # every candidate diverged: go lower, faster each time
        low = min(exponents)
        step = 2 ** gallop[-1]
        gallop[-1] += 1
        return float(GRID_FACTOR ** (low - step))
    _, tied = tie
    low, high = _exponent(tied[0]), _exponent(tied[-1])
    diverged = [k for k, t in exponents.items() if t.diverged and k > high]
    ceiling = min(diverged) if diverged else None
    if high + 1 not in exponents and (ceiling is None or high + 1 < ceiling):
        if high == max(exponents):
            step = 2 ** gallop[1]
            gallop[1] += 1
            target = high + step if ceiling is None else min(high + step, ceiling - 1)
        else:
            target = high + 1
        return float(GRID_FACTOR**target)
    if low - 1 not in exponents:
        # Downward a gallop follows only a best that stands alone at the bottom (a rule's lr far
        # too high); a tie reaching down is a loss that smaller lrs do not move (a plateau), and
        # is bounded, or not, by single √2 steps: lrs too small to train must not be chosen.
        if low == min(exponents) and len(tied) == 1:
            step = 2 ** gallop[-1]
            gallop[-1] += 1
            return float(GRID_FACTOR ** (low - step))
        return float(GRID_FACTOR ** (low - 1))
    gaps = [k for k in range(low + 1, high) if k not in exponents]
    if gaps:  # a gallop landed in the tie: the points it skipped, the middle first
        return float(GRID_FACTOR ** gaps[len(gaps) // 2])
    return None


def check_lr(
    task: Task,
    *,
    rule_lr: float,
    micro_batch: int,
    accumulation_steps: int = 1,
    steps: int,
    seeds: int = 3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    time_budget_seconds: float | None = None,
    on_run: Callable[[int], None] | None = None,
    target_loss: float | None = None,
    max_doublings: int = MAX_DOUBLINGS,
    look_past_plateau: bool = True,
) -> LrCheck:
    """Train ``task`` at ``micro_batch × accumulation_steps`` for ``steps`` steps at the √2-grid
    point nearest ``rule_lr`` and its two neighbours (``seeds`` seeds each, from ``seed``), grow
    the grid until the tie with the best is bounded (at most ``MAX_NEW_LRS`` more per horizon),
    and double the horizon (up to ``max_doublings`` times) while no seed of the best has reached
    ``target_loss`` or the tie spans more than ``MAX_TIE_SPAN`` grid points; then choose by the
    rule in the module docstring.

    ``time_budget_seconds`` bounds the whole check: a longer horizon is started only when its
    runs, timed by the ones before, fit in what is left, and the grid stops growing once it is
    spent (the result says whether it was ``complete``). ``on_run(runs_done)`` after each
    candidate. ``look_past_plateau=False`` keeps ``target_loss`` even on a plateau (a loss the
    user trains to; see "Deepening" in the module docstring).
    """
    check_positive_float("rule_lr", rule_lr)
    check_positive_int("steps", steps)
    check_positive_int("seeds", seeds)
    if target_loss is not None and not math.isfinite(target_loss):
        target_loss = None
    start = time.perf_counter()
    centre = grid_point(rule_lr)
    levels: list[tuple[int, dict[float, LrTrial]]] = []
    complete = True
    runs = 0
    step_seconds: list[float] = []  # seconds per training step, per candidate run

    def left() -> float:
        if time_budget_seconds is None:
            return math.inf
        return time_budget_seconds - (time.perf_counter() - start)

    def run(trials: dict[float, LrTrial], lr: float, horizon: int, *, deep: bool = False) -> None:
        nonlocal runs
        began = time.perf_counter()
        trials[lr] = _trial(
            task,
            lr,
            seeds=range(seed, seed + seeds),
            micro_batch=micro_batch,
            accumulation_steps=accumulation_steps,
            steps=horizon,
            device=device,
            target_loss=None if deep else target_loss,
            progress=deep,
        )
        # per step actually trained (a run that reached the target stopped early)
        trained = sum(min(r, horizon) if math.isfinite(r) else horizon for r in trials[lr].reached)
        trained = trained or seeds * horizon
        step_seconds.append((time.perf_counter() - began) / max(trained, 1))
        runs += 1
        if on_run is not None:
            on_run(runs)

    def bracket(trials: dict[float, LrTrial], horizon: int) -> bool:
        """Grow ``trials`` by at most ``MAX_NEW_LRS`` lrs until the tie is bounded; False when
        time or that cap stopped it."""
        gallop = {1: 0, -1: 0}
        cap = len(trials) + MAX_NEW_LRS
        while True:
            score, view = _scored(trials)
            lr = _next_lr(view, gallop, score)
            if lr is None:
                return True
            one_more = seeds * horizon * float(np.median(step_seconds)) if step_seconds else 0.0
            if left() <= one_more or len(trials) >= cap:  # a run that would end past the budget
                return False
            run(trials, lr, horizon)

    horizon = steps
    first: dict[float, LrTrial] = {}
    for k in (0, 1, -1):
        if k and left() <= 0:
            complete = False
            break
        run(first, centre * GRID_FACTOR**k, horizon)
    levels.append((horizon, first))
    if complete:
        complete = bracket(first, horizon)
    doublings = 0
    why: list[str] = []  # why each longer horizon ran
    # also after a bracket the cap stopped: a tie too wide for it may narrow at a longer horizon
    while doublings < max_doublings:
        trials = levels[-1][1]
        score, view = _scored(trials)
        tie = _tie(view, score)
        if tie is None:
            break
        best, tied = tie
        low, high = _exponent(tied[0]), _exponent(tied[-1])
        if (
            look_past_plateau
            and target_loss is not None
            and _plateau_tie(trials, score, tie, target_loss)
        ):
            # a seed on the plateau does not reach a target there at any horizon: the time is
            # the longer runs' that look past it (below)
            break
        if target_loss is not None and score == "loss":
            because = f"no lr had reached the target loss {target_loss:.4g} in most seeds"
        elif target_loss is not None and not math.isfinite(max(best.losses)):
            because = f"a seed of the best lr had not reached the target loss {target_loss:.4g}"
        elif target_loss is None and high - low > MAX_TIE_SPAN:
            because = (
                f"{len(tied)} lrs tied over ×{GRID_FACTOR ** (high - low):.3g}, wider than the "
                f"check resolves (×{GRID_FACTOR**MAX_TIE_SPAN:.3g})"
            )
        else:
            break
        # a diverged lr diverges again over a longer run, and a run that reached the target
        # stops at the same step again (same seed, same data order): both are kept, unrun
        longer = {
            lr: t
            for lr, t in trials.items()
            if t.diverged or (t.reached and all(math.isfinite(r) for r in t.reached))
        }
        again = [
            lr
            for lr, t in trials.items()
            if low - 1 <= _exponent(lr) <= high + 1 and lr not in longer
        ]
        cost = 2 * horizon * seeds * len(again) * float(np.median(step_seconds))
        if cost > left():
            break
        why.append(f"{horizon} steps: {because}")
        horizon *= 2
        doublings += 1
        for lr in sorted(again):
            run(longer, lr, horizon)
        levels.append((horizon, longer))
        complete = bracket(longer, horizon)

    def deepen(best: LrTrial, tied: list[float], horizon: int) -> tuple[str, float | None]:
        """Train every other tied lr without a target for as long as the time left allows, and
        add them, scored by steps to a deeper loss, as the last level: what it did, or why not,
        and that loss (None when there is none)."""
        nonlocal complete
        assert target_loss is not None
        # a plateau is left sooner by a larger lr (never a smaller one): the longest runs the
        # time allows go to the tie's top lrs, ×2 apart, and go lower only while the lowest run
        # is the best (the ones above it bounced back off the plateau, or never settled)
        anchor = _exponent(tied[-1])
        lrs = [float(GRID_FACTOR**k) for k in range(anchor, _exponent(tied[0]) - 1, -2)][::-1]
        lower, lrs = lrs[:-DEEP_LRS], lrs[-DEEP_LRS:]
        # the run that trained the most steps carries the least set-up per step
        per_step = min(step_seconds)
        factor = MAX_DEEPENING
        while factor >= 2 and len(lrs) * seeds * horizon * factor * per_step > 0.9 * left():
            factor //= 2
        if factor < 2:
            return f"no time was left to train the tied lrs for {2 * horizon} steps", None
        longer = horizon * factor
        deep: dict[float, LrTrial] = {}
        for lr in reversed(lrs):
            if deep and left() <= seeds * longer * per_step:
                complete = False
                break
            run(deep, lr, longer, deep=True)

        goal = target_loss

        def settled() -> tuple[float, tuple[LrTrial, list[float]] | None]:
            deepest = _deepest_reached(deep)
            if not 0 < deepest < goal:
                return deepest, None
            level = math.sqrt(goal * deepest)
            return deepest, _tie(_scored(_at_level(deep, level))[1], "steps to target")

        def spread() -> float:
            # how far apart one lr's seeds start (after one step): an lr that came down from
            # the target by less has not left the plateau
            return max((_seed_spread(t) for t in deep.values()), default=math.inf)

        def escaped(deepest: float) -> bool:
            return 0 < deepest < goal and math.log(goal / deepest) > spread()

        deepest, tie = settled()
        while lower and escaped(deepest) and left() > seeds * longer * per_step:
            if tie is not None and math.isfinite(tie[0].median) and tie[1][0] > min(deep):
                break
            run(deep, lower.pop(), longer, deep=True)
            deepest, tie = settled()
        if not escaped(deepest):
            return (
                f"{len(deep)} of them trained {longer} steps and none came down from the target "
                "in every seed by more than one lr's seeds differ after one step "
                f"(×{math.exp(spread()):.3g}), so the tie stands",
                None,
            )
        level = math.sqrt(target_loss * deepest)
        ran = len(deep)
        # the tie's middle, when the ×2 grid skipped it (of a tie of two, the point between);
        # ``tie`` is the one at ``level``, read after the last run
        if tie is not None:
            low, high = _exponent(tie[1][0]), _exponent(tie[1][-1])
            for k in sorted({math.floor((low + high) / 2), math.ceil((low + high) / 2)}):
                if GRID_FACTOR**k not in deep and left() > seeds * longer * per_step:
                    run(deep, float(GRID_FACTOR**k), longer, deep=True)
        levels.append((longer, _at_level(deep, level)))
        filled = f", and {len(deep) - ran} more in the tie's middle" if len(deep) > ran else ""
        return (
            f"so the top {ran} of them, ×2 apart{filled}, trained {longer} steps without a target, "
            f"scored by the steps until they stay at or below {level:.4g}, halfway in log-loss "
            f"from the target to {deepest:.4g} (the deepest loss one of them ended at in every "
            "seed)",
            level,
        )

    horizon, trials = levels[-1]
    score, view = _scored(trials)
    tie = _tie(view, score)
    deepened_from = None
    deepened = ""
    if tie is not None and score == "steps to target" and target_loss is not None:
        best, tied = tie
        span = _exponent(tied[-1]) - _exponent(tied[0])
        if look_past_plateau and _plateau_tie(trials, score, tie, target_loss):
            said, deeper = deepen(best, tied, horizon)
            deepened = (
                f"{len(tied)} lrs tied over ×{GRID_FACTOR**span:.3g} at the target "
                f"{target_loss:.4g}, which the best reached in {best.median:.3g} steps (under "
                f"{RESOLVED_STEPS:.0f}: the first updates, not the training) and the runs came "
                f"down to by less than they differ from each other (a plateau); {said}"
            )
            if deeper is not None:
                deepened_from, target_loss = target_loss, deeper
                horizon, trials = levels[-1]
                score, view = _scored(trials)
                tie = _tie(view, score)
    if tie is None:
        best_lr = None
        lr, reason = centre, "every candidate diverged: the rule's lr is kept, unverified"
    else:
        best, _ = tie
        best_lr = best.lr
        lr, reason = _decide(view, best, centre, score, target_loss)
        if why:
            reason += f" (at {horizon} steps; the horizon doubled after " + "; ".join(why) + ")"
    if deepened:
        reason = f"{deepened}: {reason}" if deepened_from is not None else f"{reason} ({deepened})"
    reached = None
    if target_loss is not None and tie is not None:
        reached = score == "steps to target" or min(tie[0].losses) <= target_loss
    return LrCheck(
        global_batch=micro_batch * accumulation_steps,
        micro_batch=micro_batch,
        accumulation_steps=accumulation_steps,
        steps=horizon,
        seeds=seeds,
        rule_lr=rule_lr,
        rule_grid_lr=centre,
        trials=tuple(sorted(trials.values(), key=lambda t: t.lr)),
        best_lr=best_lr,
        lr=lr,
        kept_rule=lr == centre,
        reason=reason,
        split="val" if task.val_data is not None else "train",
        seconds=time.perf_counter() - start,
        complete=complete,
        horizons=tuple(h for h, _ in levels),
        earlier=tuple(
            t for _, level in levels[:-1] for t in sorted(level.values(), key=lambda t: t.lr)
        ),
        target_loss=target_loss,
        reached=reached,
        score=score,
        deepened_from=deepened_from,
    )


__all__ = [
    "GRID_FACTOR",
    "BetasCheck",
    "LrCheck",
    "LrTrial",
    "check_betas",
    "check_lr",
    "grid_point",
    "settled_at",
    "with_adam_scaling",
]
