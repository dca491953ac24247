from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import IterableDataset, TensorDataset

from batchpilot.errors import BadInputError, UserCodeError
from batchpilot.loading import load_task
from batchpilot.summary import summarize_task
from batchpilot.task import Task

GOOD = """
import torch
from torch.utils.data import TensorDataset
from batchpilot import Task

def make():
    data = TensorDataset(torch.randn(20, 3), torch.randn(20, 1))
    return Task(
        model=lambda: torch.nn.Linear(3, 1),
        train_data=data,
        loss=lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]){loss_suffix},
        optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr),
    )

def broken():
    raise RuntimeError("database unreachable")

def not_a_task():
    return 42

NUMBER = 3
"""


def write_task(tmp_path: Path, loss_suffix: str = "") -> Path:
    path = tmp_path / "my_task.py"
    path.write_text(textwrap.dedent(GOOD.replace("{loss_suffix}", loss_suffix)))
    return path


def test_loads_a_file_task(tmp_path: Path) -> None:
    task = load_task(f"{write_task(tmp_path)}:make")
    assert task.train_size == 20
    assert summarize_task(task).parameters == 4


def test_loads_a_module_task_and_examples() -> None:
    assert load_task("batchpilot.examples.spiral:task").name == "spiral"
    assert load_task(example="digits").train_size == 1437


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("nowhere/missing.py:make", BadInputError, "TASK: no such file 'nowhere/missing.py'"),
        ("{path}:absent", BadInputError, "has no attribute 'absent'"),
        ("{path}:broken", UserCodeError, "broken() raised RuntimeError: database unreachable"),
        (
            "{path}:not_a_task",
            BadInputError,
            "not_a_task() returned int, expected a batchpilot.Task",
        ),
        ("{path}:NUMBER", BadInputError, "is a int, expected a function returning a Task"),
        ("{path}", BadInputError, "is not of the form path/to/file.py:factory"),
        (
            "no_such_package.tasks:make",
            BadInputError,
            "TASK: no module named 'no_such_package.tasks'",
        ),
    ],
)
def test_loading_errors_name_what_is_wrong(
    tmp_path: Path, spec: str, error: type[Exception], message: str
) -> None:
    path = write_task(tmp_path)
    with pytest.raises(error) as info:
        load_task(spec.replace("{path}", str(path)))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_example() -> None:
    with pytest.raises(
        BadInputError, match="--example: unknown example 'mnist'; choose one of digits"
    ):
        load_task(example="mnist")


def test_loss_that_is_not_a_scalar(tmp_path: Path) -> None:
    path = tmp_path / "vec.py"
    path.write_text(
        GOOD.replace("{loss_suffix}", "").replace(
            "mse_loss(m(b[0]), b[1])", "mse_loss(m(b[0]), b[1], reduction='none')"
        )
    )
    task = load_task(f"{path}:make")
    with pytest.raises(BadInputError, match=r"expected a scalar tensor, got shape \(2, 1\)"):
        summarize_task(task)


def _linear_task(**overrides: object) -> Task:
    fields: dict[str, object] = {
        "model": lambda: torch.nn.Linear(3, 1),
        "train_data": TensorDataset(torch.randn(8, 3), torch.randn(8, 1)),
        "loss": lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
        "optimizer": lambda p, lr: torch.optim.SGD(p, lr=lr),
    }
    fields.update(overrides)
    return Task(**fields)  # type: ignore[arg-type]


class _Stream(IterableDataset):  # type: ignore[type-arg]
    def __iter__(self):  # type: ignore[no-untyped-def]
        yield torch.zeros(3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train_data": TensorDataset(torch.zeros(0, 3))}, "Task.train_data: the dataset is empty"),
        ({"val_data": TensorDataset(torch.zeros(0, 3))}, "Task.val_data: the dataset is empty"),
        ({"train_data": _Stream()}, "iterable datasets are not supported"),
        ({"train_data": [1, 2, 3]}, None),
        ({"reduction": "max"}, "Task.reduction: expected 'mean' or 'sum', got 'max'"),
        ({"model": "resnet"}, "Task.model: expected a callable, got str"),
        ({"reference_lr": -0.1}, "Task.reference_lr: expected a positive number, got -0.1"),
    ],
)
def test_task_validation(overrides: dict[str, object], message: str | None) -> None:
    if message is None:  # a plain list is a valid map-style dataset
        assert _linear_task(**overrides).train_size == 3
        return
    with pytest.raises(BadInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _linear_task(**overrides)


def test_factory_errors_are_the_users() -> None:
    def explode() -> torch.nn.Module:
        raise ValueError("bad width")

    task = _linear_task(model=explode)
    with pytest.raises(UserCodeError, match=r"Task.model\(\) raised ValueError: bad width"):
        task.make_model()
    task = _linear_task(optimizer=lambda p, lr: "sgd")
    with pytest.raises(
        BadInputError, match=r"expected it to return a torch\.optim\.Optimizer, got str"
    ):
        summarize_task(task)


def test_loss_errors_are_the_users_but_oom_passes_through() -> None:
    def failing(model: torch.nn.Module, batch: object) -> torch.Tensor:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    def oom(model: torch.nn.Module, batch: object) -> torch.Tensor:
        raise RuntimeError(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"
        )

    model = torch.nn.Linear(3, 1)
    with pytest.raises(UserCodeError, match="shapes cannot be multiplied"):
        _linear_task(loss=failing).compute_loss(model, None)
    with pytest.raises(RuntimeError, match="can't allocate memory") as info:
        _linear_task(loss=oom).compute_loss(model, None)
    assert not isinstance(info.value, UserCodeError)
