"""batchpilot.integrations.huggingface.tune: a constructed Trainer tuned as it is, then trained."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from batchpilot.errors import BadInputError, BatchpilotError
from two_ranks import run_two_ranks

transformers = pytest.importorskip("transformers")

from batchpilot.integrations.huggingface import TrainerRecommendation, trainer_task, tune  # noqa: E402

FAST = {"time_budget_seconds": 3.0, "max_batch": 128}


class Regressor(torch.nn.Module):
    """A Trainer-style model: keyword inputs, a dict with the loss; a buffer counting samples."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.training:
            self.seen += len(x)
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


class Samples(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Dict samples with a column the model does not take: the Trainer's collator drops it."""

    def __init__(self, n: int) -> None:
        generator = torch.Generator().manual_seed(n)
        self.x = torch.randn(n, 4, generator=generator)
        self.y = self.x @ torch.ones(4, 1) + 0.3 * torch.randn(n, 1, generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i], "unused": torch.tensor(i)}


def _trainer(out: Path, model: torch.nn.Module | None = None, cls: Any = None, **args: Any) -> Any:
    arguments = transformers.TrainingArguments(
        output_dir=str(out),
        **{
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 2,
            "learning_rate": 1e-3,
            "weight_decay": 0.01,
            "adam_beta1": 0.8,
            "adam_beta2": 0.95,
            "report_to": [],
            "use_cpu": True,
            "save_strategy": "no",
            "disable_tqdm": True,
            **args,
        },
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (cls or transformers.Trainer)(
            model=model or Regressor(),
            args=arguments,
            train_dataset=Samples(320),
            eval_dataset=Samples(64),
        )


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_task_has_the_trainers_optimizer_groups_collator_and_loss(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    task = trainer_task(trainer)
    assert (task.train_size, task.val_size) == (320, 64)
    assert (task.reference_batch, task.reference_lr) == (16, 1e-3)
    model = task.make_model()
    assert model is not trainer.model and _same(_state(model), _state(trainer.model))
    optimizer = task.make_optimizer(model.parameters(), 0.02)
    assert type(optimizer) is torch.optim.AdamW
    decayed, plain = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decayed["params"]) == ["net.0.weight", "net.3.weight"]
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.01, 0.0)
    assert decayed["lr"] == plain["lr"] == 0.02 and decayed["betas"] == (0.8, 0.95)
    batch = next(iter(task.loader(5, shuffle=False)))
    assert sorted(batch) == ["labels", "x"]  # "unused" removed, as the Trainer's loader does
    model.eval()
    expected = model(**batch)["loss"]
    assert task.compute_loss(model, batch).item() == pytest.approx(expected.item())


def test_tune_leaves_the_trainer_as_found_and_its_fields_train_as_given(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    before, args_before = _state(trainer.model), trainer.args.to_dict()
    rec = tune(trainer, **FAST)
    assert isinstance(rec, TrainerRecommendation)
    assert _same(_state(trainer.model), before) and trainer.model.seen.item() == 0
    assert trainer.args.to_dict() == args_before
    assert trainer.optimizer is None and trainer.state.global_step == 0
    assert not trainer.state.log_history and trainer._signature_columns is None
    result = rec.result.recommendation
    expected: dict[str, Any] = {
        "per_device_train_batch_size": result.micro_batch,
        "gradient_accumulation_steps": result.accumulation_steps,
        "learning_rate": result.lr,
        "warmup_steps": result.warmup_steps,
    }
    if result.betas is not None:  # the plan rescaled Adam's betas for the new batch
        expected.update(adam_beta1=result.betas[0], adam_beta2=result.betas[1])
        expected["adam_epsilon"] = result.eps
    assert rec.training_arguments() == expected
    assert rec.result.options.device == "cpu" and rec.result.options.world_size == 1

    class Record(transformers.TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.betas: tuple[float, float] | None = None

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.betas = kw["optimizer"].param_groups[0]["betas"]

    seen: list[int] = []
    model = Regressor()
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(len(kw["x"])), with_kwargs=True)
    args = dataclasses.replace(trainer.args, **rec.training_arguments(), max_steps=2)
    record = Record()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuned = transformers.Trainer(
            model=model, args=args, train_dataset=Samples(320), callbacks=[record]
        )
        tuned.train()
    # Two optimizer steps of `accumulation` micro-batches each, all of the recommended size.
    assert seen == [result.micro_batch] * (2 * result.accumulation_steps)
    assert record.betas == pytest.approx(result.betas or (0.8, 0.95))


def test_a_failing_compute_loss_leaves_the_trainers_model_as_it_was(tmp_path: Path) -> None:
    class Failing(transformers.Trainer):  # type: ignore[misc]
        calls = 0

        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            type(self).calls += 1
            if type(self).calls > 30:
                raise RuntimeError("tokenizer server gone")
            return super().compute_loss(model, inputs, *args, **kwargs)

    trainer = _trainer(tmp_path, cls=Failing)
    with torch.no_grad():
        trainer.model.net[0].bias.fill_(0.5)
    before = _state(trainer.model)
    # tune may wrap the error in the phase it failed in: any batchpilot error naming it.
    with pytest.raises(BatchpilotError, match="tokenizer server gone"):
        tune(trainer, **FAST)
    assert Failing.calls > 30
    assert _same(_state(trainer.model), before)


def test_the_hugging_face_adapter_does_not_import_lightning() -> None:
    code = "import sys, batchpilot.integrations.huggingface\nprint('lightning' in sys.modules)\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="expected a transformers Trainer, got Module"):
        tune(torch.nn.Module())
    with pytest.raises(BadInputError, match="unknown option"):
        tune(_trainer(tmp_path), budget=3)
    trainer = _trainer(tmp_path)
    trainer.args.bf16 = trainer.args.fp16 = True  # set after construction: the args refuse both
    with pytest.raises(BadInputError, match=r"trainer\.args: bf16 and fp16 are both set"):
        tune(trainer)


@pytest.mark.parametrize(("flag", "precision"), [("bf16", "bf16-mixed"), ("fp16", "16-mixed")])
def test_the_trainers_bf16_or_fp16_is_the_precision_measured(
    tmp_path: Path, flag: str, precision: str
) -> None:
    seen: set[torch.dtype] = set()
    model = Regressor()
    # the first Linear's output: fp32 without autocast, the half type under it
    model.net[0].register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    trainer = _trainer(tmp_path, model=model, **{flag: True})
    before = _state(trainer.model)
    rec = tune(trainer, **FAST)
    assert rec.result.options.precision == rec.result.task.precision == precision
    assert rec.result.to_dict()["precision"] == precision
    assert seen == {torch.bfloat16 if flag == "bf16" else torch.float16}
    assert _same(_state(trainer.model), before)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 96

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": int(ids[0] % 2)}


def _bert_trainer(out: Path, **args: Any) -> tuple[Any, dict[str, int]]:
    """A tiny BERT from a config (nothing downloaded) whose forwards are counted: the
    embeddings run once per forward, a checkpointed encoder layer once more in each backward."""
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
    model = transformers.BertForSequenceClassification(config)
    calls = {"embeddings": 0, "layer": 0}

    def count(name: str) -> Any:
        return lambda module, inputs, output: calls.__setitem__(name, calls[name] + 1)

    model.bert.embeddings.register_forward_hook(count("embeddings"))
    # a module inside the layer: the recompute calls it again (transformers may wrap the layer's
    # own forward, whose hooks then run once)
    model.bert.encoder.layer[0].intermediate.register_forward_hook(count("layer"))
    arguments = transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        **args,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(model=model, args=arguments, train_dataset=Tokens())
    return trainer, calls


def _checkpointing_flags(model: torch.nn.Module) -> dict[str, bool]:
    """Each module's own switch, as transformers sets it in gradient_checkpointing_enable."""
    return {
        name: bool(module.gradient_checkpointing)
        for name, module in model.named_modules()
        if hasattr(module, "gradient_checkpointing")
    }


def _one_step(trainer: Any) -> None:
    task = trainer_task(trainer)
    model = task.make_model()
    model.train()
    task.compute_loss(model, next(iter(task.loader(4, shuffle=False)))).backward()


@pytest.mark.parametrize("checkpointed", [False, True])
def test_the_copies_train_with_the_trainers_gradient_checkpointing(
    tmp_path: Path, checkpointed: bool
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # a deprecated alias in transformers 5
        trainer, calls = _bert_trainer(tmp_path, gradient_checkpointing=checkpointed)
    _one_step(trainer)
    # checkpointed: the layer's forward is run again in the backward (its activations were not kept)
    assert calls == {"embeddings": 1, "layer": 2 if checkpointed else 1}
    assert not any(_checkpointing_flags(trainer.model).values())


def test_tune_measures_checkpointed_copies_and_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer, calls = _bert_trainer(
            tmp_path,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    before, args_before = _state(trainer.model), trainer.args.to_dict()
    flags = _checkpointing_flags(trainer.model)
    assert flags and not any(flags.values())
    rec = tune(trainer, **FAST)
    assert rec.per_device_train_batch_size >= 1
    # Every training step recomputed the layer: more layer forwards than embedding forwards.
    assert calls["layer"] > calls["embeddings"] > 0
    assert _same(_state(trainer.model), before) and trainer.args.to_dict() == args_before
    assert _checkpointing_flags(trainer.model) == flags


def test_checkpointing_a_model_that_cannot_is_refused_in_one_line(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = _trainer(tmp_path, gradient_checkpointing=True)  # a plain torch module
    with pytest.raises(
        BadInputError, match=r"trainer\.args\..*gradient_checkpointing.*: True, but"
    ):
        trainer_task(trainer)


# Each process of `torchrun --nproc_per_node=2` runs this: a Trainer over a tiny BERT (from a
# config: nothing downloaded) whose arguments make it a 2-process gloo run, tuned on both ranks
# (rank 1 under another cap, so its own recommendation differs), then trained 2 steps with it.
DDP_SCRIPT = """
import dataclasses, json, os, sys, warnings
import torch
import transformers
import batchpilot.integrations._huggingface_tune as hf_tune
from batchpilot.integrations.huggingface import tune

warnings.simplefilter("ignore")
torch.set_num_threads(1)
rank = int(os.environ["RANK"])


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 96

    def __getitem__(self, i):
        ids = torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": int(ids[0] % 2)}


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16, num_labels=2)
    return transformers.BertForSequenceClassification(config)


own = []  # this rank's recommendation, before rank 0's is broadcast
broadcast = hf_tune._from_rank_zero
hf_tune._from_rank_zero = lambda found: (own.append(found), broadcast(found))[1]
args = transformers.TrainingArguments(
    output_dir=sys.argv[1] + "/out", per_device_train_batch_size=8, gradient_accumulation_steps=2,
    learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
)
trainer = transformers.Trainer(model=bert(), args=args, train_dataset=Tokens())
cap = 64 if rank == 0 else 2
rec = tune(trainer, time_budget_seconds=3, max_batch=cap, seed=0)
fields = rec.training_arguments()
sizes = []
model = bert()
model.register_forward_pre_hook(
    lambda module, a, kw: sizes.append(len(kw["input_ids"])) if module.training else None,
    with_kwargs=True,
)
tuned = transformers.Trainer(
    model=model, args=dataclasses.replace(args, **fields, max_steps=2), train_dataset=Tokens()
)
tuned.train()
result = rec.result
json.dump({
    "args_world_size": args.world_size,
    "own": [own[0].per_device_train_batch_size, own[0].gradient_accumulation_steps,
            own[0].learning_rate, own[0].result.options.max_batch],
    "received": [rec.per_device_train_batch_size, rec.gradient_accumulation_steps,
                 rec.learning_rate, result.options.max_batch],
    "fields": fields,
    "world_size": result.options.world_size,
    "global_batch": result.recommendation.global_batch,
    "reference_batch": result.task.reference_batch,
    "trained": [tuned.args.per_device_train_batch_size, tuned.args.gradient_accumulation_steps,
                tuned.args.learning_rate, tuned.args.world_size, tuned.state.global_step],
    "sizes": sizes,
    "params": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist(),
}, open(sys.argv[1] + f"/rank{rank}.json", "w"))
"""


def _micro_batches(per_rank: int, micro: int, accumulation: int, steps: int = 2) -> list[int]:
    """The micro-batch sizes a rank's first ``steps`` optimizer steps see: each epoch's loader
    cuts the rank's samples into micro-batches (the last one short), ``accumulation`` a step, and
    an epoch's last step takes what is left."""
    epoch = [micro] * (per_rank // micro) + ([per_rank % micro] if per_rank % micro else [])
    groups = [epoch[i : i + accumulation] for i in range(0, len(epoch), accumulation)]
    while len(groups) < steps:
        groups += groups
    return [size for group in groups[:steps] for size in group]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_rank_of_a_torchrun_trainer_gets_rank_zeros_recommendation(tmp_path: Path) -> None:
    zero, one = run_two_ranks(DDP_SCRIPT, tmp_path)
    micro, accumulation, lr, cap = zero["own"]
    assert zero["received"] == zero["own"] and cap == 64
    # Rank 1 measured under its own cap of 2 and got rank 0's recommendation instead, evidence and all.
    assert one["own"][0] <= 2 and one["own"][3] == 2
    assert one["received"] == zero["received"] and one["fields"] == zero["fields"]
    for rank in (zero, one):
        # Tuned for the Trainer's 2 processes: the reference is 8 per device × 2 accumulated × 2,
        # and the global batch is per-device × accumulation × world size.
        assert rank["args_world_size"] == rank["world_size"] == 2
        assert rank["reference_batch"] == 32
        assert rank["global_batch"] == micro * accumulation * 2
        assert rank["fields"]["per_device_train_batch_size"] == micro
        assert rank["fields"]["gradient_accumulation_steps"] == accumulation
        assert rank["fields"]["learning_rate"] == lr
        # ... and both ranks trained with it, 2 steps of their half of the samples.
        assert rank["trained"] == [micro, accumulation, pytest.approx(lr), 2, 2]
        assert rank["sizes"] == _micro_batches(per_rank=48, micro=micro, accumulation=accumulation)
    assert zero["params"] == one["params"]  # DDP kept the ranks in step
