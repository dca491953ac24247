"""Task.from_dataloader: the loader's dataset and collate function; streams taken into memory."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from batchpilot import Task
from batchpilot.errors import BadInputError
from batchpilot.task import DEFAULT_MAX_SAMPLES, IterableDatasetWarning


def _loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])


def _sgd(params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr)


def _as_dict(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"x": torch.stack([s[0] for s in samples]), "y": torch.stack([s[1] for s in samples])}


class Stream(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """``n`` samples whose x is their index; draws from the global RNG as it goes."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(self.n):
            noise = torch.rand(1)  # a stream that shuffles or augments with the global RNG
            yield torch.full((3,), float(i)), noise


def test_a_map_style_loader_gives_its_dataset_collate_function_and_batch() -> None:
    data = TensorDataset(torch.randn(40, 3), torch.randn(40, 1))
    loader = DataLoader(data, batch_size=8, shuffle=True, collate_fn=_as_dict)
    task = Task.from_dataloader(lambda: torch.nn.Linear(3, 1), loader, _loss, _sgd, loader)
    assert task.train_data is data and task.val_data is data
    assert task.collate_fn is _as_dict
    assert task.reference_batch == 8 and task.train_size == 40
    batch = next(iter(task.loader(5, shuffle=False)))
    assert torch.equal(batch["x"], data.tensors[0][:5])
    model = task.make_model()
    expected = torch.nn.functional.mse_loss(model(data.tensors[0][:5]), data.tensors[1][:5])
    assert task.compute_loss(model, batch).item() == pytest.approx(expected.item())


def test_default_collation_and_task_fields_pass_through() -> None:
    data = TensorDataset(torch.randn(20, 3), torch.randn(20, 1))
    task = Task.from_dataloader(
        lambda: torch.nn.Linear(3, 1),
        DataLoader(data, batch_size=4),
        lambda model, batch: torch.nn.functional.mse_loss(model(batch[0]), batch[1]),
        _sgd,
        reference_batch=10,
        reduction="sum",
        name="mine",
    )
    assert task.collate_fn is None  # batchpilot's loaders collate by default
    assert (task.reference_batch, task.reduction, task.name) == (10, "sum", "mine")
    assert task.val_data is None


def test_an_iterable_dataset_is_taken_into_memory_up_to_max_samples_with_a_warning() -> None:
    torch.manual_seed(3)
    rng_before = torch.get_rng_state()
    loader = DataLoader(Stream(50), batch_size=4, collate_fn=_as_dict)
    with pytest.warns(IterableDatasetWarning) as caught:
        task = Task.from_dataloader(
            lambda: torch.nn.Linear(3, 1), loader, _loss, _sgd, max_samples=30
        )
    assert str(caught[0].message) == (
        "loader: the iterable dataset was taken into memory: 30 samples "
        "(max_samples=30; the rest is unused)"
    )
    assert task.train_size == 30
    assert [float(task.train_data[i][0][0]) for i in (0, 17, 29)] == [0.0, 17.0, 29.0]
    assert torch.equal(torch.get_rng_state(), rng_before)  # the stream's draws are undone
    batch = next(iter(task.loader(6, shuffle=False)))
    assert batch["x"][:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_a_short_stream_is_taken_whole_and_says_so() -> None:
    with pytest.warns(IterableDatasetWarning, match=r"12 samples \(the whole stream\)"):
        task = Task.from_dataloader(
            lambda: torch.nn.Linear(3, 1),
            DataLoader(Stream(100), collate_fn=_as_dict),
            _loss,
            _sgd,
            val_loader=DataLoader(Stream(12), collate_fn=_as_dict),
        )
    assert task.train_size == 100 == min(100, DEFAULT_MAX_SAMPLES)
    assert task.val_size == 12


def test_a_plain_task_still_refuses_a_stream_and_points_to_from_dataloader() -> None:
    with pytest.raises(BadInputError, match=r"Task\.from_dataloader"):
        Task(model=lambda: torch.nn.Linear(3, 1), train_data=Stream(5), loss=_loss, optimizer=_sgd)


@pytest.mark.parametrize(
    ("loader", "max_samples", "message"),
    [
        ([1, 2, 3], 10, "loader: expected a torch DataLoader, got list"),
        (DataLoader(Stream(3)), 0, "max_samples: expected a positive integer, got 0"),
        (DataLoader(Stream(0)), 5, "loader: the iterable dataset yielded no samples"),
        (
            DataLoader(Stream(3), batch_size=None),
            5,
            "loader: batch_size=None, so its dataset yields whole batches; batchpilot sizes the "
            "batches itself and needs a dataset of single samples",
        ),
    ],
)
def test_bad_loaders_are_named(loader: Any, max_samples: int, message: str) -> None:
    with warnings.catch_warnings(), pytest.raises(BadInputError) as caught:
        warnings.simplefilter("ignore")
        Task.from_dataloader(
            lambda: torch.nn.Linear(3, 1), loader, _loss, _sgd, max_samples=max_samples
        )
    assert str(caught.value) == message
