from __future__ import annotations

import pytest

from batchpilot.plan._lr_rule import noise_aware_lr
from batchpilot.plan._recommend import advise, recommend


def saturating(b: int) -> float:
    """A device that reaches half its top speed (1000 samples/s) at micro-batch 32."""
    return 1000.0 * b / (b + 32)


CURVE = [(2**k, saturating(2**k)) for k in range(11)]


def test_noise_aware_lr_is_linear_below_and_flat_above_the_noise_scale() -> None:
    assert noise_aware_lr(0.1, ref_batch=8, batch=16, noise_scale=1e6) == pytest.approx(
        0.2, rel=1e-4
    )
    big = noise_aware_lr(0.1, ref_batch=8, batch=1 << 20, noise_scale=64)
    assert big == pytest.approx(0.1 * (1 + 64 / 8), rel=1e-4)  # the ε_max ceiling
    assert noise_aware_lr(0.1, ref_batch=8, batch=16, noise_scale=None) == pytest.approx(0.2)
    # sum-reduced: the mean-equivalent lr is scaled, so linear scaling leaves lr unchanged
    assert noise_aware_lr(0.1, ref_batch=8, batch=16, noise_scale=None, reduction="sum") == 0.1


def test_goodput_prefers_small_batches_when_noise_is_small() -> None:
    common = {
        "train_size": 100_000,
        "max_micro_batch": 1024,
        "reference_batch": 32,
        "reference_lr": 0.1,
        "optimizer_name": "SGD",
        "throughput": CURVE,
    }
    small = recommend(noise_scale=8.0, knee_batch=512, **common)  # type: ignore[arg-type]
    large = recommend(noise_scale=5000.0, knee_batch=512, **common)  # type: ignore[arg-type]
    # goodput(B) = speed(B)·(N+B0)/(N+B) ∝ B/((B+32)(B+8)): maximised at B = √(32·8) = 16
    assert small.global_batch == 16 and small.bound_by == "noise scale"
    assert large.global_batch > small.global_batch
    no_noise = recommend(noise_scale=None, knee_batch=512, **common)  # type: ignore[arg-type]
    assert no_noise.global_batch == 1024  # fastest wins when samples cost nothing extra


def test_recommendation_is_consistent() -> None:
    rec = recommend(
        train_size=50_000,
        max_micro_batch=128,
        reference_batch=64,
        reference_lr=0.1,
        optimizer_name="SGD",
        world_size=4,
        noise_scale=2000.0,
        throughput=CURVE,
        knee_batch=256,
    )
    assert rec.global_batch == rec.micro_batch * rec.accumulation_steps * rec.world_size
    assert rec.micro_batch <= 128
    assert rec.bound_by == "memory"
    assert rec.lr == pytest.approx(
        noise_aware_lr(0.1, ref_batch=64, batch=rec.global_batch, noise_scale=2000.0)
    )
    assert rec.steps_to_target_ratio == pytest.approx(1 + 2000.0 / rec.global_batch)
    assert rec.warmup_steps > 0 and rec.warmup_epochs == 5.0


def test_adam_family_uses_malladi() -> None:
    rec = recommend(
        train_size=10_000,
        max_micro_batch=512,
        reference_batch=32,
        reference_lr=1e-3,
        optimizer_name="AdamW",
        noise_scale=1000.0,
        throughput=CURVE,
        knee_batch=128,
        betas=(0.9, 0.999),
    )
    kappa = rec.global_batch / 32
    assert rec.lr_rule == "adam"
    assert rec.lr == pytest.approx(1e-3 * kappa**0.5)
    assert rec.betas == pytest.approx((1 - kappa * 0.1, 1 - kappa * 0.001))


WARNING_CASES = {
    "batchnorm-small-batch": {"has_batchnorm": True, "per_device_micro_batch": 8},
    "sum-reduced-loss": {"reduction": "sum"},
    "few-steps-per-epoch": {"steps_in_epoch": 4, "global_batch": 256, "train_size": 1000},
    "noise-scale-lr-mismatch": {"noise_lr": 1.0, "good_lr": 0.1},
}
QUIET = {
    "has_batchnorm": False,
    "per_device_micro_batch": 64,
    "reduction": "mean",
    "steps_in_epoch": 100,
    "train_size": 6400,
    "global_batch": 64,
    "noise_lr": 0.1,
    "good_lr": 0.1,
}


@pytest.mark.parametrize("code", list(WARNING_CASES))
def test_each_warning_fires_only_on_its_condition(code: str) -> None:
    assert advise(**QUIET) == ()  # type: ignore[arg-type]
    fired = advise(**{**QUIET, **WARNING_CASES[code]})  # type: ignore[arg-type]
    assert [a.code for a in fired] == [code]


def test_batchnorm_warning_not_for_large_batches_or_no_batchnorm() -> None:
    assert advise(**{**QUIET, "has_batchnorm": True, "per_device_micro_batch": 16}) == ()  # type: ignore[arg-type]
    assert advise(**{**QUIET, "per_device_micro_batch": 2}) == ()  # type: ignore[arg-type]
