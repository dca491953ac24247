from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot.cli import main
from batchpilot.errors import BadInputError, UserCodeError
from batchpilot.loading import load_task
from batchpilot.measure._throughput import (
    ThroughputCurve,
    ThroughputPoint,
    batch_ladder,
    knee,
    measure_throughput,
    round_batch,
)
from batchpilot.task import Task


def test_round_batch() -> None:
    assert [round_batch(b, "pow2") for b in (1, 2, 3, 1000, 1024, 1437)] == [
        1,
        2,
        2,
        512,
        1024,
        1024,
    ]
    assert [round_batch(b, "8") for b in (5, 8, 15, 1437)] == [5, 8, 8, 1432]
    assert round_batch(1437, "none") == 1437
    with pytest.raises(BadInputError, match="round: expected one of"):
        round_batch(10, "pow3")


def test_ladder_is_log_spaced_and_ends_at_the_top() -> None:
    assert batch_ladder(1) == [1]
    assert batch_ladder(1437) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1437]
    assert batch_ladder(1000, factor=10) == [1, 10, 100, 1000]
    assert batch_ladder(300, min_batch=16, factor=4) == [16, 64, 256, 300]


def _curve(*points: tuple[int, float]) -> ThroughputCurve:
    measured = tuple(ThroughputPoint(b, s, b / s) for b, s in points)
    return ThroughputCurve(measured, knee(measured), 0, 0.9, (), "cpu", 0, 1, None, 0.0)


def test_knee_and_interpolation() -> None:
    points = [
        ThroughputPoint(b, s, b / s) for b, s in ((1, 50.0), (4, 180.0), (16, 460.0), (64, 500.0))
    ]
    assert knee(points, 0.9) == 16
    assert knee(points, 1.0) == 64
    assert knee(points, 0.3) == 4
    curve = _curve((4, 200.0), (16, 600.0), (64, 700.0))
    assert curve.samples_per_second_at(8) == pytest.approx(400.0)  # halfway in log2
    assert curve.samples_per_second_at(32) == pytest.approx(650.0)
    assert curve.samples_per_second_at(2) == pytest.approx(100.0)  # constant step time below
    assert curve.samples_per_second_at(500) == 700.0  # held above the largest measured
    assert curve.samples_per_second_at(16) == 600.0


def test_measured_curve_on_a_small_task() -> None:
    task = load_task(example="spiral")
    rng, py_rng = torch.get_rng_state(), random.getstate()
    curve = measure_throughput(task, max_batch=100, warmup_steps=1, timed_steps=3)
    assert [p.batch for p in curve.points] == [1, 2, 4, 8, 16, 32, 64, 96, 100]
    assert all(p.samples_per_second > 0 for p in curve.points)
    for p in curve.points:
        assert p.samples_per_second == pytest.approx(p.batch / p.seconds_per_step)
    # decisions read the fitted model, so the knee and the best batch are the fit's
    fitted = {p.batch: curve.samples_per_second_at(p.batch) for p in curve.points}
    best = max(fitted.values())
    assert fitted[curve.best_batch] == best
    assert fitted[curve.knee_batch] >= 0.9 * best
    assert all(s < 0.9 * best for b, s in fitted.items() if b < curve.knee_batch)
    model = curve.model
    assert model is not None and curve.timings is not None and curve.conditions is not None
    assert curve.timed_steps == curve.timings.rounds >= 3
    if model.curvature_seconds_per_sample2 == 0:  # the linear model's speed only rises
        speeds = [fitted[b] for b in sorted(fitted)]
        assert speeds == sorted(speeds)
    for b in fitted:
        assert 0 <= curve.relative_uncertainty_at(b) < 1
    assert {c.rule: c.rounded_batch for c in curve.rounding} == {"pow2": 64, "8": 96}
    assert curve.stopped_at is None
    assert torch.equal(rng, torch.get_rng_state()) and py_rng == random.getstate()
    data = json.loads(json.dumps(curve.to_dict()))
    assert data["points"][0].keys() >= {"batch", "samples_per_second"}
    assert data["knee_batch"] == curve.knee_batch
    assert data["model"]["alpha_seconds"] == model.alpha_seconds
    assert data["conditions"]["threads"] == curve.conditions.threads


class _Limited(nn.Module):
    def __init__(self, limit: int, error: Exception | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.limit = limit
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.error is not None:
            raise self.error
        if x.shape[0] > self.limit:
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"
            )
        return self.linear(x)


def _task(model: nn.Module) -> Task:
    return Task(
        model=lambda: model,
        train_data=TensorDataset(torch.randn(64, 2), torch.randn(64, 1)),
        loss=lambda m, b: F.mse_loss(m(b[0]), b[1]),
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
    )


def test_out_of_memory_ends_the_ladder() -> None:
    curve = measure_throughput(
        _task(_Limited(10)), batches=[2, 8, 16, 32], warmup_steps=0, timed_steps=1
    )
    assert [p.batch for p in curve.points] == [2, 8]
    assert curve.stopped_at == 16


def test_a_user_error_is_raised_not_skipped() -> None:
    with pytest.raises(UserCodeError, match="ZeroDivisionError"):
        measure_throughput(
            _task(_Limited(10, ZeroDivisionError("oops"))), batches=[2], timed_steps=1
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batches": [0]}, "batches: expected a positive integer"),
        ({"batches": [65]}, "batches: 65 is larger than the training set"),
        ({"batches": [2], "timed_steps": 0}, "timed_steps: expected a positive integer"),
        ({"batches": [2], "warmup_steps": -1}, "warmup_steps: expected an integer"),
        ({"batches": [2], "knee_fraction": 1.5}, "knee_fraction: expected a number in"),
    ],
)
def test_arguments_are_checked(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        measure_throughput(_task(_Limited(100)), **kwargs)  # type: ignore[arg-type]


def test_throughput_command(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(
            [
                "throughput",
                "--example",
                "xor4",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--batch",
                "64",
                "--format",
                "json",
                "--out",
                str(tmp_path),
            ]
        )
    out, _ = capsys.readouterr()
    assert info.value.code in (0, None)
    data = json.loads(out)
    assert [p["batch"] for p in data["points"]] == [1, 2, 4, 8, 16]
    assert data["knee_batch"] in {1, 2, 4, 8, 16}
    assert data["memory"]["max_micro_batch"] == 16
    plan = data["accumulation"]
    assert plan["micro_batch"] * plan["accumulation_steps"] == 64
    assert (tmp_path / "throughput.png").stat().st_size > 0
    with pytest.raises(SystemExit) as info:
        main(["throughput", "--example", "xor4", "--micro-batches", "2,x"])
    _, err = capsys.readouterr()
    assert info.value.code == 2 and "--micro-batches: expected comma-separated integers" in err


def test_a_model_that_cannot_train_on_one_sample_starts_the_ladder_at_two() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    curve = measure_throughput(_task(model), batches=[1, 2, 8], warmup_steps=1, timed_steps=1)
    assert [p.batch for p in curve.points] == [2, 8]
    assert any("micro-batch 1 failed" in w for w in curve.warnings)
    with pytest.raises(UserCodeError):  # at a single batch there is nothing to fall back on
        measure_throughput(_task(model), batches=[1], warmup_steps=1, timed_steps=1)


def test_a_single_batch_is_timed_without_a_model() -> None:
    curve = measure_throughput(_task(_Limited(100)), batches=[4], warmup_steps=1, timed_steps=1)
    assert curve.model is None and [p.batch for p in curve.points] == [4]
    assert curve.samples_per_second_at(4) == curve.points[0].samples_per_second
    assert any("no step-time model" in w for w in curve.warnings)
