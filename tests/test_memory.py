from __future__ import annotations

import random
import weakref
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from batchpilot.errors import BadInputError, UserCodeError
from batchpilot.loading import load_task
from batchpilot.measure._memory import (
    MemoryProbe,
    TensorTracker,
    available_memory,
    largest_sample_index,
    measure_step_memory,
    resolve_mode,
)
from batchpilot.oom import is_out_of_memory
from batchpilot.task import Task

D_IN, HIDDEN = 64, 1024
FLOAT = 4


def mlp_task(optimizer: str = "momentum", samples: int = 512) -> Task:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(samples, D_IN, generator=generator),
        torch.randn(samples, 1, generator=generator),
    )

    def make_optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
        if optimizer == "adam":
            return torch.optim.Adam(params, lr=lr)
        return torch.optim.SGD(params, lr=lr, momentum=0.9)

    return Task(
        model=lambda: nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1)),
        train_data=data,
        loss=lambda model, batch: F.mse_loss(model(batch[0]), batch[1]),
        optimizer=make_optimizer,
    )


PARAM_BYTES = (D_IN * HIDDEN + HIDDEN + HIDDEN + 1) * FLOAT


def test_tracked_peak_matches_hand_calculation() -> None:
    batch = 256
    step = measure_step_memory(mlp_task(), batch, mode="tracked")
    # Persistent: parameters, their gradients, the momentum buffers.
    assert step.by_category["parameters"] == PARAM_BYTES
    assert step.by_category["gradients"] == PARAM_BYTES
    assert step.by_category["optimizer_state"] == PARAM_BYTES
    assert step.persistent_bytes == 3 * PARAM_BYTES
    # At the backward peak: the input x and target y, the ReLU output r (saved), its gradient and
    # the gradient of the pre-activation: (d_in + 1 + 3·hidden) floats a sample.
    activations = batch * FLOAT * (D_IN + 1 + 3 * HIDDEN)
    hand = 3 * PARAM_BYTES + activations
    assert abs(step.peak_bytes - hand) / hand < 0.10
    assert step.reserved_bytes == step.peak_bytes  # nothing more is known on a CPU


def test_adam_counts_two_state_tensors_per_parameter() -> None:
    step = measure_step_memory(mlp_task("adam"), 16, mode="tracked")
    # exp_avg and exp_avg_sq, plus one scalar step counter per parameter tensor.
    assert abs(step.by_category["optimizer_state"] - 2 * PARAM_BYTES) <= 4 * FLOAT * 4


def test_per_sample_bytes_match_hand_calculation() -> None:
    with MemoryProbe(mlp_task(), mode="tracked") as probe:
        small, large = probe.measure(128), probe.measure(384)
    per_sample = (large.peak_bytes - small.peak_bytes) / 256
    hand = FLOAT * (D_IN + 1 + 3 * HIDDEN)
    assert abs(per_sample - hand) / hand < 0.10


@pytest.mark.parametrize(("example", "batch"), [("digits", 64), ("spiral", 100), ("xor4", 16)])
def test_fake_estimate_matches_tracked_measurement(example: str, batch: int) -> None:
    task = load_task(example=example)
    tracked = measure_step_memory(task, batch, mode="tracked")
    fake = measure_step_memory(task, batch, mode="fake")
    assert abs(fake.peak_bytes - tracked.peak_bytes) / tracked.peak_bytes < 0.10
    assert fake.persistent_bytes == tracked.persistent_bytes


def test_fake_mode_plans_a_batch_this_machine_could_not_hold() -> None:
    # 2**20 digits images: ~40 GiB of activations, measured in well under a second of real memory.
    step = measure_step_memory(load_task(example="digits"), 2**20, mode="fake")
    assert step.peak_bytes > 30 * 2**30


def test_tensor_tracker_counts_views_once_and_frees_on_release() -> None:
    with TensorTracker(torch.device("cpu")) as tracker:
        a = torch.zeros(1000)  # 4000 bytes
        view = a[:10]
        b = a + 1  # 4000 more
        del b
        c = torch.zeros(250)  # 1000: reuses the room b left
    assert tracker.start_bytes == 0
    assert tracker.peak_bytes == 8000
    assert view.numel() == 10 and c.numel() == 250


def test_tensor_tracker_agrees_with_pytorch_memtracker() -> None:
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    task = load_task(example="digits")
    model = task.make_model("cpu")
    optimizer = task.make_optimizer(model.parameters(), 0.1)
    batch = next(iter(task.loader(64)))

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)
        task.compute_loss(model, batch).backward()
        optimizer.step()

    step()  # gradients and momentum exist from here on
    tracker = mem_tracker.MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    theirs = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]
    with TensorTracker(torch.device("cpu"), model, optimizer) as ours:
        step()
    # Theirs also counts the batch, created before it was entered: allow its bytes.
    assert abs(ours.peak_bytes - theirs) <= 64 * (8 * 8 * 4 + 8)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, ...]:
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    opt = {
        k: {n: t.clone() for n, t in s.items()} for k, s in optimizer.state_dict()["state"].items()
    }
    return tensors, grads, opt, optimizer.state_dict()["param_groups"]


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    tensors_a, grads_a, opt_a, groups_a = a
    tensors_b, grads_b, opt_b, groups_b = b
    return (
        all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)
        and all(
            (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
            for x, y in zip(grads_a, grads_b, strict=True)
        )
        and all(torch.equal(opt_a[k][n], opt_b[k][n]) for k in opt_a for n in opt_a[k])
        and opt_a.keys() == opt_b.keys()
        and groups_a == groups_b
    )


def test_probing_the_users_model_leaves_it_bitwise_unchanged() -> None:
    task = load_task(example="digits")
    torch.manual_seed(3)
    model = task.make_model("cpu")
    optimizer = task.make_optimizer(model.parameters(), 0.05)
    # Some training first: BatchNorm statistics, gradients and momentum all non-trivial.
    for batch in list(task.loader(32))[:3]:
        optimizer.zero_grad()
        task.compute_loss(model, batch).backward()
        optimizer.step()
    model.eval()
    before = _state(model, optimizer)
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    with MemoryProbe(task, model=model, optimizer=optimizer) as probe:
        probe.measure(64)
        probe.measure(200)
    assert _same(before, _state(model, optimizer))
    assert not model.training  # the train/eval flags are restored too
    assert torch.equal(rng[0], torch.get_rng_state())
    assert rng[1] == random.getstate()
    assert np.array_equal(rng[2], np.random.get_state()[1])


def test_probing_a_model_without_optimizer_state_leaves_none_behind() -> None:
    task = load_task(example="spiral")
    model = task.make_model("cpu")
    optimizer = torch.optim.Adam(model.parameters())
    measure_step_memory(task, 32, model=model, optimizer=optimizer)
    assert optimizer.state_dict()["state"] == {}
    assert all(p.grad is None for p in model.parameters())


class _Fails(nn.Module):
    """A linear model that runs out of memory above ``limit`` samples, or raises ``error``."""

    def __init__(self, limit: int = 10**9, error: Exception | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.limit = limit
        self.error = error
        self.last: weakref.ref[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.linear(x).repeat(1, 64)
        self.last = weakref.ref(hidden)
        if self.error is not None:
            raise self.error
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return hidden.mean(dim=1, keepdim=True)


def failing_task(model: nn.Module) -> Task:
    data = TensorDataset(torch.randn(256, 4), torch.randn(256, 1))
    return Task(
        model=lambda: model,
        train_data=data,
        loss=lambda m, b: F.mse_loss(m(b[0]), b[1]),
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
    )


def test_out_of_memory_passes_through_and_the_step_is_freed() -> None:
    model = _Fails(limit=8)
    with MemoryProbe(failing_task(model)) as probe:
        assert probe.measure(8).peak_bytes > 0
        with pytest.raises(torch.OutOfMemoryError) as info:
            probe.measure(100)
        assert is_out_of_memory(info.value)
        del info
        probe.release()
        assert model.last is not None and model.last() is None  # the failed step's tensors died
        assert probe.measure(4).peak_bytes > 0  # the probe stays usable


def test_a_model_that_never_fits_says_so() -> None:
    model = _Fails(limit=0)
    with pytest.raises(BadInputError, match="not even a micro-batch of 1 fits on cpu"):
        measure_step_memory(failing_task(model), 4)
    assert model.last is not None and model.last() is None


@pytest.mark.parametrize("mode", ["tracked", "fake"])
def test_an_error_in_the_users_model_is_the_users_error(mode: str) -> None:
    task = failing_task(_Fails(error=ValueError("shapes do not match")))
    with pytest.raises(UserCodeError, match=r"Task\.loss.*ValueError: shapes do not match"):
        measure_step_memory(task, 8, mode=mode)


def test_a_model_fake_tensors_cannot_run_says_so() -> None:
    class ReadsValues(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if float(x.sum()) > 0:  # data-dependent control flow
                return self.linear(x)
            return -self.linear(x)

    task = failing_task(ReadsValues())
    with pytest.raises(BadInputError, match="mode: the model cannot run on fake tensors"):
        measure_step_memory(task, 8, mode="fake")
    assert measure_step_memory(task, 8, mode="tracked").peak_bytes > 0


class Sequences(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self) -> None:
        self.lengths = [5, 17, 40, 9, 33]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones(self.lengths[index], 8), torch.zeros(1)


def pad(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    x = nn.utils.rnn.pad_sequence([s[0] for s in samples], batch_first=True)
    return x, torch.stack([s[1] for s in samples])


def sequence_task() -> Task:
    return Task(
        model=lambda: nn.Linear(8, 1),
        train_data=Sequences(),
        collate_fn=pad,
        loss=lambda m, b: F.mse_loss(m(b[0]).mean(dim=1), b[1]),
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
    )


def test_variable_size_inputs_are_probed_with_the_largest_sample() -> None:
    task = sequence_task()
    assert largest_sample_index(task) == 2
    step = measure_step_memory(task, 4, mode="fake")
    # Four copies of the 40-step sequence: the input alone is 4·40·8 floats.
    assert step.peak_bytes - step.persistent_bytes >= 4 * 40 * 8 * FLOAT


def test_modes_and_default_budget() -> None:
    cpu = torch.device("cpu")
    assert resolve_mode("auto", cpu) == "tracked"
    with pytest.raises(BadInputError, match="mode: 'cuda' needs a CUDA device"):
        resolve_mode("cuda", cpu)
    with pytest.raises(BadInputError, match="mode: unknown mode 'exact'"):
        resolve_mode("exact", cpu)
    free = available_memory(cpu)
    assert free.bytes > 0 and free.source


@pytest.mark.parametrize(
    ("error", "out_of_memory"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"), True),
        (RuntimeError("HIP out of memory. Tried to allocate 2.00 GiB (GPU 0)"), True),
        (RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)"), True),
        (RuntimeError("XPU out of memory. Tried to allocate 1.00 GiB"), True),
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"
            ),
            True,
        ),
        (
            RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 8 bytes"),
            True,
        ),
        (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
        (MemoryError(), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x4 and 3x1)"), False),
        (ValueError("out of memory"), False),  # only allocator errors are RuntimeErrors
    ],
)
def test_out_of_memory_is_told_from_other_errors(error: BaseException, out_of_memory: bool) -> None:
    assert is_out_of_memory(error) is out_of_memory
