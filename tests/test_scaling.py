from __future__ import annotations

import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from batchpilot.errors import BadInputError
from batchpilot.plan._lr_rule import scale_adam, scale_lr
from batchpilot.plan._scaling import plan_scaling, steps_per_epoch, warmup_steps
from batchpilot.plan._split import split_batch

batches = st.integers(min_value=1, max_value=1 << 16)
lrs = st.floats(min_value=1e-6, max_value=10.0, allow_nan=False)


def test_seed_examples() -> None:
    assert scale_lr(0.1, ref_batch=256, batch=8192, rule="linear") == pytest.approx(3.2)
    assert scale_lr(0.1, ref_batch=256, batch=8192, rule="sqrt") == pytest.approx(0.5657, abs=1e-4)
    assert scale_lr(0.1, ref_batch=256, batch=8192, rule="none") == 0.1
    assert steps_per_epoch(1000, 10) == 100  # seed 002: 1000 samples, batch 10 → 100 iterations


def test_sum_reduction_keeps_lr_under_linear_rule() -> None:
    assert scale_lr(0.1, ref_batch=32, batch=512, rule="linear", reduction="sum") == 0.1
    # sqrt rule on a summed loss: the gradient already grew 16×, so lr shrinks by √16.
    assert scale_lr(0.1, ref_batch=32, batch=512, rule="sqrt", reduction="sum") == pytest.approx(
        0.025
    )


def test_adam_rule_matches_malladi() -> None:
    s = scale_adam(1e-3, ref_batch=100, batch=400, betas=(0.9, 0.99), eps=1e-8)
    assert s.lr == pytest.approx(2e-3)
    assert s.betas == pytest.approx((0.6, 0.96))
    assert s.eps == pytest.approx(5e-9)


def test_adam_rule_refuses_beta_out_of_range_with_amount() -> None:
    with pytest.raises(
        BadInputError,
        match=r"beta2=0.999 to -1 \(≤ 0\) at κ=2000, 2× the κ < 1/\(1 − beta2\) = 1000",
    ):
        scale_adam(1e-3, ref_batch=1, batch=2000, betas=(0.9999, 0.999))
    with pytest.raises(BadInputError, match="beta1"):
        scale_adam(1e-3, ref_batch=1, batch=100, betas=(0.9, 0.5))


@given(
    lr=lrs,
    ref=batches,
    new=batches,
    rule=st.sampled_from(["linear", "sqrt", "none"]),
    reduction=st.sampled_from(["mean", "sum"]),
)
def test_scaling_there_and_back_is_identity(
    lr: float, ref: int, new: int, rule: str, reduction: str
) -> None:
    there = scale_lr(lr, ref_batch=ref, batch=new, rule=rule, reduction=reduction)  # type: ignore[arg-type]
    back = scale_lr(there, ref_batch=new, batch=ref, rule=rule, reduction=reduction)  # type: ignore[arg-type]
    assert back == pytest.approx(lr, rel=1e-9)


@given(
    lr=lrs,
    ref=st.integers(1, 64),
    factor=st.integers(1, 8),
    b1=st.floats(0.01, 0.8),
    b2=st.floats(0.9, 0.999),
)
def test_adam_there_and_back_is_identity(
    lr: float, ref: int, factor: int, b1: float, b2: float
) -> None:
    assume(factor * (1 - b1) < 1 and factor * (1 - b2) < 1)
    new = ref * factor
    there = scale_adam(lr, ref_batch=ref, batch=new, betas=(b1, b2), eps=1e-8)
    back = scale_adam(there.lr, ref_batch=new, batch=ref, betas=there.betas, eps=there.eps)
    assert back.lr == pytest.approx(lr, rel=1e-9)
    assert back.betas == pytest.approx((b1, b2), abs=1e-9)
    assert back.eps == pytest.approx(1e-8, rel=1e-9)


@given(lr=lrs, batch=batches)
def test_linear_and_sqrt_agree_at_kappa_one(lr: float, batch: int) -> None:
    linear = scale_lr(lr, ref_batch=batch, batch=batch, rule="linear")
    assert linear == scale_lr(lr, ref_batch=batch, batch=batch, rule="sqrt") == lr


@given(
    global_batch=st.integers(1, 1 << 14), max_micro=st.integers(1, 1024), world=st.integers(1, 16)
)
def test_exact_decomposition_multiplies_back(global_batch: int, max_micro: int, world: int) -> None:
    global_batch *= world
    split = split_batch(global_batch, max_micro_batch=max_micro, world_size=world)
    assert split.global_batch == global_batch
    assert split.micro_batch <= max_micro
    # fewest accumulation steps: one fewer could not hold the per-device batch
    per_device = global_batch // world
    assert all(
        per_device % a or per_device // a > max_micro for a in range(1, split.accumulation_steps)
    )


@given(global_batch=st.integers(1, 1 << 14), max_micro=st.integers(1, 1024))
def test_nearest_decomposition_is_close(global_batch: int, max_micro: int) -> None:
    split = split_batch(global_batch, max_micro_batch=max_micro, exact=False)
    assert split.micro_batch <= max_micro
    assert split.accumulation_steps == math.ceil(global_batch / max_micro)
    # rounded down: never above the target, short of it by less than one accumulation step
    assert 0 <= global_batch - split.global_batch < split.accumulation_steps


def test_decomposition_errors_name_the_argument() -> None:
    with pytest.raises(BadInputError, match=r"global_batch: 100 is not a multiple of world_size 8"):
        split_batch(100, max_micro_batch=16, world_size=8)
    with pytest.raises(
        BadInputError,
        match=r"batch: 100 is not a multiple of micro_batch × world_size = 12 × 2 = 24",
    ):
        split_batch(100, micro_batch=12, world_size=2)
    with pytest.raises(BadInputError, match=r"max_micro_batch: expected a positive integer, got 0"):
        split_batch(100, max_micro_batch=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"ref_batch": 0, "ref_lr": 0.1, "batch": 8},
            "ref_batch: expected a positive integer, got 0",
        ),
        (
            {"ref_batch": 8, "ref_lr": -1.0, "batch": 8},
            "ref_lr: expected a positive number, got -1.0",
        ),
        (
            {"ref_batch": 8, "ref_lr": 0.1, "batch": -3},
            "batch: expected a positive integer, got -3",
        ),
        (
            {"ref_batch": 8, "ref_lr": 0.1, "batch": 8, "rule": "cubic"},
            "rule: unknown rule 'cubic'",
        ),
        ({"ref_batch": 8, "ref_lr": 0.1, "batch": 8, "reduction": "max"}, "reduction: unknown"),
        ({"ref_batch": 8, "ref_lr": 0.1}, "batch: give the new global batch"),
    ],
)
def test_plan_refuses_impossible_inputs(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(BadInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_scaling(**kwargs)  # type: ignore[arg-type]


def test_plan_epoch_arithmetic_and_warmup() -> None:
    plan = plan_scaling(
        ref_batch=256,
        ref_lr=0.1,
        micro_batch=64,
        accumulation_steps=4,
        world_size=8,
        dataset_size=1_281_167,
        epochs=90,
    )
    assert plan.global_batch == 2048
    assert plan.lr == pytest.approx(0.8)
    assert plan.steps_per_epoch_without_drop_last == 626  # ceil(1281167 / 2048)
    assert plan.steps_per_epoch_with_drop_last == 625
    assert plan.total_steps == 90 * 626
    assert plan.warmup_epochs == 5.0 and plan.warmup_steps == 5 * 626  # Goyal et al.
    assert any("divided by 4" in line for line in plan.explanation)


def test_plan_no_default_warmup_when_lr_does_not_grow() -> None:
    plan = plan_scaling(ref_batch=256, ref_lr=0.1, batch=128, dataset_size=1000)
    assert plan.lr == pytest.approx(0.05)
    assert plan.warmup_steps == 0
    assert warmup_steps(0.5, 8) == 4


def test_plan_accumulation_must_match() -> None:
    with pytest.raises(BadInputError, match="accumulation_steps: 3 does not match"):
        plan_scaling(ref_batch=32, ref_lr=0.1, batch=256, micro_batch=32, accumulation_steps=3)
    plan = plan_scaling(ref_batch=32, ref_lr=0.1, batch=256, max_micro_batch=48, world_size=2)
    assert (plan.micro_batch, plan.accumulation_steps, plan.world_size) == (32, 4, 2)
