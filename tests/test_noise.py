"""The gradient noise scale: closed-form truth, bitwise-neutral observation, AMP, DDP, the CLI."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from batchpilot.errors import BadInputError
from batchpilot.loading import load_task
from batchpilot.measure._noise import (
    GradientNoiseScale,
    NoiseScalePoint,
    NoiseScaleWarning,
    critical_batch_over_run,
    measure_noise_scale,
    ratio_interval,
    unbiased_moments,
)

DIM = 8
NOISE_VAR = 1.0


def _regression_model() -> nn.Linear:
    """w − w* has squared norm 1 (w* = 0), so |G|² = 1 exactly."""
    model = nn.Linear(DIM, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0 / math.sqrt(DIM))
    return model


def _regression_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, DIM, generator=generator)
    y = math.sqrt(NOISE_VAR) * torch.randn(n, generator=generator)  # y = w*·x + ε, w* = 0
    return x, y


# Per-sample loss ½(w·x − y)², x ~ N(0, I), ε ~ N(0, σ²), δ = w − w*: the gradient (δ·x − ε)x has
# mean G = δ and covariance Σ = (|δ|² + σ²) I + δδᵀ, so tr Σ = d(|δ|² + σ²) + |δ|².
TRUE_GRADIENT_SQ = 1.0
TRUE_TRACE = DIM * (1.0 + NOISE_VAR) + 1.0


@pytest.mark.parametrize(
    ("reduction", "sizes"),
    [("mean", (16, 16, 16, 16)), ("sum", (16, 16, 16, 16)), ("mean", (8, 24, 16, 16))],
)
def test_linear_regression_matches_closed_form(reduction: str, sizes: tuple[int, ...]) -> None:
    model = _regression_model()
    noise = GradientNoiseScale(model, reduction=reduction, ema_decay=0.999, max_overhead=None)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(0)
    for _ in range(600):
        model.zero_grad(set_to_none=True)
        for size in sizes:
            x, y = _regression_batch(size, generator)
            per_sample = 0.5 * (model(x).squeeze(1) - y) ** 2
            if reduction == "mean":
                (per_sample.mean() / len(sizes)).backward()
            else:
                per_sample.sum().backward()
            noise.record_micro_batch(size)
        noise.finish_step()
    estimate = noise.estimate()
    assert estimate.steps == 600
    assert estimate.gradient_sq_norm == pytest.approx(TRUE_GRADIENT_SQ, rel=0.1)
    assert estimate.trace_covariance == pytest.approx(TRUE_TRACE, rel=0.1)
    assert estimate.noise_scale == pytest.approx(TRUE_TRACE / TRUE_GRADIENT_SQ, rel=0.1)
    low, high = estimate.noise_scale_interval
    assert low < TRUE_TRACE / TRUE_GRADIENT_SQ < high
    assert high - low < 0.3 * estimate.noise_scale


def test_finite_dataset_correction_gives_the_exact_full_gradient() -> None:
    """With the whole dataset as the step's batch, |G|² is the full gradient's norm exactly and
    tr Σ the population covariance's trace, once the dataset size is known."""
    generator = torch.Generator().manual_seed(1)
    x, y = _regression_batch(32, generator)
    model = _regression_model()
    per_sample_grads = []
    for i in range(32):
        model.zero_grad()
        (0.5 * (model(x[i : i + 1]).squeeze(1) - y[i : i + 1]) ** 2).sum().backward()
        per_sample_grads.append(model.weight.grad.detach().reshape(-1).clone())  # type: ignore[union-attr]
    grads = torch.stack(per_sample_grads).double()
    full = grads.mean(0)
    population_trace = float(((grads - full) ** 2).sum(1).mean())

    corrected = GradientNoiseScale(model, dataset_size=32, ema_decay=0.999, max_overhead=None)
    plain = GradientNoiseScale(model, ema_decay=0.999, max_overhead=None)
    for _ in range(300):
        model.zero_grad(set_to_none=True)
        order = torch.randperm(32, generator=generator)
        for part in order.split(8):
            (0.5 * (model(x[part]).squeeze(1) - y[part]) ** 2).mean().div(4).backward()
            corrected.record_micro_batch(8)
            plain.record_micro_batch(8)
        corrected.finish_step()
        plain.finish_step()
    assert corrected.estimate().gradient_sq_norm == pytest.approx(float(full @ full), rel=1e-5)
    assert corrected.estimate().trace_covariance == pytest.approx(population_trace, rel=0.1)
    # Without the correction the sampling without replacement biases |G|² down.
    assert plain.estimate().gradient_sq_norm < 0.9 * float(full @ full)


def _tiny_bn_model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _train(observe: bool, *, steps: int = 4, parts: int = 3) -> tuple[nn.Module, Any, Any]:
    torch.manual_seed(0)
    model = _tiny_bn_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    noise = GradientNoiseScale(model, warn_batchnorm=False, max_overhead=None) if observe else None
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for _ in range(parts):
            images = torch.randn(6, 5, generator=generator)
            labels = torch.randint(0, 3, (6,), generator=generator)
            (F.cross_entropy(model(images), labels) / parts).backward()
            if noise is not None:
                noise.record_micro_batch(6)
        if noise is not None:
            noise.finish_step()
        optimizer.step()
    return model, optimizer, noise


def test_observing_leaves_the_training_step_bitwise_unchanged() -> None:
    plain_model, plain_optimizer, _ = _train(observe=False)
    model, optimizer, noise = _train(observe=True)
    assert noise.steps == 4
    for (name, a), b in zip(
        plain_model.state_dict().items(), model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name  # parameters and BatchNorm statistics
    for a, b in zip(plain_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    for a, b in zip(
        plain_optimizer.state_dict()["state"].values(),
        optimizer.state_dict()["state"].values(),
        strict=True,
    ):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_amp_loss_scale_is_divided_out() -> None:
    def run(scaler: torch.amp.GradScaler | None) -> tuple[float, float]:
        model = _regression_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        noise = GradientNoiseScale(model, scaler=scaler, max_overhead=None)
        generator = torch.Generator().manual_seed(2)
        for _ in range(40):
            optimizer.zero_grad(set_to_none=True)
            for _ in range(4):
                x, y = _regression_batch(8, generator)
                loss = (0.5 * (model(x).squeeze(1) - y) ** 2).mean() / 4
                (scaler.scale(loss) if scaler is not None else loss).backward()
                noise.record_micro_batch(8)
            noise.finish_step()
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        estimate = noise.estimate()
        return estimate.gradient_sq_norm, estimate.trace_covariance

    reference = run(None)
    scaled = run(torch.amp.GradScaler("cpu", init_scale=2.0**12))
    assert scaled == pytest.approx(reference, rel=1e-6)


def test_non_finite_steps_are_skipped() -> None:
    model = _regression_model()
    noise = GradientNoiseScale(model, max_overhead=None)
    generator = torch.Generator().manual_seed(3)
    for step in range(6):
        model.zero_grad(set_to_none=True)
        for _ in range(2):
            x, y = _regression_batch(8, generator)
            (0.5 * (model(x).squeeze(1) - y) ** 2).mean().div(2).backward()
            if step == 2:
                model.weight.grad[0, 0] = math.inf  # type: ignore[index]
            noise.record_micro_batch(8)
        noise.finish_step()
    assert noise.skipped_steps == 1
    assert noise.steps == 5
    assert [p.step for p in noise.history] == [1, 2, 4, 5, 6]
    assert math.isfinite(noise.estimate().noise_scale)


def test_batchnorm_warning_and_single_micro_batch() -> None:
    model = _tiny_bn_model()
    noise = GradientNoiseScale(model, max_overhead=None)
    images = torch.randn(4, 5)
    with pytest.warns(NoiseScaleWarning, match="BatchNorm"):
        for _ in range(2):
            model(images).sum().backward()
            noise.record_micro_batch(4)
        noise.finish_step()
    assert any("BatchNorm" in line for line in noise.warnings)

    plain = _regression_model()
    quiet = GradientNoiseScale(plain, max_overhead=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            plain(torch.randn(4, DIM)).sum().backward()
            quiet.record_micro_batch(4)
        quiet.finish_step()
    with pytest.warns(NoiseScaleWarning, match="at least two micro-batches"):
        plain(torch.randn(4, DIM)).sum().backward()
        quiet.record_micro_batch(4)
        quiet.finish_step()
    assert quiet.steps == 1  # the single-micro-batch step did not enter the estimate


def test_state_dict_round_trip_continues_the_estimate() -> None:
    def step(noise: GradientNoiseScale, model: nn.Module, generator: torch.Generator) -> None:
        model.zero_grad(set_to_none=True)
        for _ in range(2):
            x, y = _regression_batch(8, generator)
            (0.5 * (model(x).squeeze(1) - y) ** 2).mean().div(2).backward()
            noise.record_micro_batch(8)
        noise.finish_step()

    model = _regression_model()
    whole, generator = (
        GradientNoiseScale(model, max_overhead=None),
        torch.Generator().manual_seed(4),
    )
    for _ in range(10):
        step(whole, model, generator)
    first, generator = (
        GradientNoiseScale(model, max_overhead=None),
        torch.Generator().manual_seed(4),
    )
    for _ in range(5):
        step(first, model, generator)
    resumed = GradientNoiseScale(model, max_overhead=None)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for _ in range(5):
        step(resumed, model, generator)
    assert resumed.estimate() == whole.estimate()


def test_pure_helpers() -> None:
    assert unbiased_moments(3.0, 1.5, small_batch=4, big_batch=16) == (1.0, 8.0)
    with pytest.raises(BadInputError, match="big_batch"):
        unbiased_moments(1.0, 1.0, small_batch=8, big_batch=8)
    ratio, (low, high) = ratio_interval([1.0] * 20, [10.0] * 20, ema_decay=0.9, block_steps=5)
    assert (
        ratio == pytest.approx(10.0) and low == pytest.approx(10.0) and high == pytest.approx(10.0)
    )
    # A signal that cannot be told from zero has no upper bound.
    _, (_, high) = ratio_interval([1.0, -1.0, 0.5, -0.4], [5.0] * 4, ema_decay=0.9, block_steps=1)
    assert math.isinf(high)
    points = [NoiseScalePoint(t, 64.0, 1.0, 64.0) for t in range(1, 11)]
    assert critical_batch_over_run(points, batch=16) == pytest.approx(64.0)


def test_measure_noise_scale_on_an_example() -> None:
    task = load_task(example="spiral")
    before = torch.get_rng_state()
    result = measure_noise_scale(task, batch=32, steps=25, lr=0.5, micro_batches=4, seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    assert result.steps == 25 and result.micro_batch == 8 and len(result.train_losses) == 25
    assert len(result.history) + result.skipped_steps == 25
    assert result.noise_scale > 0 and result.critical_batch > 0
    json.dumps(result.to_dict())  # JSON-safe apart from inf, which the CLI writes as "inf"
    again = measure_noise_scale(task, batch=32, steps=25, lr=0.5, micro_batches=4, seed=0)
    assert again.history == result.history  # reproducible
    with pytest.raises(BadInputError, match="micro_batches"):
        measure_noise_scale(task, batch=32, steps=5, lr=0.5, micro_batches=1)
    with pytest.raises(BadInputError, match="batch: 30 is not a multiple"):
        measure_noise_scale(task, batch=30, steps=5, lr=0.5, micro_batches=4)
    with pytest.raises(BadInputError, match="lr"):
        measure_noise_scale(task, batch=32, steps=5, lr=-1.0)


# ------------------------------------------------------------------------------------- DDP

DDP_STEPS = 12
RANK_BATCH = 8


def _ddp_data(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    return [
        (
            torch.randn(2 * RANK_BATCH, 3, generator=generator),
            torch.randn(2 * RANK_BATCH, 1, generator=generator),
        )
        for _ in range(steps)
    ]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        data = _ddp_data(DDP_STEPS)
        shard = slice(rank * RANK_BATCH, (rank + 1) * RANK_BATCH)
        results = {}
        # 1. A DDP model: the estimator's communication hook sees the rank's gradient.
        model = DistributedDataParallel(_mlp())
        noise = GradientNoiseScale(model, max_overhead=None)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in data:
            optimizer.zero_grad(set_to_none=True)
            F.mse_loss(model(x[shard]), y[shard]).backward()
            noise.finish_step(batch_size=RANK_BATCH)
            optimizer.step()
        results["hook"] = noise.history
        results["params"] = [p.detach().clone() for p in model.parameters()]
        # 2. A plain model whose loop averages gradients through the estimator.
        plain = _mlp()
        manual = GradientNoiseScale(plain, distributed=True)
        optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
        for x, y in data:
            optimizer.zero_grad(set_to_none=True)
            F.mse_loss(plain(x[shard]), y[shard]).backward()
            manual.all_reduce_gradients()
            manual.finish_step(batch_size=RANK_BATCH)
            optimizer.step()
        results["manual"] = manual.history
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # both ranks done before either tears gloo down (else it may abort)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_ranks_equal_single_process(tmp_path: Path) -> None:
    mp.spawn(
        _ddp_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["hook"] == ranks[1]["hook"]  # identical on every rank
    assert ranks[0]["manual"] == ranks[1]["manual"]

    # The same data in one process: each rank's half is one micro-batch.
    model = _mlp()
    noise = GradientNoiseScale(model, max_overhead=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in _ddp_data(DDP_STEPS):
        optimizer.zero_grad(set_to_none=True)
        for rank in range(2):
            shard = slice(rank * RANK_BATCH, (rank + 1) * RANK_BATCH)
            (F.mse_loss(model(x[shard]), y[shard]) / 2).backward()
            noise.record_micro_batch(RANK_BATCH)
        noise.finish_step()
        optimizer.step()
    single = noise.history
    for mode in ("hook", "manual"):
        distributed = ranks[0][mode]
        assert len(distributed) == len(single) == DDP_STEPS
        for a, b in zip(distributed, single, strict=True):
            assert a.step == b.step
            assert a.gradient_sq_norm == pytest.approx(b.gradient_sq_norm, rel=1e-4)
            assert a.trace_covariance == pytest.approx(b.trace_covariance, rel=1e-4)
            assert a.noise_scale == pytest.approx(b.noise_scale, rel=1e-4)
    for a, b in zip(ranks[0]["params"], model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


# ------------------------------------------------------------------------------ CLI, plots


def test_noise_command_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from batchpilot.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "noise", "--example", "spiral", "--batch", "32", "--steps", "30", "--lr", "0.5",
                "--max-batch", "64", "--device", "cpu", "--format", "json", "--out", str(tmp_path),
            ]
        )  # fmt: skip
    assert exit_info.value.code == 0
    data = json.loads(capsys.readouterr().out)
    for key in (
        "noise_scale",
        "noise_scale_interval",
        "history",
        "efficiency",
        "recommended_batch",
    ):
        assert key in data
    assert data["lr_source"] == "given"
    assert len(data["history"]) + data["skipped_steps"] == 30
    batches = [row["batch"] for row in data["efficiency"]]
    assert data["recommended_batch"] in batches and max(batches) <= 64
    base = next(row for row in data["efficiency"] if row["batch"] == 32)
    assert base["efficiency"] == pytest.approx(1.0)
    recommended = data["recommended"]
    assert (
        recommended["micro_batch"] * recommended["accumulation_steps"] == data["recommended_batch"]
    )
    assert Path(data["plot"]).is_file()


def test_noise_command_says_what_it_runs_without_an_lr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No --lr: one range test of the size the options give, named in the output; the lr falls
    back to the task's reference when the test finds no descent; --no-throughput times nothing."""
    from batchpilot.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "noise", "--example", "xor4", "--batch", "8", "--steps", "10",
                "--lr-steps", "20", "--lr-repeats", "1", "--no-throughput",
                "--device", "cpu", "--format", "json",
            ]
        )  # fmt: skip
    assert exit_info.value.code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["lr_source"] in ("range test", "reference lr")
    assert data["range_test"]["steps"] == 20 and data["range_test"]["repeats"] == 1
    assert (data["micro_batches"], data["micro_batch"]) == (4, 2)
    assert data["phases"] == [
        "lr range test: 1 × 20 steps at batch 8 (no lr given)",
        f"noise scale: 10 steps at batch 8 = 4 × 2, lr {data['lr']:.3g}",
    ]
    assert data["throughput"] == [] and data["throughput_source"] is None
    assert data["efficiency"] == [] and data["recommended_batch"] is None


def test_noise_command_given_an_lr_runs_no_range_test_and_bounds_the_ladder(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from batchpilot.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "noise", "--example", "xor4", "--batch", "8", "--steps", "10", "--lr", "5",
                "--micro-batch", "4", "--max-batch", "16", "--device", "cpu",
            ]
        )  # fmt: skip
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "ran: lr range test" not in out
    assert "ran: noise scale: 10 steps at batch 8 = 2 × 4, lr 5" in out
    assert "ran: throughput for the goodput table: micro-batches 1, 2, …, 16" in out


def test_goodput_micro_batches_stay_around_the_batch() -> None:
    from batchpilot.measure import goodput_micro_batches

    assert goodput_micro_batches(32, 10_000) == [2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert goodput_micro_batches(48, 100) == [4, 8, 16, 32, 48, 64]


def test_noise_command_rejects_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    from batchpilot.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            ["noise", "--example", "spiral", "--batch", "30", "--accumulation", "4", "--lr", "0.1"]
        )
    assert exit_info.value.code == 2
    assert "--batch: 30 is not a multiple" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["noise", "--example", "spiral", "--batch", "32", "--accumulation", "1"])
    assert exit_info.value.code == 2  # refused before the range test runs
    assert "--accumulation: expected at least 2" in capsys.readouterr().err
    # the old name still works, with a note
    with pytest.raises(SystemExit) as exit_info:
        main(["noise", "--example", "spiral", "--batch", "32", "--micro-batches", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "note: --micro-batches is now --accumulation" in err
    assert "--accumulation: expected at least 2" in err


def test_plot_noise_history_draws_the_estimate() -> None:
    from batchpilot.plots.noise import plot_noise_history

    result = measure_noise_scale(load_task(example="xor4"), batch=16, steps=20, lr=2.0)
    ax = plot_noise_history(result)
    assert ax.get_xlabel() == "optimizer step"
    assert len(ax.lines) >= 1


class _FakeClock:
    """``time.perf_counter`` for the estimator: the test advances it for the training work, and
    the estimator's tensor work (``_record``, ``_finish``) advances it by ``cost`` per call."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _costly(monkeypatch: pytest.MonkeyPatch, clock: _FakeClock, cost: float) -> None:
    monkeypatch.setattr("batchpilot.measure._noise.time.perf_counter", clock)
    for name in ("_record", "_finish"):
        original = getattr(GradientNoiseScale, name)

        def timed(self: GradientNoiseScale, *args: Any, _original: Any = original) -> None:
            clock.now += cost
            _original(self, *args)

        monkeypatch.setattr(GradientNoiseScale, name, timed)


def _observed_regression(noise: GradientNoiseScale, steps: int, clock: _FakeClock | None) -> None:
    model_params = noise._params
    generator = torch.Generator().manual_seed(2)
    for _ in range(steps):
        for param in model_params:
            param.grad = None
        for _ in range(2):
            x, y = _regression_batch(16, generator)
            loss = 0.5 * ((x @ model_params[0].view(-1) - y) ** 2).mean() / 2
            loss.backward()
            if clock is not None:
                clock.now += 0.5  # the forward and backward of a micro-batch
            noise.record_micro_batch(16)
        noise.finish_step()


def test_max_overhead_keeps_the_estimators_share_of_time_within_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = _FakeClock()
    _costly(monkeypatch, clock, cost=0.02)
    noise = GradientNoiseScale(_regression_model(), max_overhead=0.05)
    _observed_regression(noise, 400, clock)
    # An observed step costs the estimator 3 × 0.02 against 1.0 of training (~6%), so the 5%
    # budget lets it observe most steps but not all of them.
    assert noise._own_seconds / clock.now == pytest.approx(0.05, abs=0.002)
    assert 0.7 * 400 < noise.steps < 0.9 * 400
    assert noise.steps + noise.unobserved_steps == 400
    assert noise.estimate().unobserved_steps == noise.unobserved_steps
    # An expensive estimator (0.9 a step, about the step itself) is held to the budget too: it
    # observes f of the steps with 0.9 f / (1 + 0.9 f) = 5%, f ≈ 5.8% (23 of 400).
    clock = _FakeClock()
    _costly(monkeypatch, clock, cost=0.3)
    costly = GradientNoiseScale(_regression_model(), max_overhead=0.05)
    _observed_regression(costly, 400, clock)
    assert costly._own_seconds / clock.now == pytest.approx(0.05, abs=0.005)
    assert 18 < costly.steps < 30
    # Points stand for the steps since the one before: a constant noise scale stays constant.
    points = costly.history
    assert critical_batch_over_run(
        [NoiseScalePoint(p.step, 64.0, 1.0, 64.0) for p in points], batch=16
    ) == pytest.approx(64.0)
    # The estimate is still the closed-form truth, from the steps it observed.
    assert costly.estimate().noise_scale == pytest.approx(TRUE_TRACE / TRUE_GRADIENT_SQ, rel=0.5)


def test_every_observes_a_fixed_subset_of_steps() -> None:
    noise = GradientNoiseScale(_regression_model(), every=3, max_overhead=None)
    _observed_regression(noise, 10, None)
    assert [p.step for p in noise.history] == [1, 4, 7, 10]
    assert noise.unobserved_steps == 6
    with pytest.raises(BadInputError, match=r"max_overhead: expected .* got 0"):
        GradientNoiseScale(_regression_model(), max_overhead=0)
    with pytest.raises(BadInputError, match="every"):
        GradientNoiseScale(_regression_model(), every=0)


def test_critical_batch_over_run_weights_points_by_their_span() -> None:
    # Two points: noise scale 16 standing for 1 step, 48 standing for 3 steps (observed at 1, 4).
    points = [NoiseScalePoint(1, 16.0, 1.0, 16.0), NoiseScalePoint(4, 48.0, 1.0, 48.0)]
    # Efficiency at batch 16: 1/2 and 1/4; S/S_min = 4 / (0.5 + 0.75); B_crit = 16 (S/S_min − 1).
    assert critical_batch_over_run(points, batch=16) == pytest.approx(16 * (4 / 1.25 - 1))
    # Finite population: the batch's noise is B_noise (N − B)/(B (N − 1)); N = 31, B = 16 → 1/32.
    flat = [NoiseScalePoint(t, 20.0, 1.0, 20.0) for t in range(1, 6)]
    assert critical_batch_over_run(flat, batch=16, dataset_size=31) == pytest.approx(20.0)
    factor = 15 / (16 * 30)
    expected = (4 / (1 / (1 + 16 * factor) + 3 / (1 + 48 * factor)) - 1) / factor
    assert critical_batch_over_run(points, batch=16, dataset_size=31) == pytest.approx(expected)
    # At the whole dataset there is no noise to weigh by: the span-weighted mean.
    assert critical_batch_over_run(points, batch=31, dataset_size=31) == pytest.approx(40.0)
