from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from batchpilot.errors import BadInputError
from batchpilot.loading import load_task
from batchpilot.sweep import Budget, Ladder, LrPlan, TrialSpec, TrialStore, run_sweep
from batchpilot.sweep.trials import failed_trial, run_trial

TASK = f"{Path(__file__).parent / 'sweep_task.py'}:task"

# One sweep, as a script, so that a test can run it in a process and kill that process.
SWEEP_SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
from batchpilot.sweep import Budget, Grid, Ladder, LrPlan, run_sweep
strategy = Ladder(start=32, min_batch=4) if sys.argv[3] == "ladder" else Grid((8, 16, 32, 64))
run_sweep(sys.argv[1], budget=Budget.equal_epochs(2, evals=4), strategy=strategy,
          lr=LrPlan(factors=(0.5, 1.0, 2.0)), objective="val_loss", store=sys.argv[2])
"""


def sweep_process(store: Path, strategy: str, delay: float) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SWEEP_TEST_DELAY": str(delay)}
    return subprocess.Popen(
        [sys.executable, "-c", SWEEP_SCRIPT, TASK, str(store), strategy],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def finished_trials(store: Path) -> int:
    try:
        with sqlite3.connect(store, timeout=10) as db:
            return int(
                db.execute("SELECT COUNT(*) FROM trials WHERE status = 'done'").fetchone()[0]
            )
    except sqlite3.OperationalError:  # not created yet
        return 0


def as_json(trials) -> str:
    return json.dumps([t.to_dict() for t in trials])


@pytest.fixture(scope="module")
def a_trial():
    spec = TrialSpec(
        key="b32-lr1",
        batch=32,
        micro_batch=32,
        accumulation_steps=1,
        lr_rule="linear",
        lr_factor=1.0,
        ref_batch=16,
        ref_lr=0.2,
        steps=8,
        eval_every=4,
        target_loss=0.6,
    )
    return spec, run_trial(load_task(TASK), spec)


def test_a_trial_and_its_curve_round_trip(tmp_path: Path, a_trial) -> None:
    _, result = a_trial
    with TrialStore(tmp_path / "s.sqlite") as store:
        assert store.journal_mode == "wal"
        assert store.open_sweep("one", {"task": "t"}) is True
        assert store.save("one", result) is True
    with TrialStore(tmp_path / "s.sqlite") as store:
        assert store.open_sweep("one", {"task": "t"}) is False
        (loaded,) = store.trials("one")
        assert as_json([loaded]) == as_json([result])  # NaN train loss at step 0 included
        assert store.get("one", "b32-lr1") is not None and store.get("one", "nope") is None
        assert [record.finished_trials for record in store.sweeps()] == [1]


def test_finished_trials_are_kept_and_failed_ones_replaced(tmp_path: Path, a_trial) -> None:
    spec, result = a_trial
    with TrialStore(tmp_path / "s.sqlite") as store:
        store.open_sweep("one", {})
        assert store.save("one", failed_trial(spec, "out of memory")) is True
        assert store.trials("one", status="failed")[0].error == "out of memory"
        assert store.save("one", result) is True  # the rerun replaces the failure
        assert store.save("one", replace(result, val_loss=123.0)) is False  # never overwritten
        (kept,) = store.trials("one")
        assert kept.val_loss == result.val_loss and len(kept.curve) == len(result.curve)


def test_store_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    with TrialStore(tmp_path / "s.sqlite") as store:
        store.open_sweep("one", {"budget": 1, "seed": 0})
        with pytest.raises(BadInputError, match=r"^name: .* other settings \(budget differ\)"):
            store.open_sweep("one", {"budget": 2, "seed": 0})
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(BadInputError, match=r"^store: .* is not a batchpilot trial store"):
        TrialStore(junk)
    with pytest.raises(BadInputError, match=r"^store: no such folder"):
        TrialStore(tmp_path / "missing" / "s.sqlite")


def test_a_sweep_killed_mid_way_resumes_to_the_same_trials(tmp_path: Path) -> None:
    killed = tmp_path / "killed.sqlite"
    process = sweep_process(killed, "ladder", delay=0.01)
    deadline = time.monotonic() + 90
    while finished_trials(killed) < 3:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, "the sweep made no progress"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # no clean-up of any kind runs
    process.wait()
    assert process.returncode == -signal.SIGKILL
    survived = finished_trials(killed)

    settings = {
        "budget": Budget.equal_epochs(2, evals=4),
        "strategy": Ladder(start=32, min_batch=4),
        "lr": LrPlan(factors=(0.5, 1.0, 2.0)),
        "objective": "val_loss",
    }
    resumed = run_sweep(TASK, store=killed, resume=True, **settings)
    whole = run_sweep(TASK, store=tmp_path / "whole.sqlite", **settings)
    assert 3 <= survived < len(whole.trials), "killed after the sweep had finished"
    assert (resumed.reused, resumed.ran) == (survived, len(whole.trials) - survived)
    assert [t.key for t in resumed.trials] == [t.key for t in whole.trials]
    assert [t.val_loss for t in resumed.trials] == [t.val_loss for t in whole.trials]
    assert [len(t.curve) for t in resumed.trials] == [len(t.curve) for t in whole.trials]
    with sqlite3.connect(killed) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# Many small commits from two processes at once: each to its own sweep and both to a shared one.
WRITER_SCRIPT = """
import json, sys
from batchpilot.sweep import TrialResult, TrialStore
template = json.loads(sys.argv[2])
with TrialStore(sys.argv[1]) as store:
    for sweep in (sys.argv[3], "shared"):
        store.open_sweep(sweep, {"writer": sweep if sweep != "shared" else None})
    for i in range(30):
        for sweep in (sys.argv[3], "shared"):
            key = f"b{i}-{sys.argv[3]}" if sweep != "shared" else f"b{i}"
            store.save(sweep, TrialResult.from_dict({**template, "key": key, "batch": i}))
"""


def test_two_sweeps_share_one_store(tmp_path: Path, a_trial) -> None:
    store = tmp_path / "shared.sqlite"
    template = json.dumps(a_trial[1].to_dict())
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER_SCRIPT, str(store), template, name],
            stderr=subprocess.PIPE,
        )
        for name in ("first", "second")
    ]
    for writer in writers:
        _, errors = writer.communicate(timeout=120)
        assert writer.returncode == 0, errors.decode()
    with TrialStore(store) as shared:
        counts = {record.name: record.finished_trials for record in shared.sweeps()}
        assert counts == {"first": 30, "second": 30, "shared": 30}
        points = len(a_trial[1].curve)
        for name in counts:
            assert all(len(t.curve) == points for t in shared.trials(name))
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(*) FROM curves").fetchone()[0] == 90 * points
