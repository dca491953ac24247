from __future__ import annotations

import math

import pytest

from batchpilot.errors import BadInputError
from batchpilot.plan import lr_for_batch, plan_scaling, recommend

KAPPAS = [2.0**k for k in range(-6, 11)]  # 1/64 … 1024


@pytest.mark.parametrize("optimizer", ["Adam", "AdamW"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kappa", KAPPAS)
def test_adam_family_follows_malladi_until_beta1_binds_then_sqrt(
    optimizer: str, reduction: str, kappa: float
) -> None:
    ref_batch = 64
    batch = round(ref_batch * kappa)
    got = lr_for_batch(
        1e-3,
        ref_batch=ref_batch,
        batch=batch,
        optimizer=optimizer,
        reduction=reduction,  # type: ignore[arg-type]
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    assert got.lr == pytest.approx(1e-3 * math.sqrt(kappa))  # Adam divides out the gradient scale
    if kappa < 10:  # 1/(1 − β1): β1 = 0.9 binds long before β2 = 0.999 (κ < 1000)
        assert got.rule == "adam" and not got.fell_back
        assert got.betas == pytest.approx((1 - kappa * 0.1, 1 - kappa * 0.001))
        assert 0 < got.betas[0] < 1 and 0 < got.betas[1] < 1
        eps = 1e-8 / math.sqrt(kappa) * (kappa if reduction == "sum" else 1.0)
        assert got.eps == pytest.approx(eps)
    else:
        assert got.rule == "sqrt" and got.fell_back
        assert got.betas == (0.9, 0.999) and got.eps == 1e-8
        assert "β1 = 0.9 binds" in got.reason


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kappa", KAPPAS)
def test_sgd_is_linear_without_noise_scale_and_saturates_with_one(
    reduction: str, kappa: float
) -> None:
    ref_batch, noise = 64, 256.0
    batch = round(ref_batch * kappa)
    linear = lr_for_batch(
        0.1, ref_batch=ref_batch, batch=batch, optimizer="SGD", reduction=reduction
    )  # type: ignore[arg-type]
    aware = lr_for_batch(
        0.1,
        ref_batch=ref_batch,
        batch=batch,
        optimizer="SGD",
        reduction=reduction,
        noise_scale=noise,  # type: ignore[arg-type]
    )
    per_sample = 1.0 / kappa if reduction == "sum" else 1.0
    assert linear.rule == "linear" and linear.lr == pytest.approx(0.1 * kappa * per_sample)
    factor = (1 + noise / ref_batch) / (1 + noise / batch)
    assert aware.rule == "noise-aware linear"
    assert aware.lr == pytest.approx(0.1 * factor * per_sample)
    # never more than the linear rule above the reference batch, never less below it
    assert (aware.lr <= linear.lr * (1 + 1e-12)) if kappa >= 1 else (aware.lr >= linear.lr)


def test_the_reported_adam_crash_now_falls_back() -> None:
    rec = recommend(
        train_size=100000,
        max_micro_batch=4096,
        reference_batch=32,
        reference_lr=1e-3,
        optimizer_name="Adam",
        throughput=[(32, 1e3), (512, 1.6e4), (4096, 1.28e5)],
        noise_scale=1e6,
    )
    kappa = rec.global_batch / 32
    assert kappa > 10 and rec.lr_rule == "sqrt" and rec.betas is None
    assert rec.lr == pytest.approx(1e-3 * math.sqrt(kappa))


def test_scale_command_uses_the_same_rule() -> None:
    for batch in (128, 8192):
        plan = plan_scaling(ref_batch=256, ref_lr=0.1, batch=batch, rule="adam")
        rule = lr_for_batch(0.1, ref_batch=256, batch=batch, rule="adam")
        assert plan.lr == rule.lr
        assert plan.betas == (rule.betas if not rule.fell_back else None)
    assert any("binds" in line for line in plan.explanation)


def test_bad_betas_are_refused_not_taken_for_a_large_kappa() -> None:
    with pytest.raises(BadInputError, match=r"beta1: expected a value in \[0, 1\), got 1.5"):
        lr_for_batch(1e-3, ref_batch=32, batch=4096, optimizer="Adam", betas=(1.5, 0.999))
    with pytest.raises(BadInputError, match="rule: unknown rule 'cubic'"):
        lr_for_batch(1e-3, ref_batch=32, batch=64, rule="cubic")  # type: ignore[arg-type]
