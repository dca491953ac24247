from __future__ import annotations

import json
import math
import random
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchpilot.cli import main
from batchpilot.errors import BadInputError, UserCodeError
from batchpilot.loading import load_task
from batchpilot.measure._memory import StepMemory, measure_step_memory
from batchpilot.measure._memory_search import (
    find_max_batch,
    fit_memory_model,
    format_bytes,
    parse_size,
    search_max_batch,
)

# ---------------------------------------------------------------------------------------------
# Sizes and the line


def test_parse_size_units() -> None:
    assert parse_size("256MiB") == 256 * 2**20
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("80GiB") == parse_size("80G") == 80 * 2**30
    assert parse_size("1.5 gib") == 3 * 2**29
    assert parse_size("4096") == parse_size(4096) == 4096
    assert parse_size("2e9") == 2 * 10**9
    for bad in ("lots", "80 parsecs", "-3GB", "0"):
        with pytest.raises(BadInputError, match="device_memory: "):
            parse_size(bad)


def test_format_bytes() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(80 * 2**30) == "80.0 GiB"


def test_fit_recovers_a_line_and_its_error() -> None:
    fit = fit_memory_model([(4, 1400), (32, 4200), (300, 31000)])
    assert fit.fixed_bytes == pytest.approx(1000)
    assert fit.bytes_per_sample == pytest.approx(100)
    assert fit.max_relative_error < 1e-9
    assert fit.max_batch(1000 + 100 * 77.5) == 77
    bent = fit_memory_model([(4, 1400), (32, 4200), (300, 61000)])
    assert bent.max_relative_error > 0.05
    with pytest.raises(ValueError, match="two different batches"):
        fit_memory_model([(4, 10), (4, 11)])


# ---------------------------------------------------------------------------------------------
# The search on memory curves we know


def curve(
    bytes_at: Callable[[int], float], oom_above: int | None = None
) -> Callable[[int], StepMemory]:
    def measure(batch: int) -> StepMemory:
        if oom_above is not None and batch > oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        used = round(bytes_at(batch))
        return StepMemory(batch, used, used, 1000, "fake", "cpu")

    return measure


def true_max(bytes_at: Callable[[int], float], limit: float, cap: int) -> int:
    """The answer by brute force, on the bytes ``curve`` reports (whole bytes)."""
    return max((b for b in range(1, cap + 1) if round(bytes_at(b)) <= limit), default=0)


def test_linear_memory_is_found_exactly_in_five_probes() -> None:
    def line(b: int) -> float:
        return 5e6 + 3e4 * b

    outcome = search_max_batch(curve(line), limit_bytes=1e9, cap=100_000)
    assert outcome.max_batch == true_max(line, 1e9, 100_000) == 33_166
    # Two to fit, one to check the line, one to verify its answer, one 2 % above that fails.
    assert [p.stage for p in outcome.probes] == ["fit", "fit", "check", "verify", "bracket"]
    assert not outcome.probes[-1].ok and outcome.probes[-1].batch <= 1.02 * 33_166 + 1
    assert not outcome.poor_fit
    assert outcome.fit is not None and outcome.fit.bytes_per_sample == pytest.approx(3e4)


def test_a_workspace_jump_is_detected_and_bracketed() -> None:
    def jump(b: int) -> float:  # a kernel switches to a 200 MB workspace above batch 500
        return 1e6 + 1e5 * b + (2e8 if b > 500 else 0)

    limit = 1e9
    outcome = search_max_batch(curve(jump), limit_bytes=limit, cap=100_000)
    best = true_max(jump, limit, 100_000)
    assert jump(outcome.max_batch) <= limit
    assert outcome.max_batch >= 0.95 * best
    assert len(outcome.probes) <= 10


def test_out_of_memory_before_the_line_says_steps_down() -> None:
    def line(b: int) -> float:
        return 1e6 + 1e4 * b

    # The allocator fails at 2,000 although the line (and the limit) allow ~9,900.
    outcome = search_max_batch(curve(line, oom_above=2000), limit_bytes=1e8, cap=50_000)
    assert 0.95 * 2000 <= outcome.max_batch <= 2000
    assert any(p.out_of_memory for p in outcome.probes)
    assert all(p.ok == (not p.out_of_memory and line(p.batch) <= 1e8) for p in outcome.probes)


def test_the_cap_ends_the_search_with_one_real_step() -> None:
    outcome = search_max_batch(curve(lambda b: 1e3 * b), limit_bytes=1e12, cap=1437)
    assert outcome.max_batch == 1437
    assert [p.batch for p in outcome.probes][-1] == 1437


def test_nothing_fits() -> None:
    outcome = search_max_batch(curve(lambda b: 1e9 + b), limit_bytes=1e6, cap=1000)
    assert outcome.max_batch == 0
    assert any(p.batch == 1 for p in outcome.probes)


def test_estimates_fit_the_line_and_real_steps_verify() -> None:
    calls: list[tuple[str, int]] = []

    def real(b: int) -> StepMemory:
        calls.append(("real", b))
        return StepMemory(b, 1000 + 100 * b, 1000 + 100 * b, 1000, "tracked", "cpu")

    def estimate(b: int) -> StepMemory:
        calls.append(("fake", b))
        return StepMemory(b, 1000 + 100 * b, 1000 + 100 * b, 1000, "fake", "cpu")

    estimated = search_max_batch(estimate, limit_bytes=100_000, cap=5000)
    outcome = search_max_batch(real, estimates=estimated.probes, limit_bytes=100_000, cap=5000)
    assert outcome.max_batch == 990
    # The search ran on estimates to its end, then one real step verified its answer.
    assert calls == [
        ("fake", 4),
        ("fake", 32),
        ("fake", 178),
        ("fake", 990),
        ("fake", 1009),
        ("real", 990),
    ]
    assert [p.estimated for p in outcome.probes] == [True] * 5 + [False]


def test_allocator_overhead_is_kept_free() -> None:
    def measure(b: int) -> StepMemory:  # reserved is 10 % above allocated
        return StepMemory(b, 1000 * b, 1100 * b, 0, "cuda", "cuda:0")

    outcome = search_max_batch(measure, limit_bytes=1e6, cap=10_000)
    assert outcome.max_batch * 1100 <= 1e6 + 1100
    assert outcome.max_batch >= 0.95 * (1e6 / 1100)
    assert outcome.overhead_bytes > 0


@settings(max_examples=60, deadline=None)
@given(
    fixed=st.floats(1e3, 1e8),
    per_sample=st.floats(10, 1e6),
    bend=st.floats(-0.3, 0.6),
    jump_at=st.integers(1, 5000),
    jump=st.floats(0, 5e8),
    limit=st.floats(1e6, 1e10),
    cap=st.integers(1, 20_000),
)
def test_the_answer_never_exceeds_the_limit(
    fixed: float,
    per_sample: float,
    bend: float,
    jump_at: int,
    jump: float,
    limit: float,
    cap: int,
) -> None:
    def memory(b: int) -> float:  # convex or concave, with a workspace jump: always increasing
        return fixed + per_sample * b ** (1 + bend) + (jump if b > jump_at else 0.0)

    outcome = search_max_batch(curve(memory), limit_bytes=limit, cap=cap)
    best = true_max(memory, limit, cap) if cap <= 2000 else None
    assert outcome.max_batch <= cap
    if outcome.max_batch:
        assert round(memory(outcome.max_batch)) <= limit
    if best is not None:
        assert outcome.max_batch >= 0.9 * best
    assert len(outcome.probes) <= 18


# ---------------------------------------------------------------------------------------------
# find_max_batch on real tasks


@pytest.mark.parametrize("mode", ["fake", "tracked"])
def test_budget_is_respected_and_five_percent_more_would_not_fit(mode: str) -> None:
    task = load_task(example="digits")
    budget = 24 * 2**20
    result = find_max_batch(task, budget_bytes=budget, margin=0.0, mode=mode)
    b = result.max_micro_batch
    assert result.capped_by == "memory" and 0 < b < task.train_size
    at_b = measure_step_memory(task, b, mode=mode)
    above = measure_step_memory(task, math.ceil(1.05 * b), mode=mode)
    assert at_b.peak_bytes <= budget < above.peak_bytes
    assert result.peak_bytes == at_b.peak_bytes
    assert result.bytes_per_sample == pytest.approx(41_224, rel=0.02)  # digits: see docs
    assert result.steps <= 6


def test_the_margin_is_kept_and_reported() -> None:
    task = load_task(example="digits")
    result = find_max_batch(task, budget_bytes=24 * 2**20, margin=0.2, mode="fake")
    assert result.margin_bytes >= 0.2 * result.budget_bytes
    assert result.peak_bytes <= result.limit_bytes == result.budget_bytes - result.margin_bytes
    assert json.loads(json.dumps(result.to_dict()))["max_micro_batch"] == result.max_micro_batch


def test_dataset_and_max_batch_cap_the_search() -> None:
    task = load_task(example="spiral")
    result = find_max_batch(task, budget_bytes=2**30)
    assert result.max_micro_batch == 250 and result.capped_by == "dataset"
    assert result.steps <= 3  # priming and one verification
    capped = find_max_batch(task, budget_bytes=2**30, max_batch=100)
    assert capped.max_micro_batch == 100 and capped.capped_by == "max_batch"


def test_a_budget_larger_than_this_machine_is_planned_on_fake_tensors() -> None:
    result = find_max_batch(load_task(example="digits"), budget_bytes=2**50)
    assert result.mode == "fake" and result.max_micro_batch == 1437
    assert any("fake tensors" in note for note in result.notes)


def test_default_budget_on_cpu_says_where_it_comes_from() -> None:
    result = find_max_batch(load_task(example="xor4"))
    assert result.max_micro_batch == 16
    assert any(note.startswith("no budget given") for note in result.notes)
    assert result.budget_bytes > 0 and result.budget_source


def test_search_leaves_the_users_model_and_rng_unchanged() -> None:
    task = load_task(example="digits")
    model = task.make_model("cpu")
    optimizer = task.make_optimizer(model.parameters(), 0.05)
    for batch in list(task.loader(64))[:2]:
        optimizer.zero_grad()
        task.compute_loss(model, batch).backward()
        optimizer.step()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    momentum = [s["momentum_buffer"].clone() for s in optimizer.state.values()]
    rng, py_rng = torch.get_rng_state(), random.getstate()
    find_max_batch(task, budget_bytes=16 * 2**20, model=model, optimizer=optimizer)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(
        torch.equal(a, p.grad)
        for a, p in zip(grads, model.parameters(), strict=True)
        if p.grad is not None
    )
    assert all(
        torch.equal(a, s["momentum_buffer"])
        for a, s in zip(momentum, optimizer.state.values(), strict=True)
    )
    assert torch.equal(rng, torch.get_rng_state()) and py_rng == random.getstate()


def test_a_user_error_is_not_taken_for_out_of_memory() -> None:
    task = load_task(example="spiral")
    broken = type(task)(
        model=task.model,
        train_data=task.train_data,
        loss=lambda m, b: m(b[0][:, :1]).mean(),  # wrong input width: a shape error
        optimizer=task.optimizer,
    )
    with pytest.raises(UserCodeError, match=r"Task\.loss"):
        find_max_batch(broken, budget_bytes=2**30)


def test_not_even_one_fits() -> None:
    with pytest.raises(BadInputError, match="budget_bytes: not even a micro-batch of 1 fits"):
        find_max_batch(load_task(example="digits"), budget_bytes=50_000, mode="fake")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"margin": 1.5}, "margin: expected a fraction in"),
        ({"budget_bytes": -1}, "budget_bytes: expected a positive integer"),
        ({"max_batch": 0}, "max_batch: expected a positive integer"),
        ({"mode": "magic"}, "mode: unknown mode"),
        ({"mode": "fake"}, "budget_bytes: fake tensors have no device"),
    ],
)
def test_arguments_are_checked(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        find_max_batch(load_task(example="xor4"), **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# The command


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def test_memory_command_json_and_plot(capsys: pytest.CaptureFixture[str], tmp_path: object) -> None:
    code, out, _ = run(
        capsys,
        "memory",
        "--example",
        "digits",
        "--device-memory",
        "16MiB",
        "--round",
        "8",
        "--mode",
        "fake",
        "--format",
        "json",
        "--out",
        str(tmp_path),
    )
    assert code == 0
    data = json.loads(out)
    for key in ("max_micro_batch", "peak_bytes", "fixed_bytes", "bytes_per_sample", "budget_bytes"):
        assert key in data
    assert data["budget_bytes"] == 16 * 2**20
    assert data["micro_batch"] == data["max_micro_batch"] // 8 * 8
    assert {"batch", "peak_bytes", "ok"} <= data["probes"][0].keys()
    assert data["plot"].endswith("memory.png")


def test_memory_command_table_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "memory", "--example", "xor4", "--device-memory", "1GiB")
    assert code == 0 and "max micro-batch 16" in out
    code, _, err = run(capsys, "memory", "--example", "xor4", "--device-memory", "lots")
    assert code == 2 and "--device-memory: cannot read 'lots'" in err
    code, _, err = run(capsys, "memory", "--example", "xor4", "--margin", "5")
    assert code == 2 and "--margin: expected a fraction in [0, 1) (0.05 = 5 %), got 5" in err
    code, _, err = run(capsys, "memory", "--example", "xor4", "--round", "7")
    assert code == 2 and "--round: expected one of" in err
