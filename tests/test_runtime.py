from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch

from batchpilot.errors import BadInputError, UserCodeError
from batchpilot.training._runtime import (
    BASE_LR_KEY,
    BatchRuntime,
    apply_lr,
    group_lrs,
    resplit,
    split_micro_batches,
)
from batchpilot.training._schedules import BatchLimits, BatchSetting, StepDecay, periodic_batch


def make_problem(n: int = 37) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
    return model, torch.randn(n, 5), torch.randn(n, 1)


def full_batch_gradient(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
) -> list[torch.Tensor]:
    model.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]


def backward_fn(model: torch.nn.Module, calls: list[int], fail_above: int | None = None):  # type: ignore[no-untyped-def]
    def run(micro: tuple[torch.Tensor, torch.Tensor], weight: float) -> float:
        calls.append(len(micro[0]))
        if fail_above is not None and len(micro[0]) > fail_above:
            raise RuntimeError(
                "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB"
            )
        loss = torch.nn.functional.mse_loss(model(micro[0]), micro[1])
        (loss * weight).backward()
        return float(loss.detach())

    return run


def test_apply_lr_moves_every_group_together_and_keeps_their_ratio() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}], lr=0.1)
    apply_lr(opt, 0.05, base_lr=0.1)
    assert group_lrs(opt) == pytest.approx([0.05, 0.005])
    apply_lr(opt, 0.4, base_lr=0.1)  # relative to each group's first lr, not compounding
    assert group_lrs(opt) == pytest.approx([0.4, 0.04])
    assert opt.state_dict()["param_groups"][1][BASE_LR_KEY] == 0.01  # saved with the optimizer
    tensor_lr = torch.optim.Adam([a], lr=torch.tensor(0.001))
    apply_lr(tensor_lr, 0.002, base_lr=0.001)
    assert float(tensor_lr.param_groups[0]["lr"]) == pytest.approx(0.002)


def test_split_micro_batches_cuts_nested_batches_together() -> None:
    batch = {"x": torch.arange(10), "pair": (torch.zeros(10, 2), torch.ones(10)), "name": "run"}
    parts = split_micro_batches(batch, 3)
    assert [len(p["x"]) for p in parts] == [4, 3, 3]
    assert torch.cat([p["x"] for p in parts]).tolist() == list(range(10))
    assert all(p["name"] == "run" and p["pair"][0].shape[0] == len(p["x"]) for p in parts)
    assert len(split_micro_batches(torch.zeros(2, 1), 5)) == 2  # never an empty part
    assert type(split_micro_batches(OrderedDict(x=torch.zeros(4)), 2)[0]) is OrderedDict


def test_resplit_raises_accumulation_to_keep_the_global_batch() -> None:
    setting = BatchSetting(512, 0.2, 256, 1, 2, 4.0)
    lowered = resplit(setting, max_micro_batch=100)
    assert (lowered.batch, lowered.lr, lowered.micro_batch, lowered.accumulation_steps) == (
        512,
        0.2,
        64,
        4,
    )


@pytest.mark.parametrize("max_micro", [None, 37, 10, 4, 1])
def test_run_step_gives_the_full_batch_gradient_in_any_number_of_micro_batches(
    max_micro: int | None,
) -> None:
    model, x, y = make_problem()
    expected = full_batch_gradient(model, x, y)
    model.zero_grad()
    runtime = BatchRuntime(
        torch.optim.SGD(model.parameters(), lr=0.1), base_lr=0.1, max_micro_batch=max_micro
    )
    calls: list[int] = []
    report = runtime.run_step((x, y), backward_fn(model, calls))
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    assert sum(calls) == 37 and max(calls) <= (max_micro or 37)
    assert report.samples == report.global_samples == 37 and report.retries == 0


def test_out_of_memory_steps_down_and_retries_with_more_accumulation() -> None:
    model, x, y = make_problem(40)
    expected = full_batch_gradient(model, x, y)
    model.zero_grad()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    runtime = BatchRuntime(optimizer, base_lr=0.1)
    runtime.apply(BatchSetting(40, 0.1, 40, 1, 1, 1.0))
    calls: list[int] = []
    retried: list[bool] = []
    report = runtime.run_step(
        (x, y), backward_fn(model, calls, fail_above=12), on_retry=lambda: retried.append(True)
    )
    # 40 fails, 20 fails, 10 fits: four micro-batches of 10.
    assert calls == [40, 20, 10, 10, 10, 10]
    assert report.retries == 2 and report.accumulation_steps == 4 and len(retried) == 2
    assert runtime.max_micro_batch == 10
    assert runtime.setting is not None
    assert (runtime.setting.batch, runtime.setting.accumulation_steps) == (40, 4)  # batch kept
    assert [(e.failed_micro_batch, e.max_micro_batch) for e in runtime.oom_events] == [
        (40, 20),
        (20, 10),
    ]
    for p, g in zip(model.parameters(), expected, strict=True):  # no partial step leaked in
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    # The next step starts at the lowered limit: no failure.
    optimizer.zero_grad()
    calls.clear()
    runtime.run_step((x, y), backward_fn(model, calls, fail_above=12))
    assert calls == [10, 10, 10, 10]


def test_out_of_memory_at_one_sample_and_other_errors_pass_through() -> None:
    model, x, y = make_problem(4)
    runtime = BatchRuntime(torch.optim.SGD(model.parameters(), lr=0.1), base_lr=0.1)
    with pytest.raises(torch.OutOfMemoryError, match=r"even at micro-batch 1"):
        runtime.run_step((x, y), backward_fn(model, [], fail_above=0))

    def broken(micro: object, weight: float) -> None:
        raise UserCodeError("Task.loss(model, batch) raised KeyError: 'x'")

    with pytest.raises(UserCodeError):
        runtime.run_step((x, y), broken)


def test_apply_follows_a_schedule_and_state_round_trips() -> None:
    model, _, _ = make_problem(64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = periodic_batch(
        base_batch=8,
        base_lr=0.1,
        every_epochs=1,
        limits=BatchLimits(max_micro_batch=16, max_accumulation=2, dataset_size=64),
    )
    runtime = BatchRuntime(optimizer, base_lr=0.1, max_micro_batch=12)
    seen = []
    for epoch in range(4):
        setting = runtime.apply(schedule.at(epoch))
        seen.append(
            (
                setting.batch,
                setting.micro_batch,
                setting.accumulation_steps,
                optimizer.param_groups[0]["lr"],
            )
        )
    # 32 over micro-batches of at most 12: 8 × 4 exactly (not 11 × 3 = 33)
    assert seen == [(8, 8, 1, 0.1), (16, 8, 2, 0.1), (32, 8, 4, 0.1), (32, 8, 4, 0.05)]
    state = json.loads(json.dumps(runtime.state_dict()))
    other = BatchRuntime(torch.optim.SGD(model.parameters(), lr=0.1), base_lr=0.1)
    other.load_state_dict(state)
    assert other.setting == runtime.setting and other.max_micro_batch == 12
    assert other.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_arguments_are_checked() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(BadInputError, match=r"^optimizer: expected a torch.optim.Optimizer"):
        BatchRuntime("sgd", base_lr=0.1)  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match=r"^backoff: expected a number in \(0, 1\), got 1.5"):
        BatchRuntime(opt, base_lr=0.1, backoff=1.5)
    with pytest.raises(BadInputError, match=r"^lr: expected a number ≥ 0, got -1"):
        apply_lr(opt, -1, base_lr=0.1)
    with pytest.raises(BadInputError, match=r"^setting: expected a BatchSetting"):
        BatchRuntime(opt, base_lr=0.1).apply(StepDecay(1))  # type: ignore[arg-type]
