"""batchpilot.integrations.lightning.tune / apply: a LightningModule tuned as it is, then fitted."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from batchpilot.errors import BadInputError, BatchpilotError
from batchpilot.state import capture_rng
from two_ranks import run_two_ranks

pl = pytest.importorskip("lightning.pytorch")

from batchpilot.integrations.lightning import apply, module_task, tune  # noqa: E402

FAST = {"time_budget_seconds": 3.0, "max_batch": 256, "seed": 0}


def _data(n: int = 384) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=generator)
    return TensorDataset(x, x @ torch.ones(4, 1) + 0.5 * torch.randn(n, 1, generator=generator))


class Regression(pl.LightningModule):  # type: ignore[misc]
    """Two param groups (the head at 0.1× the lr), a buffer counting the samples it trained on,
    dropout (the RNG), a batch_size and an lr hparam."""

    def __init__(self, batch_size: int = 16, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Dropout(0.1)
        )
        self.register_buffer("seen", torch.zeros(()))
        self.head = torch.nn.Linear(16, 1)
        self.data = _data()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen += len(batch[0])
        loss = torch.nn.functional.mse_loss(self.head(self.body(batch[0])), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(
            [
                {"params": self.body.parameters()},
                {"params": self.head.parameters(), "lr": self.hparams.lr * 0.1},
            ],
            lr=self.hparams.lr,
            momentum=0.9,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 5),
        }

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.data, batch_size=self.hparams.batch_size, shuffle=True)


def _trainer(**kwargs: Any) -> Any:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_task_is_the_module_its_param_groups_and_its_loader() -> None:
    module = Regression()
    task = module_task(module)
    assert task.train_size == 384 and task.reference_batch == 16 and task.val_data is None
    model = task.make_model()
    assert model is not module and model._trainer is None
    # The copies share the dataset the module holds rather than duplicate it.
    assert task.train_data is module.data and model.data is module.data
    assert _same(_state(model), _state(module))
    optimizer = task.make_optimizer(model.parameters(), 0.3)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.3, 0.03])
    assert optimizer.param_groups[1]["momentum"] == 0.9
    model.eval()  # no dropout: the same loss twice
    batch = next(iter(task.loader(8, shuffle=False)))
    expected = torch.nn.functional.mse_loss(model.head(model.body(batch[0])), batch[1])
    assert task.compute_loss(model, batch).item() == pytest.approx(expected.item())


def test_tune_leaves_the_module_bitwise_and_apply_sets_batch_accumulation_and_lr() -> None:
    module = Regression()
    before, rng = _state(module), capture_rng()
    result = tune(module, trainer_kwargs={"accelerator": "cpu"}, **FAST)
    rec = result.recommendation
    assert _same(_state(module), before) and module.training
    assert module.seen.item() == 0  # only copies trained
    assert torch.equal(torch.get_rng_state(), rng.torch_cpu)
    assert module.hparams.batch_size == 16  # nothing applied yet
    assert rec.micro_batch * rec.accumulation_steps == rec.global_batch
    assert 1 <= rec.micro_batch <= 256 and rec.lr > 0
    assert result.options.device == "cpu" and result.options.time_budget_seconds == 3.0

    trainer = _trainer(max_epochs=1)
    apply(result, trainer, module)
    trainer.fit(module)
    assert module.hparams.batch_size == rec.micro_batch
    assert trainer.train_dataloader.batch_size == rec.micro_batch
    assert trainer.accumulate_grad_batches == rec.accumulation_steps
    batches = -(-384 // rec.micro_batch)
    assert trainer.global_step == -(-batches // rec.accumulation_steps)
    lrs = [g["lr"] for g in trainer.optimizers[0].param_groups]
    assert lrs == pytest.approx([rec.lr, 0.1 * rec.lr])


def test_apply_sets_the_numbers_it_is_given_on_a_fitted_run() -> None:
    # Hand-set numbers: 384 samples in micro-batches of 8 = 48 batches, 3 per step = 16 steps.
    fake = SimpleNamespace(
        recommendation=SimpleNamespace(micro_batch=8, accumulation_steps=3, lr=0.02)
    )
    module = Regression(lr=0.5)
    trainer = _trainer(max_epochs=1)
    apply(fake, trainer, module)  # type: ignore[arg-type]
    trainer.fit(module)
    assert trainer.global_step == 16
    assert module.hparams.lr == 0.02
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == pytest.approx([0.02, 0.002])
    # A module already attached to a Trainer is copied without it, and left as it was.
    before = _state(module)
    task = module_task(module)
    assert task.make_model()._trainer is None and module._trainer is trainer
    assert _same(_state(module), before)


class _Boom(Regression):
    calls = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        type(self).calls += 1
        if type(self).calls > 40:  # in the middle of the measurements
            raise RuntimeError("disk full")
        return super().training_step(batch, batch_idx)


def test_a_failure_in_the_users_code_leaves_the_module_as_it_was() -> None:
    module = _Boom()
    module.seen.fill_(7.0)
    before = _state(module)
    # tune may wrap the error in the phase it failed in: any batchpilot error naming it.
    with pytest.raises(BatchpilotError, match="disk full"):
        tune(module, **FAST, device="cpu")
    assert _Boom.calls > 40
    assert _same(_state(module), before)


def test_a_datamodule_gives_the_loaders_and_unsupported_settings_are_refused() -> None:
    class Data(pl.LightningDataModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = 32
            self.stage: str | None = None

        def setup(self, stage: str) -> None:
            self.stage = stage
            self.train, self.val = _data(300), _data(60)

        def train_dataloader(self) -> DataLoader[Any]:
            return DataLoader(self.train, batch_size=self.batch_size)

        def val_dataloader(self) -> DataLoader[Any]:
            return DataLoader(self.val, batch_size=self.batch_size)

    data = Data()
    task = module_task(Regression(), data)
    assert data.stage == "fit" and (task.train_size, task.val_size, task.reference_batch) == (
        300,
        60,
        32,
    )
    fake = SimpleNamespace(
        recommendation=SimpleNamespace(micro_batch=24, accumulation_steps=2, lr=0.01)
    )
    module = Regression()
    trainer = _trainer(max_steps=1)
    apply(fake, trainer, module, data)  # type: ignore[arg-type]
    assert (data.batch_size, module.hparams.batch_size, trainer.accumulate_grad_batches) == (
        24,
        24,
        2,
    )
    with pytest.raises(BadInputError, match=r"precision'\]: batchpilot measures 32-true, bf16"):
        tune(Regression(), trainer_kwargs={"precision": "16-true"})
    with pytest.raises(BadInputError, match="unknown option"):
        tune(Regression(), time_budget=3)


def test_the_trainers_precision_is_measured_and_apply_warns_about_another() -> None:
    seen: list[Any] = []

    class Mixed(Regression):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            on = torch.is_autocast_enabled("cpu")
            seen.append(torch.get_autocast_dtype("cpu") if on else torch.float32)
            return super().training_step(batch, batch_idx)

    kwargs = {"accelerator": "cpu", "precision": "16-mixed"}
    result = tune(Mixed(), trainer_kwargs=kwargs, **FAST)
    # Lightning's Trainer runs 16-mixed as bf16-mixed on a CPU, and so does every measurement
    assert result.options.precision == result.task.precision == "bf16-mixed"
    assert seen and set(seen) == {torch.bfloat16}
    with pytest.warns(UserWarning, match="measured in 'bf16-mixed'"):
        apply(result, _trainer(max_steps=1), Mixed())  # a 32-true Trainer
    module = Mixed()
    trainer = _trainer(max_steps=2, precision="bf16-mixed")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="trainer.precision")
        apply(result, trainer, module)
    seen.clear()
    trainer.fit(module)
    assert set(seen) == {torch.bfloat16}  # the run applied is the one measured


# Each process of `torchrun --nproc_per_node=2` runs this: it tunes (rank 1 with another cap, so
# its own recommendation differs from rank 0's), applies and fits a 2-process DDP run (gloo).
DDP_SCRIPT = """
import json, os, sys
import torch
import lightning.pytorch as pl
from torch.utils.data import DataLoader, TensorDataset
from batchpilot.integrations.lightning import apply, tune

torch.set_num_threads(1)
rank = int(os.environ["RANK"])
generator = torch.Generator().manual_seed(0)
x = torch.randn(600, 4, generator=generator)
data = TensorDataset(x, x @ torch.ones(4, 1) + 0.5 * torch.randn(600, 1, generator=generator))
sizes = []


class Regression(pl.LightningModule):
    def __init__(self, batch_size=16, lr=0.05):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        if self._trainer is not None:  # the DDP run, not the measurements
            sizes.append(len(batch[0]))
        return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(data, batch_size=self.hparams.batch_size, shuffle=True)


kwargs = dict(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False)
module = Regression()
cap = 64 if rank == 0 else 4
result = tune(module, trainer_kwargs=kwargs, time_budget_seconds=3, max_batch=cap, seed=0)
rec = result.recommendation
trainer = pl.Trainer(**kwargs, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False)
apply(result, trainer, module)
trainer.fit(module)
params = torch.cat([p.detach().flatten() for p in module.parameters()])
json.dump({
    "own": [rec.micro_batch, rec.accumulation_steps, rec.lr, rec.world_size, rec.global_batch],
    "options_world_size": result.options.world_size,
    "reference_batch": rec.reference_batch,
    "trained": [trainer.train_dataloader.batch_size, trainer.accumulate_grad_batches,
                trainer.optimizers[0].param_groups[0]["lr"], trainer.world_size],
    "replicas": trainer.train_dataloader.sampler.num_replicas,
    "steps": trainer.global_step,
    "sizes": sizes,
    "params": params.tolist(),
}, open(sys.argv[1] + f"/rank{rank}.json", "w"))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_recommendation_trains_as_given_in_a_two_process_ddp_run(tmp_path: Path) -> None:
    zero, one = run_two_ranks(DDP_SCRIPT, tmp_path)
    micro, accumulation, lr, world, global_batch = zero["own"]
    # Tuned for the Trainer's 2 processes: global batch = per-device micro-batch × accumulation × 2,
    # and the reference batch is the loader's 16 per process × 2.
    assert zero["options_world_size"] == world == 2 and global_batch == micro * accumulation * 2
    assert zero["reference_batch"] <= 32
    assert one["own"][0] <= 4  # rank 1 measured under another cap ...
    for rank in (zero, one):  # ... and both trained with rank 0's numbers
        assert rank["trained"][:2] == [micro, accumulation] and rank["trained"][3] == 2
        assert rank["trained"][2] == pytest.approx(lr) and rank["replicas"] == 2
        # each process loads its half of the 600 samples in micro-batches, `accumulation` a step
        batches = -(-300 // micro)
        assert rank["steps"] == -(-batches // accumulation)
        assert set(rank["sizes"][:-1]) <= {micro} and len(rank["sizes"]) == batches
    assert zero["params"] == one["params"]  # DDP kept the ranks in step
