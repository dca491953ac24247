"""Batch-size sweeps: the ×0.5 / ×2 ladder or a grid, equal budgets, a durable trial store, local or Ray.

The ground truth every prediction of batchpilot is judged against: train the task at several batch
sizes (each with its own lr), on the same budget, and compare validation results.

- :mod:`~batchpilot.sweep.strategies`: :class:`Ladder` (start, ×0.5 / ×2, follow the better
  direction until it stops improving) and :class:`Grid`.
- :mod:`~batchpilot.sweep.budgets`: :class:`Budget` (equal epochs, equal samples, a target) and the
  objectives.
- :mod:`~batchpilot.sweep.lrs`: :class:`LrPlan` (rescaled by a rule, range test, or a grid).
- :mod:`~batchpilot.sweep.trials`: one trial (:class:`TrialSpec` → :class:`TrialResult`).
- :mod:`~batchpilot.sweep.store`: :class:`TrialStore`, SQLite in WAL mode.
- :mod:`~batchpilot.sweep.executors`: in-process, process pool, Ray.
- :mod:`~batchpilot.sweep.analysis`: best batch per objective, ``S = S_min (1 + B_crit / B)``,
  lr-vs-batch exponent.
- :mod:`~batchpilot.sweep.runner`: :func:`run_sweep`, :func:`load_sweep`.
"""

from batchpilot.sweep.analysis import (
    BestChoice,
    LrFit,
    StepsFit,
    SweepAnalysis,
    analyze,
    best_lr_per_batch,
    fit_lr_exponent,
    fit_steps_to_target,
    objective_score,
)
from batchpilot.sweep.budgets import OBJECTIVES, Budget, Objective
from batchpilot.sweep.executors import (
    EXECUTORS,
    Executor,
    InProcessExecutor,
    PoolExecutor,
    RayExecutor,
    make_executor,
)
from batchpilot.sweep.lrs import LR_RULES, LrPlan
from batchpilot.sweep.runner import SweepResult, load_sweep, load_sweeps, run_sweep
from batchpilot.sweep.store import SweepRecord, TrialStore
from batchpilot.sweep.strategies import Grid, GridAround, Ladder, Strategy, walk
from batchpilot.sweep.trials import CurvePoint, TrialResult, TrialSpec, run_trial

__all__ = [
    "EXECUTORS",
    "LR_RULES",
    "OBJECTIVES",
    "BestChoice",
    "Budget",
    "CurvePoint",
    "Executor",
    "Grid",
    "GridAround",
    "InProcessExecutor",
    "Ladder",
    "LrFit",
    "LrPlan",
    "Objective",
    "PoolExecutor",
    "RayExecutor",
    "StepsFit",
    "Strategy",
    "SweepAnalysis",
    "SweepRecord",
    "SweepResult",
    "TrialResult",
    "TrialSpec",
    "TrialStore",
    "analyze",
    "best_lr_per_batch",
    "fit_lr_exponent",
    "fit_steps_to_target",
    "load_sweep",
    "load_sweeps",
    "make_executor",
    "objective_score",
    "run_sweep",
    "run_trial",
    "walk",
]
