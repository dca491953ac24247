from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from batchpilot.cli import main
from batchpilot.loading import load_task
from batchpilot.report.tune import write_tune_report
from batchpilot.tune import TuneOptions, TuneResult, tune
from browser import load_in_browser

FAST = TuneOptions(
    seed=0,
    max_batch=64,
    throughput_steps=2,
    lr_steps=30,
    lr_repeats=2,
    noise_steps=30,
    verify=True,
    verify_epochs=1.0,
)


@pytest.fixture(scope="module")
def spiral_result() -> TuneResult:
    torch.set_num_threads(1)
    return tune(load_task(example="spiral"), FAST)


def test_recommendation_is_coherent(spiral_result: TuneResult) -> None:
    rec = spiral_result.recommendation
    assert rec.global_batch == rec.micro_batch * rec.accumulation_steps * rec.world_size
    assert 1 <= rec.micro_batch <= spiral_result.memory.max_micro_batch <= 64
    assert rec.lr > 0 and rec.reference_batch == 10  # the spiral task's reference batch
    assert rec.steps_per_epoch == -(-250 // rec.global_batch)
    assert spiral_result.noise is not None and spiral_result.noise.steps == 30
    assert len(spiral_result.lr_find.runs) == 2
    assert rec.expected_samples_per_second > 0
    verification = spiral_result.verification
    assert verification is not None
    assert [r.global_batch for r in verification.runs] == [
        b for b in (rec.global_batch // 2, rec.global_batch, rec.global_batch * 2) if 1 <= b <= 250
    ]
    best = min(verification.runs, key=lambda r: r.score or float("inf"))
    assert verification.best_batch == best.global_batch


def test_the_lr_is_checked_at_the_recommended_batch(spiral_result: TuneResult) -> None:
    rec, check = spiral_result.recommendation, spiral_result.lr_check
    assert check is not None and rec.lr_source == "checked"
    assert check.global_batch == rec.global_batch
    assert rec.lr == check.lr and rec.rule_lr == check.rule_lr
    tried = sorted(t.lr for t in check.trials)
    assert len(tried) >= 3 and check.rule_grid_lr in tried and check.lr in tried
    ratios = [b / a for a, b in itertools.pairwise(tried)]
    # one √2 grid (a gallop may leave gaps away from the chosen lr: whole powers of √2)
    steps = [math.log(r) / math.log(2**0.5) for r in ratios]
    assert all(abs(k - round(k)) < 1e-9 and k >= 1 - 1e-9 for k in steps)
    if check.best_lr is not None and check.complete:  # the chosen lr's neighbours were both run
        exponents = {round(math.log(t.lr) / math.log(2**0.5)) for t in check.trials}
        chosen = round(math.log(check.lr) / math.log(2**0.5))
        assert chosen - 1 in exponents and chosen + 1 in exponents
    assert any(r.startswith("lr checked at batch") for r in rec.reasons)
    assert rec.warmup_reason
    noise = spiral_result.noise
    assert noise is not None and noise.window_steps <= noise.steps
    assert rec.noise_scale == noise.plan_noise_scale


def test_json_schema(spiral_result: TuneResult) -> None:
    data = json.loads(json.dumps(spiral_result.to_dict()))
    for key in (
        "micro_batch",
        "accumulation_steps",
        "world_size",
        "global_batch",
        "lr",
        "betas",
        "eps",
        "warmup_steps",
        "expected_samples_per_second",
        "steps_to_target_ratio",
        "bound_by",
        "reasons",
        "warnings",
    ):
        assert key in data["recommendation"], key
    for phase in ("memory", "throughput", "lr_find", "noise", "lr_check", "verification"):
        assert data[phase] is not None, phase
    assert "max_micro_batch" in data["memory"] and "knee_batch" in data["throughput"]
    assert "suggestion" in data["lr_find"] and "noise_scale" in data["noise"]
    assert {"rule_lr", "lr_source", "warmup_reason", "noise_interval"} <= set(
        data["recommendation"]
    )
    assert {"window_steps", "plan_noise_scale", "plan_quantity"} <= set(data["noise"])
    assert data["lr_check"]["trials"] and data["lr_check"]["lr"] == data["recommendation"]["lr"]


def test_report_is_written_and_loads_in_a_browser(
    spiral_result: TuneResult, tmp_path: Path
) -> None:
    page = write_tune_report(spiral_result, tmp_path / "report")
    text = page.read_text()
    for section in (
        "Recommendation",
        "Where each number comes from",
        "Memory",
        "Throughput",
        "range test",
        "noise scale",
        "The lr checked at batch",
        "Optimizer settings to change",
        "Verification",
        "Formulas",
        "Epochs and iterations",
    ):
        assert section in text, section
    assert text.count("data:image/png;base64,") >= 6
    assert json.loads((tmp_path / "report" / "result.json").read_text())["recommendation"]
    checks = load_in_browser(page, tmp_path)
    assert checks["broken-images"] == "0" and checks["errors"] == "0"
    assert int(checks["images"]) >= 5


def test_world_size_plans_for_more_devices() -> None:
    task = load_task(example="xor4")
    options = TuneOptions(
        max_batch=8,
        throughput_steps=1,
        lr_steps=20,
        lr_repeats=1,
        noise_steps=20,
        world_size=2,
        time_budget_seconds=60,
    )
    rec = tune(task, options).recommendation
    assert rec.world_size == 2 and rec.global_batch % 2 == 0
    assert rec.per_device_batch == rec.global_batch // 2


def test_cli_tune_json_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(
            [
                "tune",
                "--example",
                "xor4",
                "--max-micro-batch",
                "8",
                "--throughput-steps",
                "1",
                "--lr-steps",
                "20",
                "--lr-repeats",
                "1",
                "--noise-steps",
                "20",
                "--out",
                str(tmp_path / "r"),
                "--format",
                "json",
                "--device",
                "cpu",
            ]
        )
    out, _ = capsys.readouterr()
    assert info.value.code == 0
    data = json.loads(out)
    assert data["recommendation"]["global_batch"] >= 1
    assert Path(data["report"]).is_file()


def test_cli_tune_bad_budget(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["tune", "--example", "xor4", "--noise-steps", "0"])
    _, err = capsys.readouterr()
    assert info.value.code == 2
    assert err.strip() == "batchpilot: error: --noise-steps: expected a positive integer, got 0"


def test_a_target_loss_you_give_is_the_one_the_lr_check_counts_steps_to() -> None:
    torch.set_num_threads(1)
    options = TuneOptions(
        seed=0, max_batch=64, throughput_steps=2, lr_steps=30, lr_repeats=1, noise_steps=30
    )
    given = tune(load_task(example="spiral"), replace(options, target_loss=0.68))
    assert given.lr_check is not None and given.lr_check.target_loss == 0.68
    assert given.noise is not None and given.noise.target_loss != 0.68
    reached = [r for t in given.lr_check.trials for r in t.reached if math.isfinite(r)]
    assert reached and given.lr_check.score == "steps to target"  # seeds stopped at 0.68
    if given.critical_batch is not None:
        assert given.critical_batch.target_loss == 0.68
