from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler, RandomSampler, TensorDataset

from batchpilot.errors import BadInputError
from batchpilot.training._pitfalls import (
    PitfallWarning,
    check_batchnorm,
    check_loss_normalisation,
    check_pitfalls,
    check_shuffling,
    warn_pitfalls,
)
from batchpilot.training._sampler import ScheduledBatchSampler


def cnn(norm: str = "batch") -> nn.Module:
    layer = {"batch": nn.BatchNorm2d(8), "group": nn.GroupNorm(2, 8)}[norm]
    return nn.Sequential(nn.Conv2d(3, 8, 3), layer, nn.ReLU())


def codes(found: list) -> list[str]:  # type: ignore[type-arg]
    return [p.code for p in found]


def test_batchnorm_small_per_device_batch_suggests_syncbn_or_groupnorm() -> None:
    found = check_batchnorm(cnn(), micro_batch=4, world_size=8)
    assert codes(found) == ["batchnorm_small_batch", "batchnorm_per_device"]
    assert "SyncBatchNorm" in found[0].suggestion and "GroupNorm" in found[0].suggestion
    assert "over 32 samples across devices" in found[0].suggestion
    assert check_batchnorm(cnn(), micro_batch=32, world_size=1) == []
    assert check_batchnorm(cnn("group"), micro_batch=2, world_size=8) == []


def test_syncbatchnorm_counts_samples_over_all_devices() -> None:
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(cnn())
    assert check_batchnorm(synced, micro_batch=4, world_size=8) == []  # 32 samples per statistic
    assert codes(check_batchnorm(synced, micro_batch=2, world_size=4)) == [
        "syncbatchnorm_small_batch"
    ]


def test_batchnorm_with_accumulation_is_an_info() -> None:
    found = check_batchnorm(cnn(), micro_batch=32, accumulation_steps=4)
    assert codes(found) == ["batchnorm_accumulation"] and found[0].severity == "info"


def test_loss_per_device_mean_flags_unequal_items_with_the_weight_error() -> None:
    assert check_loss_normalisation(items_per_rank=[64, 64, 64, 64]) == []
    # Token-level loss: rank 0 has 100 tokens, rank 1 has 300. Mean over ranks weighs a rank-0
    # token 400/(2·100) = 2× and a rank-1 token 400/(2·300) = 0.67×.
    found = check_loss_normalisation(items_per_rank=[100, 300])
    assert codes(found) == ["loss_per_device_mean"]
    assert "up to 2× (down to 0.667×)" in found[0].message
    assert "num_items_in_batch" in found[0].suggestion
    assert codes(check_loss_normalisation(items_per_rank=[5, 5], reduction="sum")) == [
        "loss_sum_averaged"
    ]
    found = check_loss_normalisation(
        items_per_rank=[8], accumulation_steps=4, divided_by_accumulation=False
    )
    assert codes(found) == ["loss_not_divided_by_accumulation"]
    assert "multiplies the effective lr by 4" in found[0].message


def test_the_weight_error_is_real() -> None:
    # What the warning describes, measured: mean of per-rank means vs the global mean.
    values = torch.tensor([1.0] * 100 + [3.0] * 300)
    per_rank = (values[:100].mean() + values[100:].mean()) / 2
    assert float(per_rank) == 2.0 and float(values.mean()) == 2.5


def test_shuffling_checks() -> None:
    data = TensorDataset(torch.zeros(20))
    found = check_shuffling(RandomSampler(data), world_size=2)
    assert codes(found) == ["sampler_not_distributed"]
    assert "every rank iterates the whole dataset" in found[0].message
    sampler = DistributedSampler(data, num_replicas=2, rank=0, shuffle=True, seed=1)
    assert check_shuffling(sampler, world_size=2, epoch=0) == []
    assert codes(check_shuffling(sampler, world_size=2, epoch=3)) == ["set_epoch_missing"]
    assert codes(check_shuffling(sampler, world_size=4)) == ["sampler_wrong_world"]
    ours = ScheduledBatchSampler(20, batch_size=4, num_replicas=2, rank=1, seed=0)
    assert codes(check_shuffling(ours, world_size=2, seeds=[0, 1])) == ["seeds_differ"]
    overlap = check_shuffling(ours, world_size=2, first_batches=[[1, 2], [2, 3]])
    assert codes(overlap) == ["ranks_overlap"]
    unshuffled = DistributedSampler(data, num_replicas=2, rank=0, shuffle=False)
    assert codes(check_shuffling(unshuffled, world_size=2)) == ["sampler_not_shuffled"]


def test_different_seeds_really_overlap() -> None:
    # Two ranks whose samplers were seeded with their rank: their parts of one epoch overlap.
    parts = [
        {
            i
            for b in ScheduledBatchSampler(40, batch_size=8, num_replicas=2, rank=r, seed=r)
            for i in b
        }
        for r in range(2)
    ]
    assert parts[0] & parts[1]
    assert codes(check_shuffling(ScheduledBatchSampler(40, batch_size=8), seeds=[0, 1])) == [
        "seeds_differ"
    ]


def test_check_pitfalls_combines_and_warn_emits() -> None:
    found = check_pitfalls(
        model=cnn(),
        micro_batch=2,
        world_size=2,
        items_per_rank=[2, 1],
        sampler=RandomSampler(TensorDataset(torch.zeros(8))),
    )
    assert codes(found) == [
        "batchnorm_small_batch",
        "batchnorm_per_device",
        "loss_per_device_mean",
        "sampler_not_distributed",
    ]
    assert all(p.to_dict()["code"] == p.code for p in found)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_pitfalls(found)
    assert len(caught) == 3 and all(w.category is PitfallWarning for w in caught)


def test_arguments_are_checked() -> None:
    with pytest.raises(BadInputError, match=r"^micro_batch: expected a positive integer, got 0"):
        check_batchnorm(cnn(), micro_batch=0)
    with pytest.raises(BadInputError, match=r"^items_per_rank: expected one non-negative count"):
        check_loss_normalisation(items_per_rank=[])
