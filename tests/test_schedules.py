from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchpilot.errors import BadInputError
from batchpilot.training._schedules import (
    BatchIncrease,
    BatchLimits,
    BatchWarmup,
    CosineDecay,
    ExponentialDecay,
    LrDecaySchedule,
    MultiStepDecay,
    PlateauBatch,
    StepDecay,
    decay_from_dict,
    decay_from_torch,
    optimizer_updates,
    periodic_batch,
    realise,
    settings_over,
    sgd_noise_scale,
    split_for,
)

DECAYS = [
    StepDecay(every_epochs=3, gamma=0.2),
    MultiStepDecay(milestones=(2, 5, 7), gamma=0.1),
    ExponentialDecay(gamma=0.8),
    CosineDecay(total_epochs=10, min_factor=0.01),
    CosineDecay(total_epochs=10),  # decays to 0: the capped batch hands the rest to the lr
]


@pytest.mark.parametrize("decay", DECAYS, ids=lambda d: d.to_dict()["kind"])
@pytest.mark.parametrize(
    "limits",
    [
        BatchLimits(dataset_size=5000),
        BatchLimits(max_micro_batch=100, max_accumulation=3, dataset_size=5000),
        BatchLimits(max_micro_batch=48, world_size=4, multiple=8, dataset_size=5000),
    ],
    ids=["dataset-cap", "memory-then-accumulation", "four-devices"],
)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_batch_increase_keeps_the_noise_scale_of_lr_decay_at_every_step(
    decay: object, limits: BatchLimits, momentum: float
) -> None:
    n = 5000
    increase = BatchIncrease(decay, base_batch=32, base_lr=0.4, limits=limits)  # type: ignore[arg-type]
    reference = LrDecaySchedule(decay, base_batch=32, base_lr=0.4, limits=limits)  # type: ignore[arg-type]
    steps = settings_over(increase, dataset_size=n, epochs=10)
    for epoch, setting in steps:
        ours = sgd_noise_scale(setting.lr, setting.batch, n, momentum=momentum)
        theirs = sgd_noise_scale(
            reference.at(epoch).lr, reference.at(epoch).batch, n, momentum=momentum
        )
        assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)
        # The split is real: micro × accumulation × devices is the batch, within the limits.
        assert (
            setting.micro_batch * setting.accumulation_steps * setting.world_size == setting.batch
        )
        if limits.max_micro_batch is not None:
            assert setting.micro_batch <= limits.max_micro_batch
        if limits.max_accumulation is not None:
            assert setting.accumulation_steps <= limits.max_accumulation
        assert setting.batch <= limits.cap
        assert setting.lr <= 0.4 + 1e-12
    assert len(steps) < optimizer_updates(reference, dataset_size=n, epochs=10)


@settings(max_examples=60, deadline=None)
@given(
    base=st.integers(1, 64),
    k=st.floats(1.0, 1e4),
    micro=st.one_of(st.none(), st.integers(1, 300)),
    accumulation=st.one_of(st.none(), st.integers(1, 8)),
    world=st.integers(1, 4),
    multiple=st.sampled_from([1, 8]),
)
def test_realise_keeps_lr_over_batch_exact_under_any_limits(
    base: int, k: float, micro: int | None, accumulation: int | None, world: int, multiple: int
) -> None:
    base *= world
    limits = BatchLimits(
        max_micro_batch=micro,
        max_accumulation=accumulation,
        world_size=world,
        dataset_size=100_000,
        multiple=multiple,
    )
    if limits.cap < base:
        return
    setting = realise(k, base_batch=base, base_lr=0.1, limits=limits)
    assert setting.lr / setting.batch == pytest.approx(0.1 / (k * base), rel=1e-12)
    assert setting.batch <= min(limits.cap, max(base, base * k) + 1e-9)
    assert setting.micro_batch * setting.accumulation_steps * world == setting.batch


def test_fallback_order_is_micro_batch_then_accumulation_then_lr() -> None:
    limits = BatchLimits(max_micro_batch=64, max_accumulation=4, dataset_size=10_000)
    at = {k: realise(k, base_batch=32, base_lr=0.1, limits=limits) for k in (1, 2, 4, 8, 16, 32)}
    assert [(s.batch, s.micro_batch, s.accumulation_steps) for s in at.values()] == [
        (32, 32, 1),
        (64, 64, 1),  # one pass per device while it fits
        (128, 64, 2),  # then accumulation
        (256, 64, 4),
        (256, 64, 4),  # capped at 64 × 4: the lr takes the rest
        (256, 64, 4),
    ]
    assert [s.lr for s in at.values()] == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05, 0.025])


def test_split_for_rounds_down_never_over_the_batch() -> None:
    assert split_for(1000, BatchLimits(max_micro_batch=64)) == (62, 16)
    assert split_for(256, BatchLimits(max_micro_batch=64, world_size=2)) == (64, 2)
    assert split_for(7, BatchLimits()) == (7, 1)


def test_step_decay_equivalent_has_the_expected_batches_and_far_fewer_updates() -> None:
    # Smith et al.'s setting in miniature: decay ×0.2 at epochs 3 and 6 of 9.
    decay = MultiStepDecay(milestones=(3, 6), gamma=0.2)
    limits = BatchLimits(dataset_size=1000)
    increase = BatchIncrease(decay, base_batch=10, base_lr=0.1, limits=limits)
    assert [increase.at(e).batch for e in (0, 3, 6)] == [10, 50, 250]
    decayed = LrDecaySchedule(decay, base_batch=10, base_lr=0.1, limits=limits)
    assert optimizer_updates(decayed, dataset_size=1000, epochs=9) == 900
    assert optimizer_updates(increase, dataset_size=1000, epochs=9) == 300 + 60 + 12


@pytest.mark.parametrize(
    ("make", "steps_per_epoch"),
    [
        (lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5), 2),
        (lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 7], gamma=0.1), 1),
        (lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9), 3),
        (lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12, eta_min=0.01), 2),
    ],
)
def test_decay_from_torch_reproduces_the_scheduler(make: object, steps_per_epoch: int) -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    scheduler = make(opt)  # type: ignore[operator]
    decay = decay_from_torch(scheduler, steps_per_epoch=steps_per_epoch)
    for step in range(12):
        expected = opt.param_groups[0]["lr"] / 0.1
        assert decay.factor(step / steps_per_epoch) == pytest.approx(expected, rel=1e-6)
        opt.step()
        scheduler.step()
    assert decay_from_dict(json.loads(json.dumps(decay.to_dict()))) == decay


def test_decay_from_torch_refuses_other_schedulers() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(BadInputError, match=r"^scheduler: LambdaLR"):
        decay_from_torch(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))


def test_periodic_multiplies_then_decays_lr_at_the_cap() -> None:
    schedule = periodic_batch(
        base_batch=16, base_lr=0.2, factor=4, every_epochs=2, limits=BatchLimits(max_batch=300)
    )
    assert [(schedule.at(e).batch, schedule.at(e).lr) for e in (0, 1.99, 2, 4, 6)] == [
        (16, 0.2),
        (16, 0.2),
        (64, 0.2),
        (256, 0.2),
        (300, pytest.approx(0.2 * 300 / 1024)),
    ]


def test_warmup_ramps_linearly_and_hands_over() -> None:
    then = periodic_batch(base_batch=64, base_lr=0.1, every_epochs=5)
    warmup = BatchWarmup(
        start_batch=8, base_batch=64, warmup_epochs=4, base_lr=0.1, lr_rule="linear", then=then
    )
    batches = [warmup.at(e).batch for e in (0, 1, 2, 3, 4, 5, 10)]
    assert batches == [8, 22, 36, 50, 64, 128, 256]
    assert warmup.at(2).lr == pytest.approx(0.1 * 36 / 64)
    flat = BatchWarmup(start_batch=8, base_batch=64, warmup_epochs=4, base_lr=0.1)
    assert flat.at(1).lr == 0.1 and flat.at(100).batch == 64


def test_plateau_grows_on_stalls_and_resumes_from_state() -> None:
    schedule = PlateauBatch(
        base_batch=32, base_lr=0.1, patience=2, cooldown=1, limits=BatchLimits(max_batch=100)
    )
    values = [1.0, 0.9, 0.95, 0.92, 0.91, 0.93, 0.94, 0.95, 0.96]
    grew = [schedule.observe(v) for v in values[:5]]
    state = json.loads(json.dumps(schedule.state_dict()))
    resumed = PlateauBatch(
        base_batch=32, base_lr=0.1, patience=2, cooldown=1, limits=BatchLimits(max_batch=100)
    )
    resumed.load_state_dict(state)
    rest = [schedule.observe(v) for v in values[5:]]
    assert [resumed.observe(v) for v in values[5:]] == rest
    # Cooldown 1: the observation after a growth does not count towards the next.
    assert grew + rest == [False, False, False, True, False, False, True, False, False]
    assert schedule.level == 2
    assert schedule.at(0).batch == 100 and schedule.at(0).lr == pytest.approx(0.1 * 100 / 128)


def test_state_dict_round_trips_through_json_and_refuses_another_schedule() -> None:
    limits = BatchLimits(max_micro_batch=64, dataset_size=1000)
    schedule = BatchIncrease(MultiStepDecay((2, 4)), base_batch=16, base_lr=0.1, limits=limits)
    schedule.at(3.5)
    state = json.loads(json.dumps(schedule.state_dict()))
    twin = BatchIncrease(MultiStepDecay((2, 4)), base_batch=16, base_lr=0.1, limits=limits)
    twin.load_state_dict(state)
    assert twin.last_epoch == 3.5
    other = BatchIncrease(MultiStepDecay((2, 5)), base_batch=16, base_lr=0.1, limits=limits)
    with pytest.raises(BadInputError, match=r"^state: it was saved from a different schedule"):
        other.load_state_dict(state)


def test_arguments_are_checked_where_they_enter() -> None:
    with pytest.raises(BadInputError, match=r"^gamma: expected a decay factor in \(0, 1\], got 2"):
        StepDecay(every_epochs=1, gamma=2)
    with pytest.raises(BadInputError, match=r"^milestones: expected increasing"):
        MultiStepDecay(milestones=(5, 2))
    with pytest.raises(BadInputError, match=r"^base_batch: 10 is not a multiple of world_size 4"):
        BatchIncrease(StepDecay(1), base_batch=10, base_lr=0.1, limits=BatchLimits(world_size=4))
    with pytest.raises(BadInputError, match=r"^base_batch: 64 is above what the limits allow"):
        BatchIncrease(StepDecay(1), base_batch=64, base_lr=0.1, limits=BatchLimits(max_batch=32))
    with pytest.raises(BadInputError, match=r"^limits: the schedule asks for an unbounded batch"):
        BatchIncrease(CosineDecay(1), base_batch=8, base_lr=0.1).at(1)
    with pytest.raises(BadInputError, match=r"^epoch: expected a number ≥ 0, got -1"):
        BatchIncrease(StepDecay(1), base_batch=8, base_lr=0.1).at(-1)
    with pytest.raises(BadInputError, match=r"^noise_reduction: expected a number ≥ 1"):
        realise(math.nan, base_batch=8, base_lr=0.1, limits=BatchLimits())
