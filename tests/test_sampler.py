from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from batchpilot.errors import BadInputError
from batchpilot.training._sampler import ScheduledBatchSampler, epoch_batches
from batchpilot.training._schedules import (
    BatchIncrease,
    BatchLimits,
    CosineDecay,
    PlateauBatch,
    periodic_batch,
)


def all_ranks(size: int, source: object, world: int, seed: int = 0) -> list[ScheduledBatchSampler]:
    return [
        ScheduledBatchSampler(size, batch_size=source, seed=seed, num_replicas=world, rank=r)  # type: ignore[arg-type]
        for r in range(world)
    ]


def check_epoch(samplers: list[ScheduledBatchSampler], size: int) -> list[int]:
    """One epoch on every rank: exact coverage, disjoint steps, balanced ranks. Returns the global
    batch of each step."""
    per_rank = [epoch_batches(s) for s in samplers]
    steps = {len(batches) for batches in per_rank}
    assert len(steps) == 1, "every rank takes the same number of steps"
    seen: Counter[int] = Counter()
    globals_ = []
    for step_parts in zip(*per_rank, strict=True):
        sizes = [len(part) for part in step_parts]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        union = [i for part in step_parts for i in part]
        assert len(set(union)) == len(union), "ranks' parts of a step are disjoint"
        seen.update(union)
        globals_.append(len(union))
    assert sorted(seen) == list(range(size)) and set(seen.values()) == {1}
    return globals_


@settings(max_examples=80, deadline=None)
@given(
    size=st.integers(1, 300),
    world=st.integers(1, 4),
    sizes=st.lists(st.integers(1, 64), min_size=1, max_size=20),
    seed=st.integers(0, 10),
)
def test_every_sample_exactly_once_per_epoch_under_any_schedule(
    size: int, world: int, sizes: list[int], seed: int
) -> None:
    if world > size:
        return

    def batch_at(epoch: float) -> int:
        # An arbitrary schedule: a different batch at every step, looked up by the epoch.
        return max(world, sizes[int(epoch * 7919) % len(sizes)])

    samplers = all_ranks(size, batch_at, world, seed)
    for _ in range(2):
        check_epoch(samplers, size)
    assert {s.epoch for s in samplers} == {2}


@pytest.mark.parametrize(
    "schedule",
    [
        periodic_batch(base_batch=8, base_lr=0.1, every_epochs=1, limits=BatchLimits(max_batch=64)),
        BatchIncrease(CosineDecay(4), base_batch=4, base_lr=0.1, limits=BatchLimits(max_batch=97)),
    ],
    ids=["periodic", "cosine"],
)
def test_coverage_under_batch_schedules_with_ranks(schedule: object) -> None:
    samplers = all_ranks(203, schedule, 4)
    steps = [check_epoch(samplers, 203) for _ in range(4)]
    assert steps[0][0] < steps[-1][0]  # the batch grew across epochs


def test_set_batch_size_applies_from_the_next_batch_and_coverage_holds() -> None:
    sampler = ScheduledBatchSampler(100, batch_size=10, shuffle=False)
    iterator = iter(sampler)
    first = [next(iterator) for _ in range(3)]
    sampler.set_batch_size(25)
    rest = list(iterator)
    assert [len(b) for b in first + rest] == [10, 10, 10, 25, 25, 20]
    assert sorted(i for b in first + rest for i in b) == list(range(100))


def test_plateau_schedule_drives_the_sampler() -> None:
    plateau = PlateauBatch(base_batch=10, base_lr=0.1, patience=1)
    sampler = ScheduledBatchSampler(100, batch_size=plateau)
    assert len(sampler) == 10
    plateau.observe(1.0)
    plateau.observe(1.5)  # no improvement: the batch doubles
    assert len(sampler) == 5


def test_resume_continues_with_the_next_unseen_sample() -> None:
    def make() -> ScheduledBatchSampler:
        return ScheduledBatchSampler(
            90, batch_size=lambda e: 8 if e < 1.5 else 16, seed=3, num_replicas=2, rank=1
        )

    whole = make()
    reference = [b for _ in range(3) for b in iter(whole)]
    first = make()
    taken = list(iter(first))  # epoch 0
    iterator = iter(first)
    taken += [next(iterator) for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    taken += list(iter(resumed)) + list(iter(resumed))
    assert taken == reference


def test_state_can_be_saved_at_the_loops_position_when_the_loader_prefetches() -> None:
    sampler = ScheduledBatchSampler(50, batch_size=10, shuffle=False)
    iterator = iter(sampler)
    for _ in range(4):  # a prefetching loader has asked for 4 batches, the loop trained on 2
        next(iterator)
    assert sampler.state_dict()["position"] == 40
    assert sampler.state_dict(batches_consumed=2)["position"] == 20
    with pytest.raises(BadInputError, match=r"^batches_consumed: expected 0 to 4"):
        sampler.state_dict(batches_consumed=5)


def test_works_as_a_dataloader_batch_sampler_and_reshuffles_each_epoch() -> None:
    data = TensorDataset(torch.arange(40).float())
    sampler = ScheduledBatchSampler(data, batch_size=lambda e: 4 if e < 1 else 8, seed=0)
    loader = DataLoader(data, batch_sampler=sampler)
    epoch0 = [b[0] for b in loader]
    epoch1 = [b[0] for b in loader]
    assert [len(b) for b in epoch0] == [4] * 10 and [len(b) for b in epoch1] == [8] * 5
    assert torch.cat(epoch0).sort().values.tolist() == list(range(40))
    assert torch.cat(epoch0).tolist() != torch.cat(epoch1).tolist()
    again = ScheduledBatchSampler(data, batch_size=4, seed=0)
    assert next(iter(again)) == epoch0[0].long().tolist()


def test_set_epoch_and_unsized_mode() -> None:
    sampler = ScheduledBatchSampler(10, batch_size=3, shuffle=False, sized=False)
    with pytest.raises(TypeError):
        len(sampler)
    assert sampler.batches_left() == 4  # 3, 3, 3 and the last sample on its own
    sampler.set_epoch(5)
    assert sampler.epoch == 5 and sampler.epoch_progress == 5.0


def test_leftover_smaller_than_the_ranks_is_merged_not_dropped() -> None:
    samplers = all_ranks(11, 4, 4)
    assert check_epoch(samplers, 11) == [4, 7]


def test_arguments_are_checked() -> None:
    with pytest.raises(
        BadInputError, match=r"^batch_size: a global batch of 2 cannot give each of 4"
    ):
        ScheduledBatchSampler(10, batch_size=2, num_replicas=4, rank=0)
    with pytest.raises(BadInputError, match=r"^rank: expected an integer in \[0, 2\), got 2"):
        ScheduledBatchSampler(10, batch_size=2, num_replicas=2, rank=2)
    with pytest.raises(BadInputError, match=r"^batch_size: expected an int, a BatchSchedule"):
        ScheduledBatchSampler(10, batch_size="big")  # type: ignore[arg-type]
    bad = ScheduledBatchSampler(10, batch_size=lambda e: 0)
    with pytest.raises(BadInputError, match=r"^batch_size: expected a positive integer, got 0"):
        list(bad)
    loaded = ScheduledBatchSampler(10, batch_size=2)
    with pytest.raises(BadInputError, match=r"^state: saved with dataset_size=12"):
        loaded.load_state_dict({**loaded.state_dict(), "dataset_size": 12})
