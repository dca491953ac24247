"""Regression tests for the failure classes of issue 15, found by adversarial use of the CLI.

Each test reproduces one class on a tiny task file written to ``tmp_path``: bad input must give
one line naming the option as the command spells it, exit 2; a failure of the user's code exit 1.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from batchpilot.cli import main

HEADER = """
import torch
from torch import nn
from torch.utils.data import TensorDataset
from batchpilot import Task

def _data(n):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, (x.sum(dim=1) > 0).long())

def _loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])

def _sgd(params, lr):
    return torch.optim.SGD(params, lr=lr)
"""


def write_task(tmp_path: Path, body: str, name: str = "task.py") -> str:
    path = tmp_path / name
    path.write_text(HEADER + textwrap.dedent(body))
    return f"{path}:task"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def one_line_error(code: int, err: str, expected_code: int = 2) -> str:
    lines = err.strip().splitlines()
    assert code == expected_code, err
    assert len(lines) == 1, err
    assert lines[0].startswith("batchpilot: error: "), err
    return lines[0]


# 1. BatchNorm1d after a Linear layer cannot train on one sample.

BATCHNORM = """
def task():
    return Task(
        name="bn",
        model=lambda: nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)),
        train_data=_data(64),
        val_data=_data(16),
        loss=_loss,
        optimizer=_sgd,
        reference_batch=8,
        reference_lr=0.1,
    )
"""


def test_memory_of_a_batchnorm_model_starts_at_two(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    spec = write_task(tmp_path, BATCHNORM)
    code, out, err = run(capsys, "memory", spec, "--device", "cpu", "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    assert data["max_micro_batch"] == 64  # the whole (tiny) training set fits
    assert min(probe["batch"] for probe in data["probes"]) >= 2


def test_batchnorm_model_capped_below_two_is_bad_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    spec = write_task(tmp_path, BATCHNORM)
    code, _, err = run(capsys, "memory", spec, "--device", "cpu", "--max-micro-batch", "1")
    line = one_line_error(code, err)
    assert line.startswith("batchpilot: error: --max-micro-batch: ") and "fewer than 2" in line


def test_search_never_probes_below_min_batch() -> None:
    from batchpilot.measure._memory import StepMemory
    from batchpilot.measure._memory_search import search_max_batch

    seen: list[int] = []

    def fake(b: int) -> StepMemory:
        seen.append(b)
        return StepMemory(b, 1000 + 100 * b, 1000 + 100 * b, 1000, "fake", "cpu")

    # Nothing fits: the search settles at min_batch instead of 1.
    outcome = search_max_batch(fake, limit_bytes=500, cap=100, min_batch=2)
    assert outcome.max_batch == 0
    assert min(seen) == 2


# 2. A sweep in which every trial failed is not a success.

RAISING_LOSS = """
def _bad_loss(model, batch):
    if batch[0].shape[0] > 2:  # a first look at two samples passes; training does not
        raise RuntimeError("the loss is broken")
    return _loss(model, batch)

def task():
    return Task(
        name="broken",
        model=lambda: nn.Linear(4, 2),
        train_data=_data(32),
        val_data=_data(8),
        loss=_bad_loss,
        optimizer=_sgd,
        reference_batch=8,
        reference_lr=0.1,
    )
"""


def test_sweep_with_every_trial_failed_exits_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    spec = write_task(tmp_path, RAISING_LOSS)
    store = tmp_path / "s.sqlite"
    code, _, err = run(
        capsys,
        *("sweep", spec, "--strategy", "grid", "--batches", "4,8", "--budget-epochs", "1"),
        *("--store", str(store), "--device", "cpu"),
    )
    last = err.strip().splitlines()[-1]
    assert code == 1, err
    assert last.startswith("batchpilot: error: every trial of the sweep failed (2)")
    assert "the loss is broken" in last


def test_sweep_on_a_missing_device_is_refused_before_any_trial(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    store = tmp_path / "s.sqlite"
    code, _, err = run(
        capsys,
        "sweep",
        "--example",
        "xor4",
        "--start",
        "4",
        "--store",
        str(store),
        "--device",
        "cuda",
    )
    line = one_line_error(code, err)
    assert "--device: 'cuda'" in line
    assert not store.exists()  # refused before the store, or any trial


def test_sweep_device_is_part_of_its_identity() -> None:
    from batchpilot.sweep import Budget, Grid, run_sweep

    result = run_sweep(
        "tests/sweep_task.py:task",
        budget=Budget(epochs=1, evals=2),
        strategy=Grid((64,)),
        device="auto",
    )
    assert result.config["device"] == str(__import__("batchpilot").devices.resolve_device())


# 4. Allocation failures of the CPU's libraries are out-of-memory, not the user's bug.


@pytest.mark.parametrize(
    "message",
    [
        "could not create a primitive",
        "could not create a primitive descriptor for a convolution forward propagation primitive",
        "std::bad_alloc",
    ],
)
def test_cpu_library_allocation_failures_are_out_of_memory(message: str) -> None:
    from batchpilot.oom import is_out_of_memory

    assert is_out_of_memory(RuntimeError(message))
    assert not is_out_of_memory(ValueError(message))  # only the allocators' RuntimeErrors


def test_a_onednn_failure_mid_search_is_backed_off_from() -> None:
    from batchpilot.measure._memory import StepMemory
    from batchpilot.measure._memory_search import search_max_batch

    def measure(b: int) -> StepMemory:
        if b > 100:  # oneDNN under an address-space limit
            raise RuntimeError("could not create a primitive")
        return StepMemory(b, 1000 + 10 * b, 1000 + 10 * b, 1000, "fake", "cpu")

    outcome = search_max_batch(measure, limit_bytes=1e9, cap=1000)
    assert outcome.max_batch == 100


# 5. Reading commands never write; a database that is not a store is refused.


def _foreign_database(path: Path) -> bytes:
    import sqlite3

    db = sqlite3.connect(path)
    db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    db.execute("INSERT INTO customers (name) VALUES ('ada')")
    db.commit()
    db.close()
    return path.read_bytes()


def test_sweep_show_refuses_a_foreign_database_and_leaves_it_unchanged(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "app.sqlite"
    before = _foreign_database(path)
    code, _, err = run(capsys, "sweep", "show", str(path))
    line = one_line_error(code, err)
    assert "is not a batchpilot trial store" in line and "app.sqlite" in line
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.sqlite"]  # no -wal, no -shm


def test_sweep_run_refuses_a_foreign_database(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "app.sqlite"
    before = _foreign_database(path)
    code, _, err = run(capsys, "sweep", "--example", "xor4", "--start", "4", "--store", str(path))
    assert "is not a batchpilot trial store" in one_line_error(code, err)
    assert path.read_bytes() == before


def test_sweep_show_opens_a_store_read_only(tmp_path: Path) -> None:
    import sqlite3

    from batchpilot.sweep import Budget, Grid, load_sweeps, run_sweep

    path = tmp_path / "s.sqlite"
    run_sweep(
        "tests/sweep_task.py:task",
        budget=Budget(epochs=1, evals=2),
        strategy=Grid((64,)),
        store=path,
        device="cpu",
    )
    path.chmod(0o444)
    try:
        assert [len(r.trials) for r in load_sweeps(path)] == [1]
    finally:
        path.chmod(0o644)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        from batchpilot.sweep.store import TrialStore

        store = TrialStore(path, read_only=True)
        store._db.execute("CREATE TABLE x (a)")


# 6. Names are text, not rich markup.

NAMED = """
def task():
    return Task(
        name={name!r},
        model=lambda: nn.Linear(4, 2),
        train_data=_data(32),
        val_data=_data(8),
        loss=_loss,
        optimizer=_sgd,
        reference_batch=8,
        reference_lr=0.1,
    )
"""


@pytest.mark.parametrize("name", ["bad[/] name", "resnet[cifar10]", "[bold]x"])
def test_check_prints_a_name_with_brackets_as_it_is(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str
) -> None:
    spec = write_task(tmp_path, NAMED.format(name=name))
    code, out, err = run(capsys, "check", spec, "--device", "cpu")
    assert code == 0, err
    assert f"task {name}: OK" in out


def test_sweep_named_with_markup_runs_and_shows(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    spec = write_task(tmp_path, NAMED.format(name="resnet[cifar10]"))
    store = tmp_path / "s.sqlite"
    sweep = ("sweep", spec, "--strategy", "grid", "--batches", "8", "--budget-epochs", "1")
    code, out, err = run(capsys, *sweep, "--store", str(store), "--name", "[/]", "--device", "cpu")
    assert code == 0, err
    assert "sweep [/]: resnet[cifar10]" in out
    code, out, err = run(capsys, "sweep", "show", str(store))
    assert code == 0, err
    assert "sweep [/]: resnet[cifar10]" in out


# 7. A bad --out is refused before anything is measured.


@pytest.mark.parametrize(
    "command",
    [
        ("memory", "--example", "xor4", "--device", "cpu"),
        ("throughput", "--example", "xor4", "--device", "cpu"),
        ("noise", "--example", "xor4", "--steps", "2", "--device", "cpu"),
        ("lr-find", "--example", "xor4", "--device", "cpu"),
        ("sweep", "--example", "xor4", "--start", "4", "--device", "cpu"),
        ("demo", "xor", "--quick"),
    ],
)
def test_out_that_is_a_file_is_refused_first(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: tuple[str, ...],
) -> None:
    import batchpilot.cli.demo
    import batchpilot.cli.sweep
    import batchpilot.loading

    def nothing_runs(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(batchpilot.loading, "load_task", nothing_runs)
    monkeypatch.setattr(batchpilot.cli.sweep, "run_sweep", nothing_runs)
    monkeypatch.setattr(batchpilot.cli.demo, "run_demo", nothing_runs)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("x")
    code, _, err = run(capsys, *command, "--out", "a-file")
    assert one_line_error(code, err) == (
        "batchpilot: error: --out: 'a-file' is a file, expected a folder"
    )
    code, _, err = run(capsys, *command, "--out", "a-file/plots")
    assert one_line_error(code, err) == (
        "batchpilot: error: --out: cannot create folder 'a-file/plots': 'a-file' is a file"
    )


# 8, 9, 11. Bad numbers are refused with the option's own name; 0 is not "the default".


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--epochs", "nan"), "--epochs: expected a positive number, got nan"),
        (("--epochs", "inf"), "--epochs: expected a positive number, got inf"),
        (("--accumulation", "0"), "--accumulation: expected a positive integer, got 0"),
        (("--batch", "0"), "--batch: expected a positive integer, got 0"),
        (("--batch", "-1"), "--batch: expected a positive integer, got -1"),
        (("--lr", "0"), "--lr: expected a positive number, got 0.0"),
        (("--steps", "0"), "--steps: expected a positive integer, got 0"),
        (("--evals", "0"), "--evals: expected a positive integer, got 0"),
        (
            ("--seed", "18446744073709551616"),
            "--seed: expected an integer in [0, 2**63 - 1], got 18446744073709551616",
        ),
        (("--seed", "-1"), "--seed: expected an integer in [0, 2**63 - 1], got -1"),
    ],
)
def test_train_refuses_bad_numbers(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    code, out, err = run(capsys, "train", "--example", "xor4", "--device", "cpu", *args)
    assert one_line_error(code, err) == f"batchpilot: error: {message}"
    assert out == ""


def test_lr_find_refuses_a_range_test_too_long_to_hold(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "lr-find", "--example", "xor4", "--steps", "1000000000000")
    assert one_line_error(code, err) == (
        "batchpilot: error: --steps: expected at most 1000000 optimizer steps, got 1000000000000"
    )


def test_train_steps_match_the_progress_plan(capsys: pytest.CaptureFixture[str]) -> None:
    # 16 samples, batch 3, 1 epoch: ceil(16 / 3) = 6 steps.
    code, out, err = run(
        capsys, "train", "--example", "xor4", "--batch", "3", "--epochs", "1", "--format", "json"
    )
    assert code == 0, err
    assert json.loads(out)["steps"] == 6


# 10. No traceback without --debug, not even torch's fake-tensor log.

SHAPES_BREAK_ABOVE_100 = """
class _Breaks(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        if x.shape[0] > 100:
            x = x[:, :3]
        return self.linear(x)

def task():
    return Task(model=_Breaks, train_data=_data(1000), loss=_loss, optimizer=_sgd)
"""


def test_fake_tensor_failure_is_one_line(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    spec = write_task(tmp_path, SHAPES_BREAK_ABOVE_100)
    with pytest.raises(SystemExit) as info:
        main(["memory", spec, "--device-memory", "64MiB", "--device", "cpu"])
    _, err = capfd.readouterr()
    line = one_line_error(int(info.value.code or 0), err, expected_code=1)
    assert "mat1 and mat2 shapes cannot be multiplied" in line
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--steps", "0"), "--steps: expected a positive integer, got 0"),
        (("--warmup", "-1"), "--warmup: expected a non-negative integer, got -1"),
        (("--world-size", "0"), "--world-size: expected a positive integer, got 0"),
    ],
)
def test_throughput_names_its_own_options(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    code, _, err = run(capsys, "throughput", "--example", "xor4", "--device", "cpu", *args)
    assert one_line_error(code, err) == f"batchpilot: error: {message}"


def test_an_argument_the_command_has_no_option_for_keeps_its_name() -> None:
    import typer

    from batchpilot.cli import _as_option, _options_of, app

    command = typer.main.get_command(app)
    memory = _options_of(command, ["memory", "--example", "xor4"])
    assert memory is not None and "--max-micro-batch" in memory and "--micro-batch" not in memory
    assert "--max-batch" not in memory  # its old, hidden name is never what an error says
    assert _as_option("micro_batch: expected a positive integer, got 0", memory) == (
        "micro_batch: expected a positive integer, got 0"
    )
    assert _as_option("max_micro_batch: expected a positive integer, got 0", memory) == (
        "--max-micro-batch: expected a positive integer, got 0"
    )
    sweep = _options_of(command, ["sweep", "--example", "xor4"])  # the default `sweep run`
    assert sweep is not None and "--max-micro-batch" in sweep


# 12. `sweep` alone says what is missing.


def test_sweep_without_a_task_says_what_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "sweep")
    assert one_line_error(code, err) == (
        "batchpilot: error: TASK: give either a TASK (path/to/file.py:factory) or --example NAME"
    )
    assert out == ""


# 13. Integers above 2**53 stay exact (no float round trip).


def test_scale_keeps_a_batch_above_2_53_exact(capsys: pytest.CaptureFixture[str]) -> None:
    big = 2**53 + 1
    code, out, err = run(
        capsys,
        *("scale", "--ref-batch", "256", "--ref-lr", "0.1", "--batch", str(big)),
        *("--max-micro-batch", "512", "--dataset-size", str(2 * big + 1), "--format", "json"),
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["global_batch"] == big
    assert data["micro_batch"] * data["accumulation_steps"] == big
    assert (data["steps_per_epoch"], data["steps_per_epoch_with_drop_last"]) == (3, 2)


# 14. The interrupt message of a sweep is one line, whatever the terminal's width.


def test_sweep_interrupt_message_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import batchpilot.cli.sweep

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(batchpilot.cli.sweep, "run_sweep", interrupted)
    monkeypatch.setenv("COLUMNS", "40")
    store = tmp_path / "a-long-folder-name-for-the-store" / "sweeps.sqlite"
    store.parent.mkdir()
    code, _, err = run(capsys, "sweep", "--example", "xor4", "--start", "4", "--store", str(store))
    assert code == 130
    lines = err.strip().splitlines()
    assert lines == [
        f"interrupted: the finished trials are in {store}; run the same command with --resume "
        "to continue"
    ]


# 15. A store with the right tables but damaged rows is bad input, one line.


def _stored_sweep(path: Path) -> str:
    from batchpilot.sweep import Budget, Grid, run_sweep

    result = run_sweep(
        "tests/sweep_task.py:task",
        budget=Budget(epochs=1, evals=2),
        strategy=Grid((64,)),
        store=path,
        device="cpu",
    )
    return result.name


@pytest.mark.parametrize(
    ("sql", "what"),
    [
        ("UPDATE trials SET result = '{not json'", "trial 'b64-lr1' of sweep"),
        ("UPDATE trials SET result = '{}'", "trial 'b64-lr1' of sweep"),
        ("UPDATE trials SET result = '[1, 2]'", "trial 'b64-lr1' of sweep"),
        ("UPDATE sweeps SET config = 'nope'", "the settings of sweep"),
        ("UPDATE sweeps SET config = '{}'", "sweep"),
        ("""UPDATE sweeps SET config = json_remove(config, '$.strategy.batches')""", "sweep"),
    ],
)
def test_sweep_show_of_damaged_rows_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, sql: str, what: str
) -> None:
    import sqlite3

    path = tmp_path / "s.sqlite"
    name = _stored_sweep(path)
    db = sqlite3.connect(path)
    db.execute(sql)
    db.commit()
    db.close()
    code, _, err = run(capsys, "sweep", "show", str(path))
    line = one_line_error(code, err)
    assert line.startswith(f"batchpilot: error: store: {str(path)!r} is damaged: {what}")
    assert name in line


# 16. A model with nothing to train is refused by `check` already.

FROZEN = """
def _frozen():
    model = nn.Linear(4, 2)
    for p in model.parameters():
        p.requires_grad_(False)
    return model

def task():
    return Task(model=_frozen, train_data=_data(32), loss=_loss, optimizer=_sgd,
                reference_batch=8, reference_lr=0.1)
"""


@pytest.mark.parametrize(
    "command", [("check",), ("train",), ("memory",), ("lr-find", "--no-plot"), ("noise",)]
)
def test_a_frozen_model_is_bad_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: tuple[str, ...]
) -> None:
    spec = write_task(tmp_path, FROZEN)
    code, out, err = run(capsys, command[0], spec, *command[1:], "--device", "cpu")
    assert one_line_error(code, err) == (
        "batchpilot: error: Task.model(): all 10 parameters are frozen (requires_grad=False): "
        "there is nothing to train"
    )
    assert out == ""


def test_a_loss_without_gradient_is_bad_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    spec = write_task(
        tmp_path,
        """
def _detached(model, batch):
    return _loss(model, batch).detach()

def task():
    return Task(model=lambda: nn.Linear(4, 2), train_data=_data(32), loss=_detached,
                optimizer=_sgd)
""",
    )
    code, _, err = run(capsys, "check", spec, "--device", "cpu")
    assert "Task.loss(model, batch): the loss has no gradient" in one_line_error(code, err)


# 17. A task that exits while it is loaded is a failure of the user's code, never a success.


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ("import sys\ndef task():\n    sys.exit(0)\n", "task.py:task() called sys.exit(0)"),
        ("import sys\nsys.exit(0)\ndef task():\n    pass\n", "task.py called sys.exit(0)"),
    ],
)
def test_a_task_that_calls_sys_exit_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, body: str, where: str
) -> None:
    spec = write_task(tmp_path, body)
    code, _, err = run(capsys, "check", spec)
    line = one_line_error(code, err, expected_code=1)
    assert where in line and line.endswith("instead of returning a Task")


def test_a_size_too_large_for_a_float_is_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "memory", "--example", "xor4", "--device-memory", "1e400GiB")
    assert one_line_error(code, err) == (
        "batchpilot: error: --device-memory: '1e400GiB' is too large to be a size"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--epochs", "1e300"),
            "--epochs: 1e+300 epochs are 4e+300 optimizer steps at global batch 4, more than "
            "the 100,000,000 a run may take",
        ),
        (
            ("--steps", "1000000000000"),
            "--steps: expected at most 100,000,000 optimizer steps, got 1000000000000",
        ),
    ],
)
def test_train_refuses_a_run_that_cannot_finish(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    code, _, err = run(capsys, "train", "--example", "xor4", "--batch", "4", *args)
    assert one_line_error(code, err) == f"batchpilot: error: {message}"


def test_sweep_refuses_zero_workers(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "sweep", "--example", "xor4", "--start", "4", "--workers", "0")
    assert one_line_error(code, err) == (
        "batchpilot: error: --workers: expected a positive integer, got 0"
    )


def test_train_names_batch_when_it_exceeds_the_training_set(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run(capsys, "train", "--example", "xor4", "--batch", "64")
    assert one_line_error(code, err) == (
        "batchpilot: error: --batch: 64 is larger than the training set (16 samples)"
    )


NON_SCALAR_LOSS = """
def task():
    return Task(
        model=lambda: nn.Linear(4, 2),
        train_data=_data(32),
        val_data=_data(8),
        loss=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"),
        optimizer=_sgd,
        reference_batch=8,
        reference_lr=0.1,
    )
"""


@pytest.mark.parametrize("executor", ["inprocess", "pool"])
def test_sweep_of_a_task_that_cannot_train_is_refused_before_any_trial(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, executor: str
) -> None:
    spec = write_task(tmp_path, NON_SCALAR_LOSS)
    store = tmp_path / "s.sqlite"
    code, _, err = run(
        capsys,
        *("sweep", spec, "--strategy", "grid", "--batches", "4,8", "--budget-epochs", "1"),
        *("--store", str(store), "--device", "cpu", "--executor", executor, "--workers", "1"),
    )
    assert "Task.loss(model, batch): expected a scalar tensor" in one_line_error(code, err)
    assert not store.exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_out_that_cannot_be_written_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, "memory", "--example", "xor4", "--out", "/proc/batchpilot-out")
    assert one_line_error(code, err).startswith(
        "batchpilot: error: --out: cannot write to folder '/proc/batchpilot-out': "
    )


def test_user_code_calling_sys_exit_mid_run_is_a_failure(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    spec = write_task(
        tmp_path,
        """
import sys

def _exits(model, batch):
    if batch[0].shape[0] > 2:  # `check` looks at two samples; training exits
        sys.exit(0)
    return _loss(model, batch)

def task():
    return Task(model=lambda: nn.Linear(4, 2), train_data=_data(32), loss=_exits,
                optimizer=_sgd, reference_batch=8, reference_lr=0.1)
""",
    )
    code, _, err = run(capsys, "train", spec, "--device", "cpu")
    assert one_line_error(code, err, expected_code=1) == (
        "batchpilot: error: your code called sys.exit(0) while batchpilot ran it"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("noise", "--example", "xor4", "--steps", "1000000000000"),
            "--steps: expected at most 100,000,000 optimizer steps, got 1000000000000",
        ),
        (
            ("lr-find", "--example", "xor4", "--verify-steps", "1000000000000"),
            "--verify-steps: expected at most 100,000,000 optimizer steps, got 1000000000000",
        ),
        (
            ("lr-find", "--example", "xor4", "--repeats", "1000000000000"),
            "--repeats: 1000000000000 repeats of 100 steps are more than the 100,000,000 "
            "optimizer steps a range test may take",
        ),
        (
            ("throughput", "--example", "xor4", "--warmup", "1000000000000"),
            "--warmup: expected at most 100,000,000 optimizer steps, got 1000000000000",
        ),
        (
            ("sweep", "--example", "xor4", "--start", "4", "--budget-epochs", "1e300"),
            "--budget-epochs: 4e+300 optimizer steps at batch 4, more than the 100,000,000 a "
            "trial may take",
        ),
    ],
)
def test_runs_that_could_never_finish_are_refused(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: tuple[str, ...],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *args, "--device", "cpu")
    assert one_line_error(code, err) == f"batchpilot: error: {message}"
