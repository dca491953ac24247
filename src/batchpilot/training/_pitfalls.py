"""Why a multi-GPU run differs from a one-GPU run at the same global batch: checks that say so.

Three causes account for most of it, each with a check that takes a model, a sampler or a few
numbers about the run and returns :class:`Pitfall` objects (an empty list when all is well):

- :func:`check_batchnorm`: BatchNorm normalises over the per-device micro-batch, not the global
  batch; below ~16 samples per device its statistics get noisy (Wu & He 2018, arXiv 1803.08494),
  and with several devices the statistics differ from a one-device run anyway. Suggests
  ``SyncBatchNorm`` or ``GroupNorm``.
- :func:`check_loss_normalisation`: a loss averaged on each device and then averaged over devices
  is the global mean only when every device holds the same number of items (samples, or tokens
  for a token-level loss); a sum-reduced loss under DDP's averaging, or micro-losses not divided
  by the accumulation steps, change the effective lr.
- :func:`check_shuffling`: every rank must draw from the same permutation (same seed) and take
  disjoint parts of it, and a new permutation each epoch (``set_epoch``).

:func:`check_pitfalls` runs those that apply; :func:`warn_pitfalls` turns results into warnings.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
>>> [p.code for p in check_batchnorm(model, micro_batch=4, world_size=8)]
['batchnorm_small_batch', 'batchnorm_per_device']
>>> check_loss_normalisation(items_per_rank=[512, 512], reduction="mean")
[]
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from torch import nn
from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler

from batchpilot.checks import check_positive_int
from batchpilot.errors import BadInputError

Severity = Literal["warning", "info"]

# Wu & He (2018): BatchNorm's error grows quickly below 16 images per device.
MIN_BATCHNORM_BATCH = 16


class PitfallWarning(UserWarning):
    """A multi-device setting that changes what training computes."""


@dataclass(frozen=True)
class Pitfall:
    """One problem found: a stable ``code``, what is wrong, and what to do about it."""

    code: str
    severity: Severity
    message: str
    suggestion: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.message} {self.suggestion}"


def _batchnorm_layers(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of plain BatchNorm layers and of SyncBatchNorm layers."""
    plain, synced = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.SyncBatchNorm):
            synced.append(name or type(module).__name__)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            plain.append(name or type(module).__name__)
    return plain, synced


def check_batchnorm(
    model: nn.Module,
    *,
    micro_batch: int,
    world_size: int = 1,
    accumulation_steps: int = 1,
    min_batch: int = MIN_BATCHNORM_BATCH,
) -> list[Pitfall]:
    """BatchNorm layers whose statistics come from too few samples or from one device only.

    ``micro_batch`` is the samples per device per forward pass. A ``SyncBatchNorm`` normalises over
    ``micro_batch × world_size`` samples; a plain one over ``micro_batch``.
    """
    if not isinstance(model, nn.Module):
        raise BadInputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    check_positive_int("micro_batch", micro_batch)
    check_positive_int("world_size", world_size)
    check_positive_int("accumulation_steps", accumulation_steps)
    check_positive_int("min_batch", min_batch)
    plain, synced = _batchnorm_layers(model)
    found: list[Pitfall] = []
    if plain and micro_batch < min_batch:
        found.append(
            Pitfall(
                "batchnorm_small_batch",
                "warning",
                f"BatchNorm layer(s) {_names(plain)} normalise over {micro_batch} sample(s) per "
                f"device, fewer than {min_batch}: their batch statistics are noisy and training "
                "and evaluation disagree.",
                "Use torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) to normalise over "
                f"{micro_batch * world_size} samples across devices, or replace BatchNorm with "
                "GroupNorm, which does not depend on the batch.",
            )
        )
    if synced and micro_batch * world_size < min_batch:
        found.append(
            Pitfall(
                "syncbatchnorm_small_batch",
                "warning",
                f"SyncBatchNorm layer(s) {_names(synced)} normalise over {micro_batch} × "
                f"{world_size} = {micro_batch * world_size} samples, fewer than {min_batch}.",
                "Use GroupNorm (or LayerNorm), which does not depend on the batch.",
            )
        )
    if plain and world_size > 1:
        found.append(
            Pitfall(
                "batchnorm_per_device",
                "info",
                f"BatchNorm layer(s) {_names(plain)} compute statistics on each of {world_size} "
                f"devices separately ({micro_batch} samples each), so the run differs from one "
                f"device at the same global batch of {micro_batch * accumulation_steps * world_size}.",
                "Convert with torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) for statistics "
                "over all devices (one all-reduce per layer per forward).",
            )
        )
    if plain and accumulation_steps > 1 and micro_batch >= min_batch:
        found.append(
            Pitfall(
                "batchnorm_accumulation",
                "info",
                f"With {accumulation_steps} accumulation steps BatchNorm sees micro-batches of "
                f"{micro_batch}, not the global batch: statistics (and running averages) differ "
                "from a run that fits the whole batch in one pass.",
                "Expected with accumulation; use GroupNorm if the difference matters.",
            )
        )
    return found


def check_loss_normalisation(
    *,
    items_per_rank: Sequence[int],
    reduction: Literal["mean", "sum"] = "mean",
    accumulation_steps: int = 1,
    divided_by_accumulation: bool = True,
    tolerance: float = 0.01,
) -> list[Pitfall]:
    """Whether averaging per-device losses gives the loss over the global batch.

    Args:
        items_per_rank: the items each rank's loss averages over in one step — samples, or tokens
            (non-padding labels) for a token-level loss.
        reduction: how each rank's loss reduces its items.
        accumulation_steps: micro-batches per optimizer step.
        divided_by_accumulation: whether each micro-loss is divided by the accumulation steps
            before backward (or weighted by its share of the step).
        tolerance: the relative weight error tolerated before warning.
    """
    items = [int(n) for n in items_per_rank]
    if not items or any(n < 0 for n in items):
        raise BadInputError(
            f"items_per_rank: expected one non-negative count per rank, got {list(items_per_rank)!r}"
        )
    if reduction not in ("mean", "sum"):
        raise BadInputError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    check_positive_int("accumulation_steps", accumulation_steps)
    ranks = len(items)
    total = sum(items)
    found: list[Pitfall] = []
    if reduction == "mean" and ranks > 1 and total > 0:
        # Rank r's items weigh 1/(ranks·n_r) each instead of 1/total.
        weights = [total / (ranks * n) for n in items if n > 0]
        worst = max(max(weights) - 1.0, 1.0 - min(weights))
        if worst > tolerance or 0 in items:
            found.append(
                Pitfall(
                    "loss_per_device_mean",
                    "warning",
                    f"Each rank's loss is a mean over its own items ({min(items)} to "
                    f"{max(items)} per rank); averaging the ranks weighs an item up to "
                    f"{max(weights):.3g}× (down to {min(weights):.3g}×) what the mean over the "
                    f"global batch of {total} would.",
                    "Sum the loss over each rank's items and divide by the global count (an "
                    "all-reduce of the item count, e.g. transformers' num_items_in_batch), or "
                    "weigh each rank's mean by n_rank · world_size / global_count.",
                )
            )
    if reduction == "sum" and ranks > 1:
        found.append(
            Pitfall(
                "loss_sum_averaged",
                "info",
                f"A sum-reduced loss under DDP is averaged over {ranks} ranks: the gradient is "
                f"the global sum divided by {ranks}, and it grows with the per-rank batch.",
                "Make sure the lr was chosen for this reduction, or divide by the global item "
                "count to train on the global mean.",
            )
        )
    if accumulation_steps > 1 and not divided_by_accumulation and reduction == "mean":
        found.append(
            Pitfall(
                "loss_not_divided_by_accumulation",
                "warning",
                f"Mean micro-losses are not divided by the {accumulation_steps} accumulation "
                f"steps: the accumulated gradient is {accumulation_steps}× the mean's, which "
                f"multiplies the effective lr by {accumulation_steps}.",
                f"Divide each micro-loss by {accumulation_steps} (or by its share of the step's "
                "samples) before backward.",
            )
        )
    return found


def check_shuffling(
    sampler: Any,
    *,
    world_size: int = 1,
    epoch: int | None = None,
    seeds: Sequence[int] | None = None,
    first_batches: Sequence[Sequence[int]] | None = None,
) -> list[Pitfall]:
    """Whether ranks draw consistent, disjoint, reshuffled parts of the data.

    Args:
        sampler: the training sampler (``DataLoader.sampler``) or batch sampler.
        world_size: the data-parallel world size.
        epoch: the epoch the loop is in, to check that ``set_epoch`` was called.
        seeds: each rank's sampler seed (gathered with
            :func:`batchpilot.training._runtime.gather_objects`), to check they agree.
        first_batches: each rank's indices of the same step, to check they are disjoint.
    """
    check_positive_int("world_size", world_size)
    found: list[Pitfall] = []
    inner = getattr(sampler, "sampler", None)
    name = type(sampler).__name__
    is_ours = hasattr(sampler, "num_replicas") and hasattr(sampler, "permutation")
    distributed = isinstance(sampler, DistributedSampler) or is_ours
    if world_size > 1 and not distributed:
        plain = isinstance(sampler, RandomSampler | SequentialSampler) or isinstance(
            inner, RandomSampler | SequentialSampler
        )
        found.append(
            Pitfall(
                "sampler_not_distributed",
                "warning",
                f"The sampler ({name}) does not split the data across {world_size} ranks"
                + (": every rank iterates the whole dataset" if plain else "")
                + ", so ranks see overlapping samples and an epoch is not one pass over the data.",
                "Use torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=SEED) or "
                "batchpilot.training._sampler.ScheduledBatchSampler, with the same seed on every rank.",
            )
        )
    if distributed:
        replicas = int(sampler.num_replicas)
        if replicas != world_size:
            found.append(
                Pitfall(
                    "sampler_wrong_world",
                    "warning",
                    f"The sampler splits the data over {replicas} replicas but the run has "
                    f"{world_size} ranks.",
                    "Create the sampler after init_process_group, or pass num_replicas and rank.",
                )
            )
        if not getattr(sampler, "shuffle", True):
            found.append(
                Pitfall(
                    "sampler_not_shuffled",
                    "info",
                    "The distributed sampler does not shuffle: every epoch sees the same order.",
                    "Pass shuffle=True for training.",
                )
            )
        elif epoch is not None and int(getattr(sampler, "epoch", epoch)) != epoch:
            found.append(
                Pitfall(
                    "set_epoch_missing",
                    "warning",
                    f"The sampler is at epoch {sampler.epoch} while training is at epoch {epoch}: "
                    "without set_epoch each epoch repeats the same permutation.",
                    "Call sampler.set_epoch(epoch) at the start of every epoch, on every rank.",
                )
            )
    if seeds is not None and len(set(seeds)) > 1:
        found.append(
            Pitfall(
                "seeds_differ",
                "warning",
                f"The ranks' sampler seeds differ ({list(seeds)}): their permutations differ, so "
                "their parts overlap and some samples are never drawn in an epoch.",
                "Give every rank the same sampler seed (the rank belongs in the model's dropout "
                "seed, not the sampler's).",
            )
        )
    if first_batches is not None:
        seen: set[int] = set()
        overlap: set[int] = set()
        for part in first_batches:
            indices = {int(i) for i in part}
            overlap |= seen & indices
            seen |= indices
        if overlap:
            found.append(
                Pitfall(
                    "ranks_overlap",
                    "warning",
                    f"Ranks drew {len(overlap)} of the same samples in one step (e.g. "
                    f"{sorted(overlap)[:5]}): the global batch holds duplicates.",
                    "Shuffle with the same seed on every rank and split with DistributedSampler "
                    "or ScheduledBatchSampler.",
                )
            )
    return found


def check_pitfalls(
    *,
    model: nn.Module | None = None,
    sampler: Any = None,
    micro_batch: int | None = None,
    world_size: int = 1,
    accumulation_steps: int = 1,
    items_per_rank: Sequence[int] | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    divided_by_accumulation: bool = True,
    epoch: int | None = None,
    seeds: Sequence[int] | None = None,
    first_batches: Sequence[Sequence[int]] | None = None,
) -> list[Pitfall]:
    """Every check whose inputs are given, in one list."""
    found: list[Pitfall] = []
    if model is not None and micro_batch is not None:
        found += check_batchnorm(
            model,
            micro_batch=micro_batch,
            world_size=world_size,
            accumulation_steps=accumulation_steps,
        )
    if items_per_rank is not None or accumulation_steps > 1 or world_size > 1:
        found += check_loss_normalisation(
            items_per_rank=items_per_rank if items_per_rank is not None else [1] * world_size,
            reduction=reduction,
            accumulation_steps=accumulation_steps,
            divided_by_accumulation=divided_by_accumulation,
        )
    if sampler is not None:
        found += check_shuffling(
            sampler, world_size=world_size, epoch=epoch, seeds=seeds, first_batches=first_batches
        )
    return found


def check_distributed_run(
    model: nn.Module, sampler: Any, *, micro_batch: int, epoch: int | None = None, group: Any = None
) -> list[Pitfall]:
    """Inside a ``torchrun`` job: gather each rank's seed, first-step indices and item count (one
    collective each) and run every check; every rank gets the same list."""
    from batchpilot.training._runtime import distributed_world, gather_objects

    world, _ = distributed_world(group)
    seed = getattr(sampler, "seed", None)
    seeds = gather_objects(seed, group=group)
    first: list[int] = []
    if hasattr(sampler, "permutation") and hasattr(sampler, "num_replicas"):
        order = sampler.permutation()
        batch = sampler.batch_at(sampler.epoch_progress)
        first = order[sampler.rank : batch : sampler.num_replicas].tolist()
    elif isinstance(sampler, DistributedSampler):
        first = list(iter(sampler))[:micro_batch]
    firsts = gather_objects(first, group=group)
    items = gather_objects(len(first) if first else micro_batch, group=group)
    return check_pitfalls(
        model=model,
        sampler=sampler,
        micro_batch=micro_batch,
        world_size=world,
        items_per_rank=items,
        epoch=epoch,
        seeds=[s for s in seeds if s is not None] or None,
        first_batches=firsts if any(firsts) else None,
    )


def warn_pitfalls(pitfalls: Sequence[Pitfall], *, include_info: bool = False) -> None:
    """Issue a :class:`PitfallWarning` for each pitfall (``info`` ones only when asked)."""
    for pitfall in pitfalls:
        if pitfall.severity == "warning" or include_info:
            warnings.warn(str(pitfall), PitfallWarning, stacklevel=2)


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


__all__ = [
    "MIN_BATCHNORM_BATCH",
    "Pitfall",
    "PitfallWarning",
    "check_batchnorm",
    "check_distributed_run",
    "check_loss_normalisation",
    "check_pitfalls",
    "check_shuffling",
    "warn_pitfalls",
]
