from __future__ import annotations

import json
import math

import pytest
import torch

from batchpilot.errors import BadInputError
from batchpilot.measure._noise import GradientNoiseScale
from batchpilot.training._adaptive import (
    AdaptiveBatch,
    adascale_gain,
    lr_gain,
    optimizer_family,
    recommend_batch,
)
from batchpilot.training._runtime import BatchRuntime
from batchpilot.training._schedules import BatchLimits, StepDecay


@pytest.mark.parametrize(("g2", "trace"), [(1.0, 50.0), (0.3, 900.0), (2.0, 1.0)])
@pytest.mark.parametrize("batch", [32, 64, 256, 1000])
def test_gain_is_adascale_formula(g2: float, trace: float, batch: int) -> None:
    base = 32
    sigma2, mu2, s = trace / base, g2, batch / base
    expected = (sigma2 + mu2) / (sigma2 / s + mu2)
    assert adascale_gain(batch, base_batch=base, noise_scale=trace / g2) == pytest.approx(expected)
    assert 1.0 <= expected <= s


def test_gain_limits() -> None:
    assert adascale_gain(128, base_batch=32, noise_scale=math.inf) == 4.0  # all noise: linear
    assert adascale_gain(128, base_batch=32, noise_scale=1e-9) == pytest.approx(1.0)  # no noise
    assert adascale_gain(128, base_batch=32, noise_scale=math.nan) == 1.0  # no estimate yet
    assert adascale_gain(128, base_batch=32, noise_scale=-5.0) == 1.0  # negative unbiased estimate


def test_lr_gain_is_sqrt_for_adam_family() -> None:
    assert lr_gain(9.0, family="sgd") == 9.0
    assert lr_gain(9.0, family="adam") == 3.0
    params = [torch.nn.Parameter(torch.zeros(1))]
    assert optimizer_family(torch.optim.SGD(params, lr=0.1)) == "sgd"
    assert optimizer_family(torch.optim.Adam(params)) == "adam"
    assert optimizer_family(torch.optim.RMSprop(params)) == "adam"


def drive(adaptive: AdaptiveBatch, noise_scale: float, steps: int) -> list[int]:
    batches = []
    for _ in range(steps):
        adaptive.update(noise_scale)
        batches.append(adaptive.batch)
    return batches


def test_grows_to_the_critical_batch_and_counts_gain_weighted_progress() -> None:
    adaptive = AdaptiveBatch(base_batch=16, base_lr=0.1, check_every=5, min_steps=5)
    batches = drive(adaptive, 200.0, 40)
    # 16 → 32 → 64 → 128, never 256 (> the noise scale of 200).
    assert sorted(set(batches)) == [16, 32, 64, 128]
    assert batches[4] == 32 and batches[9] == 64 and batches[14] == 128 and batches[-1] == 128
    gains = [adascale_gain(b, base_batch=16, noise_scale=200.0) for b in [16, *batches[:-1]]]
    assert adaptive.progress == pytest.approx(sum(gains))
    assert adaptive.setting.lr == pytest.approx(
        0.1 * adascale_gain(128, base_batch=16, noise_scale=200.0)
    )
    adam = AdaptiveBatch(base_batch=16, base_lr=1e-3, family="adam", check_every=5, min_steps=5)
    drive(adam, 200.0, 40)
    assert adam.setting.lr == pytest.approx(1e-3 * math.sqrt(adam.gain))


def test_with_a_throughput_curve_grows_only_while_goodput_improves() -> None:
    limits = BatchLimits(max_micro_batch=256)
    flat = [(16, 1000.0), (256, 1000.0)]  # samples/s do not grow with the batch: never worth it
    adaptive = AdaptiveBatch(
        base_batch=16, base_lr=0.1, limits=limits, throughput=flat, check_every=1, min_steps=1
    )
    assert set(drive(adaptive, 1e6, 10)) == {16}
    linear = [(16, 1000.0), (256, 16000.0)]  # perfect scaling: goodput grows with the batch
    adaptive = AdaptiveBatch(
        base_batch=16, base_lr=0.1, limits=limits, throughput=linear, check_every=1, min_steps=1
    )
    assert drive(adaptive, 50.0, 10)[-1] == 256  # past the noise scale: throughput pays


def test_decay_is_evaluated_at_gain_weighted_epochs() -> None:
    limits = BatchLimits(dataset_size=160)
    adaptive = AdaptiveBatch(
        base_batch=16,
        base_lr=0.1,
        limits=limits,
        check_every=2,
        min_steps=2,
        decay=StepDecay(every_epochs=1, gamma=0.1),
    )
    while adaptive.progress_epochs < 1.0:
        adaptive.update(math.inf)
    # One base epoch is 10 base steps; at batch 32 (gain 2) it took fewer optimizer steps.
    assert adaptive.steps < 10
    assert adaptive.setting.lr == pytest.approx(0.1 * 0.1 * adaptive.gain)
    assert adaptive.done(total_epochs=1.0) and not adaptive.done(total_epochs=2.0)


def test_state_dict_resumes_the_same_trajectory() -> None:
    values = [math.nan] * 3 + [40.0 + 10 * i for i in range(30)]
    whole = AdaptiveBatch(base_batch=8, base_lr=0.1, check_every=3, min_steps=3)
    for v in values:
        whole.update(v)
    first = AdaptiveBatch(base_batch=8, base_lr=0.1, check_every=3, min_steps=3)
    for v in values[:12]:
        first.update(v)
    resumed = AdaptiveBatch(base_batch=8, base_lr=0.1, check_every=3, min_steps=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for v in values[12:]:
        resumed.update(v)
    # Compared as JSON text: the first steps' noise scale is nan, and nan != nan.
    assert json.dumps(resumed.state_dict()) == json.dumps(whole.state_dict())
    other = AdaptiveBatch(base_batch=8, base_lr=0.2)
    with pytest.raises(BadInputError, match=r"^state: it was saved with a different configuration"):
        other.load_state_dict(whole.state_dict())


def test_recommend_batch() -> None:
    assert recommend_batch(300.0, base_batch=32) == 256
    assert recommend_batch(10.0, base_batch=32) == 32
    assert recommend_batch(math.nan, base_batch=32) == 32
    curve = [(32, 1000.0), (128, 3000.0), (512, 3200.0)]
    assert recommend_batch(1e5, base_batch=32, throughput=curve) == 512


def test_adaptive_training_with_the_real_estimator_grows_on_a_noisy_problem() -> None:
    # Linear regression with a lot of label noise: the noise scale is large from the start.
    torch.manual_seed(0)
    x = torch.randn(4096, 8)
    y = x @ torch.ones(8, 1) + 3.0 * torch.randn(4096, 1)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    limits = BatchLimits(max_micro_batch=64, dataset_size=4096)
    adaptive = AdaptiveBatch(
        base_batch=16, base_lr=0.01, limits=limits, check_every=5, min_steps=10
    )
    noise = GradientNoiseScale(model, dataset_size=4096, max_overhead=None)
    runtime = BatchRuntime(optimizer, base_lr=0.01, max_micro_batch=8)  # force ≥ 2 micro-batches
    generator = torch.Generator().manual_seed(1)
    setting = adaptive.setting
    for _ in range(60):
        runtime.apply(setting)
        index = torch.randint(0, 4096, (setting.batch,), generator=generator)
        optimizer.zero_grad()

        def backward(micro: tuple[torch.Tensor, torch.Tensor], weight: float) -> float:
            loss = torch.nn.functional.mse_loss(model(micro[0]), micro[1])
            (loss * weight).backward()
            noise.record_micro_batch(len(micro[0]))
            return float(loss.detach())

        runtime.run_step((x[index], y[index]), backward)
        noise.finish_step()
        optimizer.step()
        setting = adaptive.update(noise.estimate())
    assert adaptive.batch > 16
    assert optimizer.param_groups[0]["lr"] > 0.01  # lr rose with the gain
    assert adaptive.progress > adaptive.steps


def test_a_loop_that_applies_growth_later_counts_the_batch_it_used() -> None:
    adaptive = AdaptiveBatch(base_batch=16, base_lr=0.1, check_every=1, min_steps=1)
    adaptive.update(200.0)
    assert adaptive.batch == 32  # decided; say the loop applies it at the next epoch
    before = adaptive.progress
    adaptive.update(200.0, batch_used=16)
    assert adaptive.progress - before == 1.0  # a step at the base batch is one base step
    assert adaptive.lr_for(16) == pytest.approx(0.1)
    assert adaptive.lr_for(64) == pytest.approx(
        0.1 * adascale_gain(64, base_batch=16, noise_scale=200.0)
    )
