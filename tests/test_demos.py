"""The seed demonstrations: each quick run holds its measured effect, and the numbers add up."""

from __future__ import annotations

import io
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from batchpilot.cli import demo as demo_cli
from batchpilot.cli import main
from batchpilot.demos import DEMOS, run_demo
from batchpilot.demos.decay_vs_batch import (
    DecayVsBatchResult,
    Phase,
    noise_scale,
    schedule_phases,
)
from batchpilot.demos.findings import Finding, verdict
from batchpilot.demos.playground import PlaygroundResult
from batchpilot.demos.sketch import SketchResult, gradient_cosines, sketch_task
from batchpilot.demos.xor import XorResult, find_plateaus
from batchpilot.errors import BadInputError

# ---------------------------------------------------------------- quick runs, one each per module


@pytest.fixture(scope="module")
def xor() -> XorResult:
    torch.set_num_threads(1)
    before = torch.random.get_rng_state()
    result = run_demo("xor", seed=0, quick=True)
    assert isinstance(result, XorResult)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is left alone
    return result


@pytest.fixture(scope="module")
def playground() -> PlaygroundResult:
    torch.set_num_threads(1)
    result = run_demo("playground", seed=0, quick=True)
    assert isinstance(result, PlaygroundResult)
    return result


@pytest.fixture(scope="module")
def sketch() -> SketchResult:
    torch.set_num_threads(1)
    result = run_demo("sketch", seed=0, quick=True)
    assert isinstance(result, SketchResult)
    return result


@pytest.fixture(scope="module")
def decay() -> DecayVsBatchResult:
    torch.set_num_threads(1)
    result = run_demo("decay-vs-batch", seed=0, quick=True)
    assert isinstance(result, DecayVsBatchResult)
    return result


# ------------------------------------------------------------------------------ plateau finding


def test_find_plateaus_on_a_staircase() -> None:
    iterations = tuple(range(0, 3000, 10))
    # 0.25 until 1000, a fast drop to 0.06, flat until 2000, then down to fitted.
    losses = tuple(
        0.25 if i < 1000 else 0.06 if i < 2000 else 0.06 * math.exp(-(i - 2000) / 50)
        for i in iterations
    )
    plateaus = find_plateaus(iterations, losses, min_iterations=300)
    assert [(p.start_iteration, p.end_iteration) for p in plateaus] == [(0, 920), (1070, 1930)]
    assert [p.loss for p in plateaus] == [0.25, 0.06]
    assert plateaus[0].iterations == 920


def test_find_plateaus_ignores_steady_descent_and_the_fitted_floor() -> None:
    iterations = tuple(range(0, 2000, 10))
    falling = tuple(0.25 * math.exp(-i / 200) for i in iterations)  # falls ~22 % per 50 steps
    assert find_plateaus(iterations, falling, min_iterations=200, tolerance=0.1) == ()
    fitted = (0.005,) * len(iterations)  # flat, but below the fitted level
    assert find_plateaus(iterations, fitted, min_iterations=200) == ()


def test_find_plateaus_counts_noisy_wandering_that_never_gets_lower() -> None:
    iterations = tuple(range(0, 1000, 10))
    wander = tuple(0.25 + 0.1 * abs(math.sin(i / 30)) for i in iterations)
    plateaus = find_plateaus(iterations, wander, min_iterations=500)
    assert len(plateaus) == 1 and plateaus[0].loss == pytest.approx(0.25)


def test_find_plateaus_validates() -> None:
    with pytest.raises(BadInputError, match="min_iterations"):
        find_plateaus((0, 1), (0.1, 0.1), min_iterations=0)
    with pytest.raises(BadInputError, match="losses"):
        find_plateaus((0, 1), (0.1,), min_iterations=1)


# ------------------------------------------------------------------------------------------ xor


def test_xor_full_batch_descends_in_stairs(xor: XorResult) -> None:
    full = xor.full_batch
    assert full.batch == 16 and xor.mini_batch.batch == 4
    assert len(full.plateaus) >= 2 and len(full.plateaus) > 0
    # The first stair is the symmetric saddle: every output 0.5, so the MSE is exactly 0.25.
    assert full.plateaus[0].loss == pytest.approx(0.25, abs=0.005)
    levels = [p.loss for p in full.plateaus]
    assert levels == sorted(levels, reverse=True) and len(set(levels)) == len(levels)
    assert xor.findings[0].holds


def test_xor_numbers_add_up(xor: XorResult) -> None:
    for run in xor.runs:
        assert run.iterations == 4000 and run.epochs == pytest.approx(4000 * run.batch / 16)
        assert run.curve_iterations[-1] == 4000
        assert run.plateau_iterations == sum(p.iterations for p in run.plateaus) <= 4000
        if run.iterations_to_fit is not None:
            k = run.curve_iterations.index(run.iterations_to_fit)
            assert run.curve_losses[k] <= xor.fit_loss < min(run.curve_losses[:k])
            assert run.epochs_to_fit == run.iterations_to_fit * run.batch / 16
        else:
            assert min(run.curve_losses) > xor.fit_loss
    # The verdict reports each part as measured, whichever way it went.
    assert xor.verdict == verdict(xor.findings)
    assert xor.findings[1].holds == (
        xor.mini_batch.plateau_iterations < xor.full_batch.plateau_iterations
    )
    json.dumps(xor.to_dict())


# ----------------------------------------------------------------------------------- playground


def test_playground_batch_30_is_stuck_and_batch_1_wobbles(playground: PlaygroundResult) -> None:
    small, large = playground.small, playground.large
    assert (small.batch, large.batch, small.lr) == (1, 30, 0.03)
    assert (small.steps_per_epoch, large.steps_per_epoch) == (250, 8)
    assert len(small.curve_epochs) == small.epochs == 30 and small.curve_epochs[-1] == 30.0
    assert large.epochs_to_fit is None and large.best_accuracy < 0.75  # stuck
    assert small.loss_rise_per_epoch > 10 * large.loss_rise_per_epoch  # batch 1 wobbles
    assert playground.findings[0].holds and playground.findings[3].holds
    assert small.best_accuracy == max(small.curve_accuracies)
    json.dumps(playground.to_dict())


# ------------------------------------------------------------------------------------- sketch


def test_sketch_full_batch_strokes_all_point_one_way(sketch: SketchResult) -> None:
    cosines = [run.mean_cosine_to_full for run in sketch.runs]
    assert [run.batch for run in sketch.runs] == [1, 2, 3, 6]
    assert cosines[-1] == pytest.approx(1.0, abs=1e-6)
    assert all(a < b for a, b in itertools.pairwise(cosines))
    assert [run.distinct_batches for run in sketch.runs] == [6, 15, 20, 1]
    assert [run.steps for run in sketch.runs] == [900, 450, 300, 150]  # same 150 epochs
    assert sketch.runs[-1].max_gap_to_full == 0.0
    assert sketch.findings[0].holds and sketch.findings[1].holds
    json.dumps(sketch.to_dict())


def test_gradient_cosines_of_single_samples_average_to_the_full_gradient() -> None:
    task = sketch_task()
    torch.manual_seed(0)
    model = task.make_model()
    before = [p.detach().clone() for p in model.parameters()]
    assert gradient_cosines(task, model, 6) == [pytest.approx(1.0)]
    singles = gradient_cosines(task, model, 1)
    assert len(singles) == 6 and all(-1.0 <= c <= 1.0 for c in singles)
    assert all(p.grad is None for p in model.parameters())  # gradients left cleared
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# ------------------------------------------------------------------------------ decay-vs-batch


def test_schedules_keep_the_noise_scale_alike() -> None:
    decay = schedule_phases(
        epochs=12, milestones=(6, 9), lr=0.05, batch=64, factor=4, kind="decay lr"
    )
    grow = schedule_phases(
        epochs=12, milestones=(6, 9), lr=0.05, batch=64, factor=4, kind="increase batch"
    )
    assert [p.lr for p in decay] == [0.05, 0.0125, 0.003125]
    assert [p.batch for p in grow] == [64, 256, 1024]
    for a, b in zip(decay, grow, strict=True):
        assert noise_scale(a, dataset_size=1437, momentum=0.9) == pytest.approx(
            noise_scale(b, dataset_size=1437, momentum=0.9)
        )
    assert noise_scale(Phase(1.0, 10, 0.1), dataset_size=100) == pytest.approx(1.0)
    with pytest.raises(BadInputError, match="milestones"):
        schedule_phases(epochs=4, milestones=(3, 2), lr=0.1, batch=8, factor=2, kind="decay lr")


def test_decay_vs_batch_fewer_updates_same_start(decay: DecayVsBatchResult) -> None:
    assert decay.increase.updates < decay.decay.updates == decay.constant.updates
    # All three share the first phase (same seed, batch, lr and data order): identical losses.
    first = decay.decay.train_losses[0]
    assert decay.increase.train_losses[0] == first == decay.constant.train_losses[0]
    for run in decay.runs:
        largest = max(p.batch for p in run.phases)
        seen = run.curve_epochs[-1] * decay.dataset_size
        assert abs(seen - 4 * decay.dataset_size) <= largest / 2  # 4 epochs, to the nearest step
        assert not run.diverged
    assert decay.findings[2].holds
    ratio = decay.increase.final_train_loss / decay.decay.final_train_loss
    assert decay.findings[0].holds == (abs(ratio - 1) <= 0.2)
    json.dumps(decay.to_dict())


# ------------------------------------------------------------------------------ registry and CLI


def test_registry_and_verdict_words() -> None:
    assert list(DEMOS) == ["xor", "playground", "sketch", "decay-vs-batch"]
    with pytest.raises(BadInputError, match="unknown demo 'nope'"):
        run_demo("nope", seed=0)
    yes, no = Finding("a", "1", True), Finding("b", "0", False)
    assert verdict((yes, yes)) == "reproduced"
    assert verdict((no,)) == "not reproduced"
    assert verdict((yes, no)).startswith("partly reproduced: 1 of 2")


def test_run_demo_runs_on_one_thread_and_restores_the_count() -> None:
    torch.set_num_threads(2)
    try:
        result = run_demo("sketch", seed=0, quick=True, epochs=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert isinstance(result, SketchResult) and result.epochs == 2


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def test_cli_lists_runs_and_writes_the_plot(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, sketch: SketchResult
) -> None:
    code, out, _ = run_cli(capsys, "demo", "--list", "--format", "json")
    assert code == 0
    assert [d["name"] for d in json.loads(out)["demos"]] == list(DEMOS)
    code, _, err = run_cli(capsys, "demo", "nope")
    assert code == 2 and "unknown demo 'nope'" in err
    code, out, _ = run_cli(
        capsys, "demo", "sketch", "--quick", "--out", str(tmp_path), "--format", "json"
    )
    assert code == 0
    data = json.loads(out)
    assert data["name"] == "sketch" and data["verdict"] and data["claim"]
    assert Path(data["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert json.loads(Path(data["json"]).read_text())["runs"][0]["batch"] == 1
    # Same seed, same numbers: the run is deterministic.
    assert data["runs"] == json.loads(json.dumps(sketch.to_dict()["runs"]))


def test_cli_table_says_what_it_reproduced(sketch: SketchResult) -> None:
    buffer = io.StringIO()
    demo_cli._render(Console(file=buffer, width=200), sketch, {"plot": "x.png", "json": "x.json"})
    text = buffer.getvalue()
    assert "The seed says" in text and f"Verdict: {sketch.verdict}" in text
    assert f"{sketch.runs[0].mean_cosine_to_full:.3f}" in text
