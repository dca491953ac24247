"""``tune(module, datamodule)``: a recommendation for a LightningModule as it is, and ``apply`` it.

The task is built from the module itself: every measurement trains a deep copy of the module as it
was when ``tune`` was called (detached from any Trainer), its ``training_step`` is the loss, the
first optimizer of its ``configure_optimizers`` (param groups and all, its lr overridden) is the
optimizer, and the data are those of the datamodule's (or module's) ``train_dataloader`` and
``val_dataloader``. The module itself never runs: it is left bitwise as it was, on failure too.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields as dataclass_fields
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from batchpilot.checks import Precision
from batchpilot.errors import BadInputError, UserCodeError
from batchpilot.integrations import missing_extra
from batchpilot.integrations._copies import owner_of
from batchpilot.state import preserved
from batchpilot.task import Task
from batchpilot.training._runtime import apply_lr
from batchpilot.tune import TuneOptions, TuneResult
from batchpilot.tune import tune as tune_task

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
else:
    try:
        import lightning.pytorch as pl
        from lightning.pytorch.callbacks import Callback
    except ImportError:  # pragma: no cover - lightning.py reports the missing package
        pl = None
        Callback = object

_OPTION_NAMES = {f.name for f in dataclass_fields(TuneOptions)}
# Lightning's own keys for a LightningModule's lr (its lr_find looks for the same two).
_LR_ATTRIBUTES = ("lr", "learning_rate")


def tune(
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule | None = None,
    *,
    trainer_kwargs: Mapping[str, Any] | None = None,
    **tune_options: Any,
) -> TuneResult:
    """Measure ``module`` and recommend micro-batch, accumulation, lr and warm-up for it.

    Args:
        module: the LightningModule, with automatic optimization; it is copied, never trained.
        datamodule: where the loaders come from (else the module's own ``train_dataloader`` /
            ``val_dataloader``); its ``prepare_data`` and ``setup("fit")`` are called first, as
            the Trainer would.
        trainer_kwargs: the arguments you give ``lightning.Trainer``; ``accelerator`` picks the
            device measured on, ``devices × num_nodes`` the world size and ``precision``
            (``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"`` or an alias) the precision every
            measurement runs in (``"16-mixed"`` on a CPU is ``"bf16-mixed"``, as the Trainer
            runs it), unless ``device`` / ``world_size`` / ``precision`` are given as
            tune options.
        tune_options: any :class:`~batchpilot.tune.TuneOptions` field (``time_budget_seconds``,
            ``max_batch``, ``lr``, ...).

    Apply the result with :func:`apply`.
    """
    _require_lightning()
    unknown = sorted(set(tune_options) - _OPTION_NAMES)
    if unknown:
        raise BadInputError(
            f"tune_options: unknown option(s) {', '.join(unknown)}; expected TuneOptions fields"
        )
    if not isinstance(module, pl.LightningModule):
        raise BadInputError(f"module: expected a LightningModule, got {type(module).__name__}")
    if not module.automatic_optimization:
        raise BadInputError(
            "module: automatic_optimization is False; batchpilot needs training_step to return "
            "the loss (manual optimization steps the optimizer itself)"
        )
    kwargs = trainer_kwargs or {}
    options = TuneOptions(**{**_from_trainer_kwargs(kwargs), **tune_options})
    accumulation = kwargs.get("accumulate_grad_batches", 1)
    if not isinstance(accumulation, int) or isinstance(accumulation, bool) or accumulation < 1:
        raise BadInputError(
            "trainer_kwargs['accumulate_grad_batches']: expected a positive integer, got "
            f"{accumulation!r}"
        )
    with preserved(module):
        task = module_task(
            module, datamodule, world_size=options.world_size, accumulation=accumulation
        )
        return tune_task(task, options)


def module_task(
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule | None = None,
    *,
    world_size: int = 1,
    accumulation: int = 1,
) -> Task:
    """The :class:`~batchpilot.Task` that :func:`tune` measures for ``module``.

    Its reference batch is the global batch you train with now: the loader's batch size ×
    ``accumulation`` (``accumulate_grad_batches``) × ``world_size``, the batch the lr of
    ``configure_optimizers`` was chosen for.
    """
    if datamodule is not None:
        try:
            datamodule.prepare_data()
            datamodule.setup("fit")
        except Exception as exc:
            raise UserCodeError.wrap("datamodule.setup('fit')", exc) from exc
    source: Any = datamodule if datamodule is not None else module
    train_loader = _loader(source, "train_dataloader", required=True)
    val_loader = _loader(source, "val_dataloader", required=False)
    # Copies share the datasets (a module often holds its own) instead of duplicating them.
    shared = {
        id(loader.dataset): loader.dataset
        for loader in (train_loader, val_loader)
        if isinstance(loader, DataLoader)
    }
    initial = _detached_copy(module, shared).cpu()
    built: list[weakref.ref[nn.Module]] = []  # the copies, for the optimizer factory

    def make_model() -> nn.Module:
        model = copy.deepcopy(initial, dict(shared))
        built.append(weakref.ref(model))
        return model

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        with warnings.catch_warnings():
            # self.log() without a Trainer warns and does nothing, which is right here.
            warnings.filterwarnings("ignore", message=".*self.log.*")
            out = model.training_step(batch, 0)  # type: ignore[operator]
        if isinstance(out, Mapping):
            out = out.get("loss")
        if not isinstance(out, torch.Tensor):
            raise BadInputError(
                "module.training_step: expected it to return the loss (a Tensor or a dict with "
                f"'loss'), got {type(out).__name__}"
            )
        return out

    template = _first_optimizer(make_model())

    def make_optimizer(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        params = list(params)
        model = owner_of(built, params)
        if model is not None:
            optimizer = _first_optimizer(model)  # the module's own param groups
            apply_lr(optimizer, lr, base_lr=float(optimizer.param_groups[0]["lr"]))
            return optimizer
        # Parameters of another model (batchpilot reads the optimizer's defaults this way).
        defaults = {**template.defaults, "lr": lr}
        return type(template)(params, **defaults)

    task = Task.from_dataloader(
        make_model,
        train_loader,
        loss,
        make_optimizer,
        val_loader,
        # configure_optimizers' lr is the one the user trains with: the fallback when the range
        # test finds no descent.
        reference_lr=float(template.param_groups[0]["lr"]),
        name=type(module).__name__,
    )
    if task.reference_batch is not None and world_size * accumulation > 1:
        # Under DDP each process loads batch_size samples: the lr is for the global batch.
        task = dataclasses.replace(
            task, reference_batch=task.reference_batch * accumulation * world_size
        )
    return task


def apply(
    result: TuneResult,
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule | None = None,
) -> None:
    """Set the recommendation on a Trainer before ``trainer.fit(module, datamodule)``.

    - micro-batch: the ``batch_size`` attribute (or hparam) of the datamodule and/or module, which
      their ``train_dataloader`` must read, as for Lightning's ``scale_batch_size``;
    - accumulation: ``trainer.accumulate_grad_batches``;
    - lr: the module's ``lr`` / ``learning_rate`` attribute or hparam if it has one, and a callback
      added to ``trainer.callbacks`` that sets it in every param group of the first optimizer at
      fit start (groups keep their ratios), so a hard-coded lr is overridden too.

    The warm-up (``result.recommendation.warmup_steps``) is left to your scheduler. A Trainer
    whose precision is not the one measured gets a warning: the micro-batch may not fit there.

    Under DDP every process runs the script, so each has measured its own result; when the
    processes have started (the callback's ``setup``), rank 0's micro-batch, accumulation and lr
    are broadcast and set on every rank, so all train the same global batch. A Trainer whose
    world size is not the one tuned for gets a warning: the global batch would be another.
    """
    _require_lightning()
    _warn_other_precision(result, trainer)
    rec = result.recommendation
    holders = [h for h in (datamodule, module) if h is not None and _has(h, "batch_size")]
    if not holders:
        raise BadInputError(
            "batch_size: neither the datamodule nor the module has a batch_size attribute or "
            "hparam for its train_dataloader to read; add one (as for Lightning's "
            "scale_batch_size), or build the loader with batch_size="
            f"{rec.micro_batch} yourself"
        )
    setting = _Setting(rec.micro_batch, rec.accumulation_steps, rec.lr)
    setting.set(trainer, module, holders)
    tuned_for = getattr(rec, "world_size", None)
    # A second apply replaces the first one's callback.
    callbacks = [c for c in trainer.callbacks if not isinstance(c, _SetLR)]  # type: ignore[attr-defined]
    trainer.callbacks = [*callbacks, _SetLR(setting, tuned_for)]  # type: ignore[attr-defined]


@dataclasses.dataclass
class _Setting:
    micro_batch: int
    accumulation_steps: int
    lr: float

    def set(self, trainer: pl.Trainer, module: pl.LightningModule, holders: list[Any]) -> None:
        from lightning.pytorch.utilities.parsing import lightning_hasattr, lightning_setattr

        for holder in holders:
            _set(holder, "batch_size", self.micro_batch)
        trainer.accumulate_grad_batches = self.accumulation_steps
        for name in _LR_ATTRIBUTES:
            if lightning_hasattr(module, name):
                lightning_setattr(module, name, self.lr)


class _SetLR(Callback):
    """Under DDP, sets rank 0's setting on every rank once the processes have started (before
    the loaders are built); at fit start, after ``configure_optimizers``, the first optimizer's
    lr."""

    def __init__(self, setting: _Setting, world_size: int | None) -> None:
        super().__init__()
        self.setting = setting
        self.world_size = world_size

    @property
    def lr(self) -> float:
        return self.setting.lr

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.world_size is not None and self.world_size != trainer.world_size:
            warnings.warn(
                f"the recommendation is for world_size {self.world_size} (global batch = "
                f"micro-batch × accumulation × {self.world_size}) but the Trainer runs "
                f"{trainer.world_size} process(es): tune with the Trainer's devices and num_nodes "
                "in trainer_kwargs",
                UserWarning,
                stacklevel=2,
            )
        if trainer.world_size > 1:
            self.setting = trainer.strategy.broadcast(self.setting, src=0)
            # the module and datamodule this process fits (copies of apply's under ddp_spawn)
            found = (trainer.datamodule, pl_module)  # type: ignore[attr-defined]
            holders = [h for h in found if h is not None and _has(h, "batch_size")]
            self.setting.set(trainer, pl_module, holders)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        apply_lr(optimizer, self.setting.lr, base_lr=float(optimizer.param_groups[0]["lr"]))


# --------------------------------------------------------------------------- internals


def _require_lightning() -> None:
    if pl is None:
        raise missing_extra("batchpilot.integrations.lightning", "lightning", "lightning")


def _detached_copy(module: pl.LightningModule, shared: dict[int, Any]) -> pl.LightningModule:
    """A deep copy without the Trainer (or Fabric) the module may be attached to, sharing
    ``shared`` (id → object) instead of copying it."""
    memo: dict[int, Any] = dict(shared)
    for attached in (module._trainer, getattr(module, "_fabric", None)):
        if attached is not None:
            memo[id(attached)] = None
    return copy.deepcopy(module, memo)


def _first_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    try:
        config = model.configure_optimizers()  # type: ignore[operator]
    except Exception as exc:
        raise UserCodeError.wrap("module.configure_optimizers()", exc) from exc
    optimizer = _optimizer_in(config)
    if optimizer is None:
        raise BadInputError(
            "module.configure_optimizers(): expected an optimizer (alone, in a list, a tuple of "
            f"lists or a dict with 'optimizer'), got {type(config).__name__}"
        )
    return optimizer


def _optimizer_in(config: Any) -> torch.optim.Optimizer | None:
    """The first optimizer of any of the shapes Lightning accepts from configure_optimizers."""
    if isinstance(config, torch.optim.Optimizer):
        return config
    if isinstance(config, Mapping):
        return _optimizer_in(config.get("optimizer"))
    if isinstance(config, Sequence) and not isinstance(config, str) and config:
        return _optimizer_in(config[0])
    return None


def _loader(source: Any, hook: str, *, required: bool) -> Any:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    name = f"{type(source).__name__}.{hook}"
    if not is_overridden(hook, source):
        if required:
            raise BadInputError(f"{name}: not defined; give a datamodule or define {hook}")
        return None
    try:
        loader = getattr(source, hook)()
    except Exception as exc:
        raise UserCodeError.wrap(f"{name}()", exc) from exc
    if isinstance(loader, Sequence) and not isinstance(loader, str):
        if not loader:
            return None
        if len(loader) > 1:
            warnings.warn(f"{name}: several loaders; the first is used", UserWarning, stacklevel=3)
        loader = loader[0]
    return loader


def _from_trainer_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    accelerator = kwargs.get("accelerator", "auto")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        options["device"] = "cuda"
    elif accelerator in ("cpu", "auto"):
        options["device"] = "cpu"
    else:
        raise BadInputError(
            f"trainer_kwargs['accelerator']: batchpilot measures on 'cpu' or 'cuda', got "
            f"{accelerator!r}; give device= as a tune option"
        )
    options["precision"] = lightning_precision(kwargs.get("precision", "32"))
    if options["precision"] == "16-mixed" and options["device"] == "cpu":
        options["precision"] = "bf16-mixed"  # what Lightning's Trainer runs on a CPU instead
    devices = kwargs.get("devices", 1)
    if isinstance(devices, int) and devices > 0:
        options["world_size"] = devices * int(kwargs.get("num_nodes", 1))
    elif isinstance(devices, Sequence) and not isinstance(devices, str):
        options["world_size"] = len(devices) * int(kwargs.get("num_nodes", 1))
    return options


def _warn_other_precision(result: TuneResult, trainer: pl.Trainer) -> None:
    task = getattr(result, "task", None)
    measured = getattr(task, "precision", None)
    flag = getattr(trainer, "precision", None)
    if measured is None or flag is None:
        return
    runs = _LIGHTNING_PRECISIONS.get(str(flag), str(flag))
    if runs != measured:
        warnings.warn(
            f"trainer.precision is {flag!r} but the recommendation was measured in {measured!r}: "
            "its micro-batch and speed hold for that precision; tune with "
            f"trainer_kwargs={{'precision': {flag!r}}}",
            UserWarning,
            stacklevel=3,
        )


# Lightning's precision flags (and their aliases) → what batchpilot measures.
_LIGHTNING_PRECISIONS: dict[str, Precision] = {
    "32": "32",
    "32-true": "32",
    "bf16": "bf16-mixed",
    "bf16-mixed": "bf16-mixed",
    "16": "16-mixed",
    "16-mixed": "16-mixed",
}


def lightning_precision(value: Any, name: str = "trainer_kwargs['precision']") -> Precision:
    """A Lightning ``precision`` flag as batchpilot's precision (``32``, ``"16"`` and ``"bf16"``
    are Lightning's aliases of ``"32-true"``, ``"16-mixed"`` and ``"bf16-mixed"``).

    >>> lightning_precision("bf16"), lightning_precision(32), lightning_precision("16-mixed")
    ('bf16-mixed', '32', '16-mixed')
    """
    found = _LIGHTNING_PRECISIONS.get(str(value))
    if found is None:
        raise BadInputError(
            f"{name}: batchpilot measures 32-true, bf16-mixed and 16-mixed (or their aliases "
            f"32, bf16, 16), got {value!r}; memory and speed in other precisions would differ "
            "from what it measured"
        )
    return found


def _has(holder: Any, name: str) -> bool:
    hparams = getattr(holder, "hparams", None)
    return hasattr(holder, name) or (isinstance(hparams, Mapping) and name in hparams)


def _set(holder: Any, name: str, value: Any) -> None:
    if hasattr(holder, name):
        setattr(holder, name, value)
    hparams = getattr(holder, "hparams", None)
    if isinstance(hparams, Mapping) and name in hparams:
        hparams[name] = value  # type: ignore[index]
