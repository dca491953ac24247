"""Lightning and transformers runs with the callbacks, and a 2-process DDP loop (gloo).

Lightning and transformers are imported inside the tests: the DDP workers re-import this module.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from batchpilot.training._schedules import BatchIncrease, BatchLimits, StepDecay, periodic_batch


def regression(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    y = x @ torch.ones(4, 1) + 0.5 * torch.randn(n, 1, generator=generator)
    return x, y


def small_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def test_frameworks_are_imported_lazily_and_missing_ones_say_what_to_install() -> None:
    code = (
        "import sys\n"
        "import batchpilot, batchpilot.integrations, batchpilot.training._runtime, batchpilot.training._adaptive\n"
        "assert 'lightning' not in sys.modules and 'transformers' not in sys.modules\n"
        "sys.modules['lightning'] = sys.modules['transformers'] = None  # as if not installed\n"
        "from batchpilot.integrations import lightning, huggingface\n"
        "for make in (lightning.BatchpilotCallback, huggingface.BatchpilotTrainerCallback):\n"
        "    try:\n"
        "        make()\n"
        "    except ImportError as exc:\n"
        "        print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == [
        "batchpilot.integrations.lightning needs lightning, which is not installed: "
        "pip install 'batchpilot[lightning]' (or pip install lightning)",
        "batchpilot.integrations.huggingface needs transformers, which is not installed: "
        "pip install 'batchpilot[transformers]' (or pip install transformers)",
    ]


# ------------------------------------------------------------------------- Lightning


def lightning_run(callback: Any, data: Any, sampler: Any, epochs: int) -> Any:
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = small_mlp()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        use_distributed_sampler=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(), DataLoader(data, batch_sampler=sampler))
    return trainer


def test_lightning_callback_tunes_applies_the_schedule_and_logs_the_noise_scale() -> None:
    pytest.importorskip("lightning.pytorch")
    from torch.utils.data import TensorDataset

    from batchpilot.integrations.lightning import BatchpilotCallback
    from batchpilot.training._sampler import ScheduledBatchSampler

    data = TensorDataset(*regression(128))
    sampler = ScheduledBatchSampler(data, batch_size=16, seed=0, sized=False)
    schedule = periodic_batch(
        base_batch=16,
        base_lr=0.05,
        every_epochs=1,
        limits=BatchLimits(max_batch=32, dataset_size=128),
    )
    tuned: list[int] = []

    def tuner(trainer: Any, module: Any) -> int:
        tuned.append(1)
        return 8  # "the largest micro-batch that fits"

    callback = BatchpilotCallback(schedule=schedule, tuner=tuner, max_overhead=None)
    trainer = lightning_run(callback, data, sampler, epochs=3)
    assert tuned == [1] and callback.max_micro_batch == 8
    # Epoch 0: 16 = 8 × 2 (8 steps); epoch 1: 32 = 8 × 4 (4 steps); epoch 2: capped at 32, lr halved.
    assert trainer.global_step == 8 + 4 + 4
    assert trainer.accumulate_grad_batches == 4
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.025)
    logged = trainer.callback_metrics
    assert math.isfinite(float(logged["batchpilot/noise_scale"]))
    assert float(logged["batchpilot/batch"]) == 32
    assert len(callback.history) == 16 and all(
        row["noise_scale"] > 0 for row in callback.history[2:]
    )
    assert callback.state_dict()["noise"]["steps"]  # the estimate is saved with checkpoints


def test_lightning_callback_with_adaptive_batch_grows_at_epoch_starts() -> None:
    pytest.importorskip("lightning.pytorch")
    from torch.utils.data import TensorDataset

    from batchpilot.integrations.lightning import BatchpilotCallback
    from batchpilot.training._adaptive import AdaptiveBatch
    from batchpilot.training._sampler import ScheduledBatchSampler

    x, _ = regression(256)
    noisy = x @ torch.ones(4, 1) + 10.0 * torch.randn(
        256, 1, generator=torch.Generator().manual_seed(1)
    )
    data = TensorDataset(x, noisy)  # label noise: a large noise scale from the start
    sampler = ScheduledBatchSampler(data, batch_size=16, seed=0, sized=False)
    adaptive = AdaptiveBatch(
        base_batch=16,
        base_lr=0.05,
        limits=BatchLimits(max_batch=64, dataset_size=256),
        check_every=4,
        min_steps=4,
    )
    callback = BatchpilotCallback(adaptive=adaptive, max_micro_batch=8, max_overhead=None)
    trainer = lightning_run(callback, data, sampler, epochs=3)
    assert adaptive.steps == trainer.global_step
    assert adaptive.batch > 16 and adaptive.progress > adaptive.steps  # grew; gain above 1
    in_use = callback.setting
    assert in_use is not None and in_use.micro_batch == 8
    assert trainer.accumulate_grad_batches == in_use.accumulation_steps
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(adaptive.lr_for(in_use.batch)) and lr > 0.05


# ----------------------------------------------------------------------- transformers


def lr_reporter() -> Any:
    """A Trainer callback placed ahead of batchpilot's, like TensorBoard's and W&B's: it records
    the ``learning_rate`` of every loss log it is given (``.learning_rates``)."""
    transformers = pytest.importorskip("transformers")

    class Reporter(transformers.TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.learning_rates: list[float] = []

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self.learning_rates.append(logs["learning_rate"])

    return Reporter()


def tiny_bert() -> Any:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)  # from a config: no download


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": int(ids[0] % 2)}


def hf_train(
    callback: Any,
    out: Path,
    steps: int,
    before: tuple[Any, ...] = (),
    after: tuple[Any, ...] = (),
    **arguments: Any,
) -> Any:
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(
        output_dir=str(out),
        **{
            "max_steps": steps,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 4,
            "learning_rate": 5e-4,
            "lr_scheduler_type": "constant",
            "logging_steps": 2,
            "report_to": [],
            "use_cpu": True,
            "save_strategy": "no",
            "disable_tqdm": True,
            **arguments,
        },
    )
    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=args,
        train_dataset=Tokens(),
        eval_dataset=Tokens() if args.eval_strategy != "no" else None,
        callbacks=[*before, callback, *after],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer


def test_huggingface_callback_logs_the_noise_scale_and_applies_the_schedule_lr(
    tmp_path: Path,
) -> None:
    pytest.importorskip("transformers")
    from batchpilot.integrations.huggingface import BatchpilotTrainerCallback

    schedule = BatchIncrease(
        StepDecay(every_epochs=1, gamma=0.5),
        base_batch=16,
        base_lr=5e-4,
        limits=BatchLimits(dataset_size=64, max_batch=16),  # the Trainer's batch: lr takes it all
    )
    reporter = lr_reporter()
    callback = BatchpilotTrainerCallback(schedule=schedule, max_overhead=None)
    trainer = hf_train(callback, tmp_path, steps=8, before=(reporter,))
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert trainer.state.global_step == 8 and len(logs) == 4
    assert all(math.isfinite(row["noise_scale"]) and row["noise_scale"] > 0 for row in logs)
    assert all(row["recommended_batch"] >= 16 for row in logs)
    # Epoch 0 at the base lr; from epoch 1 the schedule's ×2 batch is realised as lr × 0.5.
    assert [row["batchpilot_lr_factor"] for row in logs] == [1.0, 1.0, 0.5, 0.5]
    assert logs[-1]["batchpilot_lr"] == pytest.approx(2.5e-4)
    # The Trainer logs the lr applied, and a reporter ahead of the callback writes that too.
    assert [row["learning_rate"] for row in logs] == pytest.approx([5e-4, 5e-4, 2.5e-4, 2.5e-4])
    assert reporter.learning_rates == pytest.approx([5e-4, 5e-4, 2.5e-4, 2.5e-4])
    # The scheduler itself is intact, and reads as its own once training is over.
    assert trainer.lr_scheduler.get_last_lr() == pytest.approx([5e-4, 5e-4])
    assert "get_last_lr" not in vars(trainer.lr_scheduler)
    assert callback.noise is not None and callback.noise.steps == 8


def test_huggingface_callback_logs_the_lr_applied_under_reduce_lr_on_plateau(
    tmp_path: Path,
) -> None:
    transformers = pytest.importorskip("transformers")
    from batchpilot.integrations.huggingface import BatchpilotTrainerCallback

    schedule = BatchIncrease(
        StepDecay(every_epochs=1, gamma=0.5),
        base_batch=16,
        base_lr=5e-4,
        limits=BatchLimits(dataset_size=64, max_batch=16),  # from epoch 1 (step 5): lr × 0.5
    )

    class Applied(transformers.TrainerCallback):  # type: ignore[misc]
        """After the callback: the lr each optimizer step runs with, and what the scheduler saw."""

        def __init__(self) -> None:
            self.lrs: dict[int, float] = {}
            self.at_evaluation: list[float] = []

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.lrs[state.global_step + 1] = kw["optimizer"].param_groups[0]["lr"]

        def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.at_evaluation.append(kw["optimizer"].param_groups[0]["lr"])

    reporter, applied = lr_reporter(), Applied()
    callback = BatchpilotTrainerCallback(schedule=schedule, track_noise=False)
    trainer = hf_train(
        callback,
        tmp_path,
        steps=8,
        before=(reporter,),
        after=(applied,),
        lr_scheduler_type="reduce_lr_on_plateau",
        # never an improvement (a loss below best × 0): the lr halves at every evaluation
        lr_scheduler_kwargs={"factor": 0.5, "patience": 0, "threshold": 1.0},
        eval_strategy="steps",
        eval_steps=2,
    )
    assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["step"] for row in logs] == [2, 4, 6, 8]
    # The plateau halves the scheduler's lr after the evaluations at steps 2, 4 and 6; the
    # schedule halves what is applied from step 5: 5e-4, 2.5e-4, 1.25e-4 × 0.5, 6.25e-5 × 0.5.
    expected = [5e-4, 2.5e-4, 6.25e-5, 3.125e-5]
    assert [applied.lrs[step] for step in (2, 4, 6, 8)] == pytest.approx(expected)
    assert [row["learning_rate"] for row in logs] == pytest.approx(expected)
    assert reporter.learning_rates == pytest.approx(expected)
    assert [row["batchpilot_lr"] for row in logs] == pytest.approx(expected)
    assert [row["batchpilot_lr_factor"] for row in logs] == [1.0, 1.0, 0.5, 0.5]
    # The scheduler stepped on its own lr (the factor taken off before each evaluation), and the
    # optimizer holds that lr again once training is over: 5e-4 halved at 4 evaluations.
    assert applied.at_evaluation == pytest.approx([5e-4, 2.5e-4, 1.25e-4, 6.25e-5])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(3.125e-5)


def test_huggingface_callback_applies_the_adascale_gain_of_the_trainers_batch(
    tmp_path: Path,
) -> None:
    pytest.importorskip("transformers")
    from batchpilot.integrations.huggingface import BatchpilotTrainerCallback
    from batchpilot.training._adaptive import AdaptiveBatch, adascale_gain, lr_gain

    adaptive = AdaptiveBatch(base_batch=4, base_lr=5e-4, family="adam")
    callback = BatchpilotTrainerCallback(adaptive=adaptive, every_n_steps=1, max_overhead=None)
    hf_train(callback, tmp_path, steps=4)
    # The Trainer's batch is 16 = 4 × 4, four times the controller's base: the Adam lr factor is
    # √r with r = AdaScale's gain, 1 < r < 4 for a finite positive noise scale.
    assert 1.0 < callback.lr_factor < 2.0
    noise_scale = callback.noise_scale
    assert lr_gain(adascale_gain(16, base_batch=4, noise_scale=noise_scale), family="adam") < 2.0
    assert callback.history[-1]["batchpilot_lr_factor"] > 1.0


# ------------------------------------------------------------------------------ DDP

N_SAMPLES = 43  # not a multiple of the batch: the epoch's last step has unequal rank parts
EPOCHS = 3


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from batchpilot.measure._noise import GradientNoiseScale
        from batchpilot.training._pitfalls import check_distributed_run
        from batchpilot.training._runtime import BatchRuntime, gather_objects
        from batchpilot.training._sampler import ScheduledBatchSampler

        x, y = regression(N_SAMPLES)
        model = small_mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        schedule = periodic_batch(
            base_batch=8,
            base_lr=0.05,
            every_epochs=1,
            limits=BatchLimits(world_size=world, max_batch=16, dataset_size=N_SAMPLES),
        )
        sampler = ScheduledBatchSampler(N_SAMPLES, batch_size=schedule, seed=7)
        noise = GradientNoiseScale(model, distributed=True)
        runtime = BatchRuntime(
            optimizer, base_lr=0.05, model=model, all_reduce=noise.all_reduce_gradients
        )
        pitfalls = [p.code for p in check_distributed_run(model, sampler, micro_batch=4)]
        # Rank 1 "runs out of memory" above 3 samples per pass; rank 0 never does.
        fail_above = 3 if rank == 1 else None
        steps: list[list[int]] = []
        lrs: list[float] = []
        for _ in range(EPOCHS):
            for indices in sampler:
                runtime.apply(schedule.at(sampler.batch_start_epoch))
                optimizer.zero_grad()

                def backward(micro: tuple[torch.Tensor, torch.Tensor], weight: float) -> float:
                    if fail_above is not None and len(micro[0]) > fail_above:
                        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
                    loss = torch.nn.functional.mse_loss(model(micro[0]), micro[1])
                    (loss * weight).backward()
                    return float(loss.detach())

                report = runtime.run_step((x[indices], y[indices]), backward)
                noise.finish_step(batch_size=report.samples)
                optimizer.step()
                steps.append(sorted(i for part in gather_objects(indices) for i in part))
                lrs.append(optimizer.param_groups[0]["lr"])
        torch.save(
            {
                "params": [p.detach().clone() for p in model.parameters()],
                "steps": steps,
                "lrs": lrs,
                "oom": [e.to_dict() for e in runtime.oom_events],
                "max_micro_batch": runtime.max_micro_batch,
                "noise": noise.estimate().to_dict(),
                "pitfalls": pitfalls,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        dist.barrier()  # both ranks done before either tears gloo down (else it may abort)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_agree_step_down_together_and_match_one_process(tmp_path: Path) -> None:
    world = 2
    mp.start_processes(
        _ddp_worker,
        args=(world, str(tmp_path / "init"), str(tmp_path)),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    first, second = ranks
    for a, b in zip(first["params"], second["params"], strict=True):
        assert torch.equal(a, b)
    for key in ("steps", "lrs", "oom", "max_micro_batch", "noise", "pitfalls"):
        assert first[key] == second[key], key
    # Rank 1's failure at 4 samples per pass made both ranks step down to 2, once.
    assert first["oom"] == [
        {"step": 0, "failed_micro_batch": 4, "max_micro_batch": 2, "ranks": [1]}
    ]
    assert first["max_micro_batch"] == 2
    # Every epoch covers the data once; batches 8 then 16 (capped, lr halved).
    assert sum(len(step) for step in first["steps"]) == EPOCHS * N_SAMPLES
    assert first["lrs"][0] == 0.05 and first["lrs"][-1] == pytest.approx(0.025)
    assert math.isfinite(first["noise"]["noise_scale"])
    assert "seeds_differ" not in first["pitfalls"] and "ranks_overlap" not in first["pitfalls"]
    # One process on the same global batches reaches the same parameters.
    x, y = regression(N_SAMPLES)
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for indices, lr in zip(first["steps"], first["lrs"], strict=True):
        optimizer.param_groups[0]["lr"] = lr
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x[indices]), y[indices]).backward()
        optimizer.step()
    for a, b in zip(model.parameters(), first["params"], strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-6)
