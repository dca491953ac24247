"""Running a sweep: ask the strategy for batches, run their trials, commit each, and analyse.

The runner is the only part that holds state, and all of it is in the store: a sweep is named by
its settings, every finished trial is committed as it comes back from the executor, and a resumed
sweep replays the strategy, reading the trials it already has instead of running them again. So a
sweep killed at any point and resumed ends with the same trials as one never interrupted.

>>> from batchpilot.sweep import Budget, Grid, LrPlan
>>> result = run_sweep("batchpilot.examples.xor4:task", strategy=Grid((4, 8, 16)),
...                    budget=Budget.equal_epochs(20, evals=4), lr=LrPlan(rule="sqrt"))
>>> [trial.batch for trial in result.trials], result.analysis.objective
([4, 8, 16], 'val_metric')
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchpilot.checks import MAX_RUN_STEPS, check_positive_int
from batchpilot.devices import resolve_device
from batchpilot.errors import BadInputError
from batchpilot.loading import load_task
from batchpilot.plan._split import BatchSplit, split_batch
from batchpilot.summary import summarize_task
from batchpilot.sweep.analysis import SweepAnalysis, analyze, batch_scores
from batchpilot.sweep.budgets import TARGET_OBJECTIVES, Budget, check_objective
from batchpilot.sweep.executors import Executor, make_executor
from batchpilot.sweep.lrs import LrPlan
from batchpilot.sweep.store import TrialStore
from batchpilot.sweep.strategies import Ladder, Strategy
from batchpilot.sweep.trials import TrialResult, TrialSpec
from batchpilot.task import Task

OnTrial = Callable[[TrialResult, bool], None]


@dataclass(frozen=True)
class SweepResult:
    """A sweep's settings, its trials (by batch, then lr) and what they say."""

    name: str
    store: str | None
    config: dict[str, Any]
    trials: tuple[TrialResult, ...]
    analysis: SweepAnalysis
    ran: int = 0
    reused: int = 0

    @property
    def best_batch(self) -> int | None:
        """The best batch under the sweep's objective."""
        choice = self.analysis.best.get(self.analysis.objective)
        return None if choice is None else choice.batch

    def to_dict(self) -> dict[str, Any]:
        analysis = self.analysis.to_dict()
        return {
            "sweep": {
                "name": self.name,
                "store": self.store,
                "ran": self.ran,
                "reused": self.reused,
                "best_batch": self.best_batch,
                **self.config,
            },
            "trials": [trial.to_dict() for trial in self.trials],
            "best": analysis["best"],
            "fit": analysis["fit"],
            "best_lr": analysis["best_lr"],
        }


def run_sweep(
    task: Task | str,
    *,
    budget: Budget,
    strategy: Strategy | None = None,
    lr: LrPlan | None = None,
    objective: str | None = None,
    executor: Executor | str = "inprocess",
    store: TrialStore | str | Path | None = None,
    name: str | None = None,
    resume: bool = False,
    seed: int = 0,
    device: str = "cpu",
    max_micro_batch: int | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    on_trial: OnTrial | None = None,
) -> SweepResult:
    """Sweep the batch size of ``task`` and return every trial with the analysis.

    Args:
        task: a spec string (``path/to/file.py:factory`` or ``package.module:factory``, needed by
            the pool and Ray executors) or a :class:`Task` (in-process only).
        budget: what each trial trains for (:class:`Budget`).
        strategy: :class:`Ladder` (default: the ×0.5 / ×2 ladder from 128) or :class:`Grid`.
        lr: how each trial's lr is chosen (default: the linear rule from the task's reference).
        objective: what the strategy compares: ``val_metric`` (default when the task has a metric),
            ``val_loss``, ``steps_to_target``, ``samples_to_target`` or ``seconds_to_target``.
        executor: ``"inprocess"``, ``"pool"``, ``"ray"`` or an executor object.
        store: the SQLite file trials are committed to (``None``: kept in memory only).
        name: the sweep's name in the store (default: task, strategy and a hash of the settings).
        resume: continue the stored sweep of that name; without it a stored one is refused.
        max_micro_batch: split larger batches into micro-batches × accumulation steps.
        workers, ray_address: for executors given by name (pool processes, local Ray CPUs).
        on_trial: called with each result and whether it was read back from the store.
    """
    spec, loaded = _resolve_task(task)
    plan = (lr or LrPlan()).with_reference(loaded)
    objective = _check_setup(loaded, budget, plan, objective)
    chosen = (strategy or Ladder()).bounded(loaded.train_size)
    if max_micro_batch is not None:
        check_positive_int("max_micro_batch", max_micro_batch)
    if (executor if isinstance(executor, str) else executor.name) != "ray":
        # Checked before the first trial (else every trial fails on it), and resolved, so that
        # a sweep timed on a GPU is never resumed on the CPU ("auto" means either). Ray's
        # workers may see devices this machine lacks.
        device = str(resolve_device(device))
        # One loss evaluation here: a task that cannot train (a non-scalar loss, a frozen model)
        # is bad input now, not a store of failed trials later.
        summarize_task(loaded, device=device, seed=seed)
    config = {
        "task": spec,
        "task_name": loaded.name,
        "train_size": loaded.train_size,
        "strategy": chosen.to_dict(),
        "budget": budget.to_dict(),
        "lr": plan.to_dict(),
        "objective": objective,
        "metric_name": loaded.metric_name if loaded.metric is not None else None,
        "metric_mode": loaded.metric_mode,
        "seed": seed,
        "max_micro_batch": max_micro_batch,
        "device": device,
    }
    name = name or default_name(config)
    runner = (
        make_executor(executor, workers=workers, ray_address=ray_address)
        if isinstance(executor, str)
        else executor
    )
    if runner.name != "inprocess" and spec is None:
        raise BadInputError(
            f"task: the {runner.name} executor loads the task in its workers from a spec "
            "(path/to/file.py:factory or package.module:factory); pass that instead of a Task"
        )
    trial_store = store if isinstance(store, TrialStore) else TrialStore(store or ":memory:")
    try:
        created = trial_store.open_sweep(name, config)
        stored = {t.key: t for t in trial_store.trials(name, status="done")}
        if not created and not resume and stored:
            raise BadInputError(
                f"resume: the store {trial_store.path!r} already holds sweep {name!r} with "
                f"{len(stored)} finished trials: resume it, or choose another name or store"
            )
        results: dict[str, TrialResult] = {}
        ran = reused = 0
        scores: dict[int, float] = {}
        while batches := chosen.next_batches(scores):
            specs = [
                trial_spec
                for batch in batches
                for trial_spec in _specs_for(
                    batch, loaded, spec, budget, plan, seed, device, max_micro_batch
                )
            ]
            for trial_spec in specs:
                if trial_spec.key in stored:
                    results[trial_spec.key] = stored[trial_spec.key]
                    reused += 1
                    if on_trial is not None:
                        on_trial(stored[trial_spec.key], True)
            to_run = [s for s in specs if s.key not in results]
            for result in runner.run(loaded if runner.name == "inprocess" else None, to_run):
                trial_store.save(name, result)
                results[result.key] = result
                ran += 1
                if on_trial is not None:
                    on_trial(result, False)
            round_scores = batch_scores(
                [results[s.key] for s in specs], objective, metric_mode=loaded.metric_mode
            )
            scores.update({batch: round_scores.get(batch, float("inf")) for batch in batches})
        # Trials stored by an earlier run that this one did not ask for (a timing objective can
        # steer differently) are still this sweep's measurements.
        for key, trial in stored.items():
            results.setdefault(key, trial)
    finally:
        if isinstance(executor, str):
            runner.close()
        if not isinstance(store, TrialStore):
            trial_store.close()
    return _result(name, store, config, list(results.values()), ran=ran, reused=reused)


def load_sweep(store: TrialStore | str | Path, name: str | None = None) -> SweepResult:
    """A stored sweep with its trials and analysis (``name`` may be left out if there is one)."""
    trial_store = store if isinstance(store, TrialStore) else _open_existing(store)
    try:
        names = trial_store.sweep_names()
        if name is None:
            if len(names) != 1:
                raise BadInputError(
                    f"name: the store holds {len(names)} sweeps ({', '.join(names) or 'none'}); "
                    "name one"
                )
            name = names[0]
        config = trial_store.sweep_config(name)
        if config is None:
            raise BadInputError(
                f"name: no sweep {name!r} in the store (it has: {', '.join(names) or 'none'})"
            )
        trials = trial_store.trials(name)
    finally:
        if not isinstance(store, TrialStore):
            trial_store.close()
    try:
        _check_config(config)
        return _result(name, trial_store.path, config, trials)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, BadInputError):
            raise
        raise BadInputError(
            f"store: {trial_store.path!r} is damaged: sweep {name!r} cannot be read "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def load_sweeps(store: TrialStore | str | Path) -> list[SweepResult]:
    """Every sweep in ``store``, oldest first."""
    trial_store = store if isinstance(store, TrialStore) else _open_existing(store)
    try:
        return [load_sweep(trial_store, name) for name in trial_store.sweep_names()]
    finally:
        if not isinstance(store, TrialStore):
            trial_store.close()


def _check_config(config: dict[str, Any]) -> None:
    """Raise ``KeyError``/``TypeError`` unless ``config`` has what a sweep result is read with."""
    for key in ("task_name", "objective", "strategy", "budget"):
        if key not in config:
            raise KeyError(key)
    strategy, budget = config["strategy"], config["budget"]
    if not isinstance(strategy, dict) or not isinstance(budget, dict):
        raise TypeError("strategy and budget must be objects")
    fields = {"ladder": ("start", "factor"), "grid": ("batches",)}.get(str(strategy.get("kind")))
    if fields is None:
        raise ValueError(f"unknown strategy kind {strategy.get('kind')!r}")
    for key in fields:
        if key not in strategy:
            raise KeyError(f"strategy.{key}")


def default_name(config: dict[str, Any]) -> str:
    """``task-strategy-hash``: the same settings always give the same name, so resuming finds it."""
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    return f"{config['task_name']}-{config['strategy']['kind']}-{digest}"


def absolute_spec(spec: str) -> str:
    """A file-based task spec with an absolute path, so workers elsewhere find the same file."""
    module_part, sep, attribute = spec.rpartition(":")
    if sep and (module_part.endswith(".py") or "/" in module_part or "\\" in module_part):
        return f"{Path(module_part).resolve()}:{attribute}"
    return spec


def _resolve_task(task: Task | str) -> tuple[str | None, Task]:
    if isinstance(task, Task):
        return None, task
    if not isinstance(task, str):
        raise BadInputError(f"task: expected a Task or a spec string, got {type(task).__name__}")
    spec = absolute_spec(task)
    return spec, load_task(spec)


def _check_setup(task: Task, budget: Budget, plan: LrPlan, objective: str | None) -> str:
    if task.val_data is None:
        raise BadInputError(
            "task: a sweep compares validation results and this task has no val_data"
        )
    if objective is None:
        objective = "val_metric" if task.metric is not None else "val_loss"
    check_objective(objective)
    if objective == "val_metric" and task.metric is None:
        raise BadInputError("objective: 'val_metric' needs a task with a metric; use val_loss")
    if objective in TARGET_OBJECTIVES and not budget.has_target:
        raise BadInputError(
            f"objective: {objective!r} needs a target; give the budget a target_loss or "
            "target_metric"
        )
    if budget.target_metric is not None and task.metric is None:
        raise BadInputError("target_metric: the task has no metric; give a target_loss instead")
    return objective


def _specs_for(
    batch: int,
    task: Task,
    spec: str | None,
    budget: Budget,
    plan: LrPlan,
    seed: int,
    device: str,
    max_micro_batch: int | None,
) -> list[TrialSpec]:
    split = (
        split_batch(batch, max_micro_batch=max_micro_batch)
        if max_micro_batch is not None and batch > max_micro_batch
        else BatchSplit(batch, 1, 1)
    )
    steps = budget.steps_for(batch, train_size=task.train_size)
    if steps > MAX_RUN_STEPS:
        raise BadInputError(
            f"budget: {float(steps):.3g} optimizer steps at batch {batch}, more than the "
            f"{MAX_RUN_STEPS:,} a trial may take"
        )
    warmup_steps = round(plan.warmup_epochs * task.train_size / batch)
    return [
        TrialSpec(
            key=f"b{batch}-lr{factor:g}",
            batch=batch,
            micro_batch=split.micro_batch,
            accumulation_steps=split.accumulation_steps,
            lr_rule=plan.rule,
            lr_factor=factor,
            ref_batch=plan.ref_batch,
            ref_lr=plan.ref_lr,
            steps=steps,
            eval_every=budget.eval_every(steps),
            warmup_steps=warmup_steps,
            seed=seed,
            device=device,
            task=spec,
            target_loss=budget.target_loss,
            target_metric=budget.target_metric,
            metric_mode=task.metric_mode,
        )
        for factor in plan.factors
    ]


def _open_existing(path: str | Path) -> TrialStore:
    if str(path) != ":memory:" and not Path(path).is_file():
        raise BadInputError(f"store: no such file {str(path)!r}")
    return TrialStore(path, read_only=True)


def _result(
    name: str,
    store: TrialStore | str | Path | None,
    config: dict[str, Any],
    trials: list[TrialResult],
    *,
    ran: int = 0,
    reused: int = 0,
) -> SweepResult:
    ordered = tuple(sorted(trials, key=lambda t: (t.batch, t.lr_factor, t.key)))
    lr_config = config.get("lr", {})
    analysis = analyze(
        ordered,
        objective=config["objective"],
        metric_mode=config.get("metric_mode", "max"),
        lr_tuned=len(lr_config.get("factors", [1])) > 1 or lr_config.get("rule") == "range-test",
    )
    store_path = store.path if isinstance(store, TrialStore) else (str(store) if store else None)
    return SweepResult(
        name=name,
        store=store_path,
        config=config,
        trials=ordered,
        analysis=analysis,
        ran=ran,
        reused=reused,
    )
