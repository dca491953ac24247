from __future__ import annotations

import copy
import random

import numpy as np
import torch
from torch import nn

from batchpilot.state import capture_rng, preserved, preserved_rng


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2)
    )


def _state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], object]:
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    tensors.update(
        {f"{k}.grad": p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    )
    return tensors, copy.deepcopy(optimizer.state_dict())


def test_preserved_restores_model_optimizer_bn_and_rng_bitwise() -> None:
    model = _bn_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # give the optimizer real state and the model gradients before the probe
    model(torch.randn(16, 4)).sum().backward()
    optimizer.step()
    model.eval()
    before, opt_before = _state(model, optimizer)
    rng_before = (torch.rand(1), np.random.rand(), random.random())
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    with preserved(model, optimizer):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = 10.0
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(16, 4)).pow(2).mean().backward()
            optimizer.step()
        np.random.rand(), random.random()
    after, opt_after = _state(model, optimizer)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert not model.training and not model[1].training
    assert opt_after["param_groups"][0]["lr"] == 1e-3
    for idx, state in opt_before["state"].items():  # type: ignore[index]
        for name, value in state.items():
            assert torch.equal(value, opt_after["state"][idx][name]), name  # type: ignore[index]
    # the RNG continues exactly where it would have without the probe
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    expected = (torch.rand(1), np.random.rand(), random.random())
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    with preserved(model, optimizer):
        torch.rand(100)
    assert (torch.rand(1), np.random.rand(), random.random()) == expected
    del rng_before


def test_preserved_restores_empty_optimizer_state_and_missing_grads() -> None:
    model = _bn_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with preserved(model, optimizer):
        model(torch.randn(8, 4)).sum().backward()
        optimizer.step()
    assert all(p.grad is None for p in model.parameters())
    assert len(optimizer.state) == 0


def test_preserved_restores_even_when_the_body_raises() -> None:
    model = nn.Linear(2, 2)
    weight = model.weight.clone()
    state = capture_rng()
    try:
        with preserved(model):
            model.weight.data.zero_()
            torch.rand(5)
            raise RuntimeError("probe failed")
    except RuntimeError:
        pass
    assert torch.equal(model.weight, weight)
    assert torch.equal(torch.get_rng_state(), state.torch_cpu)


def test_preserved_rng_alone() -> None:
    torch.manual_seed(7)
    with preserved_rng():
        torch.rand(10)
    torch.manual_seed(7)
    expected = torch.rand(1)
    torch.manual_seed(7)
    with preserved_rng():
        torch.rand(3)
    assert torch.equal(torch.rand(1), expected)


class _Counting(nn.Module):
    """A layer that counts its forward passes in a non-persistent buffer (left out of state_dict)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.register_buffer("calls", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(x)


def test_preserved_restores_non_persistent_buffers() -> None:
    model = _Counting()
    assert "calls" not in model.state_dict()
    with preserved(model):
        model(torch.randn(3, 4))
        model(torch.randn(3, 4))
        assert model.calls.item() == 2
    assert model.calls.item() == 0


def test_memory_probe_of_a_user_model_leaves_non_persistent_buffers() -> None:
    from torch.utils.data import TensorDataset

    from batchpilot.measure import measure_step_memory
    from batchpilot.task import Task

    x = torch.randn(32, 4)
    task = Task(
        model=_Counting,
        train_data=TensorDataset(x, (x.sum(dim=1) > 0).long()),
        loss=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
    )
    model = _Counting()
    model.calls.fill_(7)
    measure_step_memory(task, 8, model=model, mode="tracked")
    assert model.calls.item() == 7
