"""``tune(trainer)``: a recommendation for a constructed Hugging Face ``Trainer``, as its arguments.

The task is built from the Trainer: every measurement trains its ``model_init()`` or a deep copy of
its model as it was when ``tune`` was called, with its ``compute_loss``, its train and eval
datasets (unused columns removed as the Trainer removes them) and data collator, and the optimizer
its arguments choose (``optim``, weight decay on the same parameters, betas, eps; a user-given
optimizer's class and defaults). The Trainer's model never runs: it is left bitwise as it was.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from batchpilot.checks import Precision
from batchpilot.errors import BadInputError, UserCodeError
from batchpilot.integrations import missing_extra
from batchpilot.integrations._copies import owner_of
from batchpilot.state import preserved
from batchpilot.task import Task
from batchpilot.tune import TuneOptions, TuneResult
from batchpilot.tune import tune as tune_task

_OPTION_NAMES = {f.name for f in dataclass_fields(TuneOptions)}


@dataclass(frozen=True)
class TrainerRecommendation:
    """The recommendation in ``TrainingArguments`` terms, with the evidence behind it.

    ``dataclasses.replace(trainer.args, **rec.training_arguments())`` gives the arguments to build
    the Trainer you train with.
    """

    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    warmup_steps: int
    adam_beta1: float | None
    adam_beta2: float | None
    adam_epsilon: float | None
    result: TuneResult

    def training_arguments(self) -> dict[str, Any]:
        """The ``TrainingArguments`` fields to set (the Adam ones only when they were planned)."""
        fields: dict[str, Any] = {
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "learning_rate": self.learning_rate,
            "warmup_steps": self.warmup_steps,
        }
        for name in ("adam_beta1", "adam_beta2", "adam_epsilon"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        return fields

    def to_dict(self) -> dict[str, Any]:
        return {**self.training_arguments(), "result": self.result.to_dict()}


def tune(trainer: Any, **tune_options: Any) -> TrainerRecommendation:
    """Measure the Trainer's model and recommend its batch, accumulation, lr and warm-up.

    ``tune_options`` are :class:`~batchpilot.tune.TuneOptions` fields (``time_budget_seconds``,
    ``max_batch``, ...); the device, world size and precision (``bf16`` / ``fp16``,
    :func:`trainer_precision`) default to the Trainer's arguments'.
    """
    try:
        from transformers import Trainer
    except ImportError as exc:  # pragma: no cover - exercised only without transformers
        raise missing_extra(
            "batchpilot.integrations.huggingface", "transformers", "transformers"
        ) from exc
    if not isinstance(trainer, Trainer):
        raise BadInputError(
            f"trainer: expected a transformers Trainer, got {type(trainer).__name__}"
        )
    unknown = sorted(set(tune_options) - _OPTION_NAMES)
    if unknown:
        raise BadInputError(
            f"tune_options: unknown option(s) {', '.join(unknown)}; expected TuneOptions fields"
        )
    args = trainer.args
    device = torch.device(args.device)
    defaults: dict[str, Any] = {
        "device": device.type if device.type == "cpu" else str(device),
        "world_size": max(1, int(args.world_size)),
        "precision": trainer_precision(args),
    }
    options = TuneOptions(**{**defaults, **tune_options})
    with preserved(trainer.model):
        task = trainer_task(trainer, world_size=options.world_size)
        result = tune_task(task, options)
    rec = result.recommendation
    betas = rec.betas if _is_adam(task) else None
    found = TrainerRecommendation(
        per_device_train_batch_size=rec.micro_batch,
        gradient_accumulation_steps=rec.accumulation_steps,
        learning_rate=rec.lr,
        warmup_steps=rec.warmup_steps,
        adam_beta1=None if betas is None else betas[0],
        adam_beta2=None if betas is None else betas[1],
        adam_epsilon=rec.eps if betas is not None else None,
        result=result,
    )
    return _from_rank_zero(found)


def _from_rank_zero(found: TrainerRecommendation) -> TrainerRecommendation:
    """Under torchrun every process measures; all of them get rank 0's recommendation, so they
    train the same global batch (different per-device batches would leave DDP's all-reduce
    waiting)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return found
    shared: list[Any] = [found]
    dist.broadcast_object_list(shared, src=0)
    result: TrainerRecommendation = shared[0]
    return result


def trainer_precision(args: Any) -> Precision:
    """The precision ``TrainingArguments`` train in: ``bf16`` → ``"bf16-mixed"``, ``fp16`` →
    ``"16-mixed"`` (autocast, and a GradScaler for fp16, as accelerate runs them), else ``"32"``.

    >>> from types import SimpleNamespace
    >>> trainer_precision(SimpleNamespace(bf16=True, fp16=False))
    'bf16-mixed'
    """
    bf16, fp16 = bool(getattr(args, "bf16", False)), bool(getattr(args, "fp16", False))
    if bf16 and fp16:
        raise BadInputError("trainer.args: bf16 and fp16 are both set; choose one")
    return "bf16-mixed" if bf16 else "16-mixed" if fp16 else "32"


def trainer_task(trainer: Any, *, world_size: int | None = None) -> Task:
    """The :class:`~batchpilot.Task` that :func:`tune` measures for ``trainer``.

    Its reference batch is the global batch the Trainer's arguments train:
    ``per_device_train_batch_size × gradient_accumulation_steps × world_size`` (the arguments'
    world size unless given), the batch their ``learning_rate`` was chosen for.
    """
    world = max(1, int(trainer.args.world_size)) if world_size is None else world_size
    if trainer.train_dataset is None:
        raise BadInputError("trainer.train_dataset: the Trainer has no train dataset")
    initial = None if trainer.model_init is not None else copy.deepcopy(trainer.model).cpu()
    built: list[weakref.ref[nn.Module]] = []  # the copies, for the optimizer factory
    checkpointing = _checkpointing(trainer.args)
    if checkpointing is not None and trainer.model is not None:
        _check_checkpointable(trainer.model, checkpointing[0])

    def make_model() -> nn.Module:
        model = trainer.call_model_init() if initial is None else copy.deepcopy(initial)
        if checkpointing is not None:
            _enable_checkpointing(model, *checkpointing)
        built.append(weakref.ref(model))
        return model

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        # compute_loss may pop "labels" (label smoothing): give it its own dict.
        inputs = dict(batch) if isinstance(batch, Mapping) else batch
        value = trainer.compute_loss(model, inputs)
        return value[0] if isinstance(value, tuple) else value

    given = trainer.optimizer  # optimizers=(optimizer, scheduler) given to the Trainer

    def make_optimizer(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        params = list(params)
        if given is not None:
            return type(given)(params, **{**given.defaults, "lr": lr})
        model = owner_of(built, params)
        cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
        kwargs = {**kwargs, "lr": lr}
        if model is not None:
            decay = set(trainer.get_decay_parameter_names(model))
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            groups = [
                {
                    "params": [p for n, p in named if n in decay],
                    "weight_decay": trainer.args.weight_decay,
                },
                {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
            ]
            return cls([g for g in groups if g["params"]], **kwargs)
        return cls(params, **kwargs)

    # The Trainer caches the forward's argument names on first use; leave it as it was.
    signature_columns = trainer._signature_columns
    try:
        train_loader = _loader(trainer, trainer.train_dataset, "training")
        eval_dataset = trainer.eval_dataset
        if isinstance(eval_dataset, Mapping):  # several named eval sets: the first
            eval_dataset = next(iter(eval_dataset.values()), None)
        val_loader = None if eval_dataset is None else _loader(trainer, eval_dataset, "evaluation")
    finally:
        trainer._signature_columns = signature_columns
    return Task.from_dataloader(
        make_model,
        train_loader,
        loss,
        make_optimizer,
        val_loader,
        # The Trainer's own setting is the (batch, lr) the user trains with: the fallback when the
        # range test finds no descent.
        reference_batch=trainer.args.per_device_train_batch_size
        * trainer.args.gradient_accumulation_steps
        * world,
        reference_lr=float(trainer.args.learning_rate),
        name=type(trainer.model).__name__ if trainer.model is not None else "trainer",
    )


def _checkpointing(args: Any) -> tuple[str, dict[str, Any]] | None:
    """``(flag name, checkpoint kwargs)`` when the arguments switch gradient checkpointing on
    (``gradient_checkpointing``, called ``activation_checkpointing`` from transformers 5), else
    ``None``."""
    for flag in ("activation_checkpointing", "gradient_checkpointing"):
        if hasattr(args, flag) and getattr(args, flag) is not None:
            if not getattr(args, flag):
                return None
            kwargs = getattr(args, f"{flag}_kwargs", None) or {}
            if not isinstance(kwargs, Mapping):
                raise BadInputError(
                    f"trainer.args.{flag}_kwargs: expected a dict, got {type(kwargs).__name__}"
                )
            return flag, dict(kwargs)
    return None


def _check_checkpointable(model: nn.Module, flag: str) -> None:
    if not any(
        callable(getattr(model, name, None))
        for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable")
    ):
        _refuse_checkpointing(
            flag, type(model).__name__, "it has no gradient_checkpointing_enable method"
        )


def _refuse_checkpointing(flag: str, name: str, why: object) -> None:
    setting = (
        "gradient_checkpointing"
        if flag == "gradient_checkpointing"
        else ("activation_checkpointing (gradient_checkpointing)")
    )
    raise BadInputError(
        f"trainer.args.{setting}: True, but checkpointing cannot be switched on in {name} "
        f"({why}); the Trainer would fail the same way in train()"
    )


def _enable_checkpointing(model: nn.Module, flag: str, kwargs: dict[str, Any]) -> None:
    """Switch gradient checkpointing on in a copy, as ``Trainer.train()`` does in the model it
    trains (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost": activations are
    recomputed in the backward instead of kept), so memory and speed are those of the run."""
    name = type(model).__name__
    new_api: Any = getattr(model, "activation_checkpointing_enable", None)
    old_api: Any = getattr(model, "gradient_checkpointing_enable", None)
    try:
        if flag == "activation_checkpointing":  # transformers 5: its Trainer's call
            every_n_layers = kwargs.pop("every_n_layers", 1)
            offload = kwargs.pop("offload", False)
            if callable(new_api):
                new_api(
                    activation_checkpointing_kwargs=kwargs or None,
                    every_n_layers=every_n_layers,
                    offload=offload,
                )
            elif callable(old_api):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # the Trainer warns in train()
                    old_api(
                        gradient_checkpointing_kwargs=kwargs or None,
                        every_n_layers=every_n_layers,
                        offload=offload,
                    )
            else:
                raise AttributeError(f"{name} has no activation_checkpointing_enable")
        elif callable(old_api):  # transformers 4
            old_api(gradient_checkpointing_kwargs=kwargs or None)
        else:
            raise AttributeError(f"{name} has no gradient_checkpointing_enable")
    except (AttributeError, ValueError, TypeError) as exc:
        _refuse_checkpointing(flag, name, exc)


def _loader(trainer: Any, dataset: Any, description: str) -> DataLoader[Any]:
    """A plain loader over the dataset and collator the Trainer's own loader would use."""
    collator = trainer.data_collator
    try:
        import datasets

        is_hf_dataset = isinstance(dataset, datasets.Dataset)
    except ImportError:
        is_hf_dataset = False
    try:
        if is_hf_dataset:
            dataset = trainer._remove_unused_columns(dataset, description=description)
        else:
            collator = trainer._get_collator_with_removed_columns(collator, description=description)
    except Exception as exc:
        raise UserCodeError.wrap(f"removing the {description} set's unused columns", exc) from exc
    return DataLoader(dataset, collate_fn=collator)


def _is_adam(task: Task) -> bool:
    optimizer = task.make_optimizer(nn.Linear(1, 1).parameters(), 1e-3)
    return "betas" in optimizer.defaults
