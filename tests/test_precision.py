"""batchpilot.precision: every measurement and training loop runs in the task's precision."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from batchpilot import Task, find_lr, find_max_batch, measure_noise_scale, measure_throughput
from batchpilot.errors import BadInputError
from batchpilot.report.tune import write_tune_report
from batchpilot.state import capture_rng
from batchpilot.summary import summarize_task
from batchpilot.training._loop import train
from batchpilot.tune import TuneOptions, tune

# (dtype of the first layer's output, autocast on) as the model saw them, in call order
SEEN: list[tuple[torch.dtype, bool]] = []


class Record(torch.nn.Module):
    """Notes the dtype of what reaches it inside forward, and whether autocast is on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        SEEN.append((x.dtype, torch.is_autocast_enabled("cpu")))
        return x


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(8, 32), Record(), torch.nn.Tanh(), torch.nn.Linear(32, 1)
    )


def _task(precision: str = "32", optimizer: Any = None) -> Task:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(640, 8, generator=generator)
    y = x @ torch.randn(8, 1, generator=generator) + 0.3 * torch.randn(640, 1, generator=generator)
    return Task(
        model=_model,
        train_data=TensorDataset(x[:512], y[:512]),
        val_data=TensorDataset(x[512:], y[512:]),
        # the loss in fp32 whatever the model's output, as users write it under autocast
        loss=lambda model, batch: torch.nn.functional.mse_loss(model(batch[0]).float(), batch[1]),
        optimizer=optimizer or (lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9)),
        name="regression",
        reference_batch=32,
        reference_lr=0.01,
        precision=precision,  # type: ignore[arg-type]
    )


@pytest.fixture(autouse=True)
def _clear() -> Iterator[None]:
    SEEN.clear()
    yield
    SEEN.clear()
    assert not torch.is_autocast_enabled("cpu")  # nothing left switched on


def test_a_bad_precision_is_refused_in_one_line() -> None:
    with pytest.raises(
        BadInputError,
        match=r"^Task\.precision: expected one of 32, bf16-mixed, 16-mixed, got 'fp16'$",
    ):
        _task("fp16")
    with pytest.raises(BadInputError, match=r"^precision: expected one of .*, got 'bf16'$"):
        TuneOptions(precision="bf16")
    with pytest.raises(BadInputError, match=r"^precision: expected one of .*, got 32$"):
        _task().with_precision(32)  # type: ignore[arg-type]
    task = _task()
    assert task.with_precision(None) is task and task.with_precision("32") is task
    assert task.with_precision("16-mixed").precision == "16-mixed"


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [("32", torch.float32), ("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)],
)
def test_every_phase_runs_the_model_under_the_tasks_autocast(
    precision: str, dtype: torch.dtype
) -> None:
    task = _task(precision)
    phases = {
        "summary": lambda: summarize_task(task),
        "train and evaluate": lambda: train(task, micro_batch=16, lr=0.01, steps=3),
        "range test": lambda: find_lr(task, micro_batch=16, steps=10, repeats=1),
        "noise scale": lambda: measure_noise_scale(
            task, batch=32, steps=3, lr=0.01, micro_batches=2
        ),
        "throughput": lambda: measure_throughput(task, batches=[4, 8], max_rounds=1),
        "memory": lambda: find_max_batch(task, budget_bytes=2**20, max_batch=64),
    }
    for phase, run in phases.items():
        SEEN.clear()
        result = run()
        assert SEEN, phase
        assert set(SEEN) == {(dtype, precision != "32")}, phase
        if hasattr(result, "precision"):
            assert result.precision == precision, phase


def test_bf16_mixed_halves_the_measured_memory_per_sample_on_a_wide_model() -> None:
    """Activations are saved in bf16: half the bytes per sample, so twice the micro-batch fits in
    the same budget; the fixed part grows a little (the bf16 copies of the weights)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8192, 16, generator=generator)
    data = TensorDataset(x, torch.randint(0, 4, (8192,), generator=generator))

    def wide(precision: str) -> Task:
        return Task(
            model=lambda: torch.nn.Sequential(
                torch.nn.Linear(16, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 4)
            ),
            train_data=data,
            loss=lambda model, batch: torch.nn.functional.cross_entropy(model(batch[0]), batch[1]),
            optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
            precision=precision,  # type: ignore[arg-type]
        )

    fp32 = find_max_batch(wide("32"), budget_bytes=32 * 2**20)
    bf16 = find_max_batch(wide("bf16-mixed"), budget_bytes=32 * 2**20)
    assert (fp32.precision, bf16.precision) == ("32", "bf16-mixed")
    assert bf16.bytes_per_sample < 0.6 * fp32.bytes_per_sample
    assert bf16.max_micro_batch > 1.7 * fp32.max_micro_batch
    assert bf16.fixed_bytes > fp32.fixed_bytes


def test_16_mixed_unscales_before_every_optimizer_step_with_finite_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events: list[str] = []
    unscale = torch.amp.GradScaler.unscale_

    def spy(self: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
        events.append("unscale")
        unscale(self, optimizer)

    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", spy)

    class SGD(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:
            events.append("step")
            return super().step(closure)

    task = _task("16-mixed", optimizer=lambda params, lr: SGD(params, lr=lr, momentum=0.9))
    runs = {
        "train": lambda: train(task, micro_batch=16, lr=0.01, steps=30),
        "range test": lambda: find_lr(task, micro_batch=16, steps=30, repeats=1),
        "noise scale": lambda: measure_noise_scale(
            task, batch=32, steps=60, lr=0.01, micro_batches=4
        ),
    }
    results = {}
    for name, run in runs.items():
        events.clear()
        results[name] = run()
        assert events.count("step") >= 10, name
        # the scaler unscales the gradients before each step it lets through
        assert all(
            before == "unscale" for before, now in itertools.pairwise(events) if now == "step"
        ), name
    trained = results["train"]
    assert not trained.diverged and all(math.isfinite(v) for v in trained.train_losses)
    assert trained.train_losses[-1] < trained.train_losses[0]
    assert trained.final is not None and math.isfinite(trained.final.loss)
    assert all(math.isfinite(v) for v in results["range test"].losses)
    noise = results["noise scale"]
    assert math.isfinite(noise.noise_scale) and noise.noise_scale > 0
    # the loss scale (2**16 at first) is divided out of the norms: the same order as in fp32
    reference = measure_noise_scale(_task(), batch=32, steps=60, lr=0.01, micro_batches=4)
    assert 0.5 < noise.noise_scale / reference.noise_scale < 2.0


def test_the_users_model_optimizer_and_rng_are_left_as_they_were() -> None:
    for precision in ("bf16-mixed", "16-mixed"):
        task = _task(precision)
        torch.manual_seed(1)
        model = _model()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        state = {k: v.clone() for k, v in optimizer.state[next(model.parameters())].items()}
        rng = capture_rng()
        result = find_max_batch(
            task, model=model, optimizer=optimizer, budget_bytes=2**22, max_batch=64
        )
        assert result.max_micro_batch == 64 and result.precision == precision
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        now = [p.grad for p in model.parameters() if p.grad is not None]
        assert all(torch.equal(a, b) for a, b in zip(grads, now, strict=True))
        after = optimizer.state[next(model.parameters())]
        assert all(torch.equal(state[k], after[k]) for k in state)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        again = capture_rng()
        assert torch.equal(rng.torch_cpu, again.torch_cpu) and rng.python == again.python


def test_tune_measures_every_phase_in_the_precision_asked_and_says_so(tmp_path: Path) -> None:
    options = TuneOptions(
        max_batch=64,
        throughput_steps=2,
        lr_steps=20,
        lr_repeats=1,
        noise_steps=20,
        check_seeds=1,
        time_budget_seconds=10,
        precision="bf16-mixed",
    )
    result = tune(_task("32"), options)
    assert set(SEEN) == {(torch.bfloat16, True)}
    data = result.to_dict()
    assert data["precision"] == "bf16-mixed" == data["task"]["precision"]
    assert data["memory"]["precision"] == data["throughput"]["precision"] == "bf16-mixed"
    assert data["lr_find"]["precision"] == "bf16-mixed"
    assert data["noise"]["precision"] == "bf16-mixed"
    page = write_tune_report(result, tmp_path).read_text()
    assert "in bf16-mixed precision (measured so)" in page and "precision bf16-mixed" in page
    assert json.loads((tmp_path / "result.json").read_text())["precision"] == "bf16-mixed"


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from batchpilot.cli import main

    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


@pytest.mark.parametrize("command", ["tune", "memory", "throughput", "lr-find", "noise", "train"])
def test_every_measuring_command_refuses_a_bad_precision_in_one_line(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    code, out, err = _cli(capsys, command, "--example", "xor4", "--precision", "fp16")
    assert code == 2 and not out
    assert err.strip().splitlines() == [
        "batchpilot: error: --precision: expected one of 32, bf16-mixed, 16-mixed, got 'fp16'"
    ]


def test_the_commands_measure_in_the_precision_given(capsys: pytest.CaptureFixture[str]) -> None:
    base = ("--example", "xor4", "--precision", "bf16-mixed", "--format", "json")
    code, out, _ = _cli(capsys, "train", *base, "--batch", "16", "--lr", "10", "--steps", "20")
    assert code == 0 and json.loads(out)["precision"] == "bf16-mixed"
    code, out, _ = _cli(capsys, "memory", *base, "--device-memory", "64MiB")
    assert code == 0 and json.loads(out)["precision"] == "bf16-mixed"


def test_the_tables_say_the_precision_measured_when_it_is_not_fp32(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def tables(*args: str) -> str:
        code, out, _ = _cli(capsys, *args, "--example", "xor4", "--format", "table")
        assert code == 0
        return " ".join(out.split())  # rich wraps titles: compare the words

    memory = ("memory", "--device-memory", "64MiB")
    throughput = ("throughput", "--max-micro-batch", "16", "--steps", "2")
    half = "bf16-mixed (autocast to bfloat16)"
    assert f"memory of a training step (tracked, cpu), measured in {half}" in tables(
        *memory, "--mode", "tracked", "--precision", "bf16-mixed"
    )
    assert "autocast" not in tables(*memory, "--precision", "32")
    scaled = tables(*throughput, "--precision", "16-mixed")
    assert "warm-up), measured in 16-mixed (autocast to float16 + GradScaler)" in scaled
    assert "autocast" not in tables(*throughput)
    tune_args = ("tune", "--time-budget", "8", "--max-micro-batch", "32")
    shown = tables(*tune_args, "--out", str(tmp_path / "half"), "--precision", "bf16-mixed")
    assert f"precision measured {half}" in shown.replace("│", "").replace("  ", " ")
    assert "precision measured" not in tables(*tune_args, "--out", str(tmp_path / "fp32"))
