from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from batchpilot.errors import BadInputError
from batchpilot.sweep import (
    Budget,
    InProcessExecutor,
    Ladder,
    LrPlan,
    PoolExecutor,
    RayExecutor,
    SweepResult,
    make_executor,
    run_sweep,
)
from batchpilot.sweep.executors import import_ray

TASK = f"{Path(__file__).parent / 'sweep_task.py'}:task"
SETTINGS: dict[str, Any] = {
    "budget": Budget.equal_epochs(2, evals=4, target_loss=0.4),
    "strategy": Ladder(start=32),
    "lr": LrPlan(factors=(0.5, 1.0)),
    "objective": "val_loss",
}


def same_trials(a: SweepResult, b: SweepResult) -> None:
    assert [t.key for t in a.trials] == [t.key for t in b.trials]
    assert [t.lr for t in a.trials] == [t.lr for t in b.trials]
    assert [t.val_loss for t in a.trials] == pytest.approx([t.val_loss for t in b.trials])
    assert [t.steps_to_target for t in a.trials] == pytest.approx(
        [t.steps_to_target for t in b.trials]
    )
    for x, y in zip(a.trials, b.trials, strict=True):
        assert [p.val_loss for p in x.curve] == pytest.approx([p.val_loss for p in y.curve])
    assert a.best_batch == b.best_batch


@pytest.fixture(scope="module")
def in_process() -> SweepResult:
    return run_sweep(TASK, executor=InProcessExecutor(), **SETTINGS)


@pytest.fixture(scope="module")
def local_ray():
    # Ray takes seconds to start: once for the module, with two CPUs as on CI.
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_process_pool_gives_the_same_trials(in_process: SweepResult) -> None:
    pool = PoolExecutor(workers=2, threads_per_worker=1)
    try:
        pooled = run_sweep(TASK, executor=pool, **SETTINGS)
    finally:
        pool.close()
    same_trials(pooled, in_process)
    assert len({t.worker for t in pooled.trials}) >= 1
    assert all(t.worker != in_process.trials[0].worker for t in pooled.trials)


@pytest.mark.slow
def test_ray_gives_the_same_trials(local_ray, in_process: SweepResult, tmp_path: Path) -> None:
    executor = RayExecutor()
    on_ray = run_sweep(TASK, executor=executor, store=tmp_path / "s.sqlite", **SETTINGS)
    same_trials(on_ray, in_process)
    executor.close()
    assert local_ray.is_initialized()  # a Ray started by the caller is left running
    # Resuming the Ray sweep in this process reads every trial back instead of rerunning it.
    resumed = run_sweep(TASK, store=tmp_path / "s.sqlite", resume=True, **SETTINGS)
    assert resumed.ran == 0 and resumed.reused == len(in_process.trials)


def test_missing_ray_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(BadInputError, match=r"^executor: 'ray' needs Ray.*pip install"):
        import_ray()
    executor = make_executor("ray")
    with pytest.raises(BadInputError, match=r"^executor: 'ray' needs Ray"):
        run_sweep(TASK, executor=executor, **SETTINGS)


def test_make_executor_names() -> None:
    assert isinstance(make_executor("inprocess"), InProcessExecutor)
    pool = make_executor("pool", workers=3)
    assert isinstance(pool, PoolExecutor) and pool.workers == 3
    ray = make_executor("ray", ray_address="auto")
    assert isinstance(ray, RayExecutor) and ray.address == "auto"
    with pytest.raises(BadInputError, match=r"^executor: unknown executor 'slurm'"):
        make_executor("slurm")
    with pytest.raises(BadInputError, match=r"^workers: expected a positive integer, got 0"):
        PoolExecutor(workers=0)
