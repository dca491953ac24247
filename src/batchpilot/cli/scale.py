"""``batchpilot scale``: the learning rate and step arithmetic for a new batch size."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from batchpilot.cli.app import FormatOpt, OutputFormat, command_app, emit
from batchpilot.plan._scaling import ScalePlan, plan_scaling

commands = command_app()


@commands.command(
    "scale",
    help=(
        "Scale a (batch, lr) that worked to a new global batch: the lr by rule, the micro-batch × "
        "accumulation × world-size split, steps per epoch and warm-up. "
        "Example: batchpilot scale --ref-batch 256 --ref-lr 0.1 --batch 8192 --rule linear"
    ),
)
def scale_command(
    ref_batch: Annotated[
        int, typer.Option("--ref-batch", help="Global batch the reference lr worked at.")
    ],
    ref_lr: Annotated[
        float, typer.Option("--ref-lr", help="Learning rate that worked at --ref-batch.")
    ],
    batch: Annotated[
        int | None,
        typer.Option(
            "--batch", help="New global batch (else --micro-batch × --accumulation × --world-size)."
        ),
    ] = None,
    micro_batch: Annotated[
        int | None, typer.Option("--micro-batch", help="Samples per device per forward pass.")
    ] = None,
    accumulation: Annotated[
        int | None,
        typer.Option("--accumulation", help="Gradient accumulation steps per optimizer step."),
    ] = None,
    world_size: Annotated[
        int, typer.Option("--world-size", help="Number of data-parallel devices.")
    ] = 1,
    max_micro_batch: Annotated[
        int | None,
        typer.Option(
            "--max-micro-batch",
            help="Largest micro-batch that fits: split --batch into micro-batch × accumulation.",
        ),
    ] = None,
    exact: Annotated[
        bool,
        typer.Option(
            "--exact/--nearest",
            help="Require the split to equal --batch exactly, or take the nearest.",
        ),
    ] = True,
    rule: Annotated[
        str,
        typer.Option("--rule", help="linear, sqrt, adam (Malladi et al.: lr, betas, eps) or none."),
    ] = "linear",
    reduction: Annotated[
        str, typer.Option("--reduction", help="mean or sum: how the loss reduces over the batch.")
    ] = "mean",
    beta1: Annotated[
        float, typer.Option("--beta1", help="Adam beta1 at the reference batch (adam rule).")
    ] = 0.9,
    beta2: Annotated[
        float, typer.Option("--beta2", help="Adam beta2 at the reference batch (adam rule).")
    ] = 0.999,
    eps: Annotated[
        float, typer.Option("--eps", help="Adam eps at the reference batch (adam rule).")
    ] = 1e-8,
    dataset_size: Annotated[
        int | None, typer.Option("--dataset-size", help="Training samples: gives steps per epoch.")
    ] = None,
    epochs: Annotated[
        float | None, typer.Option("--epochs", help="Epochs of the run: gives total steps.")
    ] = None,
    warmup_epochs: Annotated[
        float | None,
        typer.Option(
            "--warmup-epochs",
            help="Warm-up length in epochs [default: 5 when the linear rule raises the lr, else 0].",
        ),
    ] = None,
    drop_last: Annotated[
        bool,
        typer.Option(
            "--drop-last", help="Count steps per epoch with the last partial batch dropped."
        ),
    ] = False,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    plan = plan_scaling(
        ref_batch=ref_batch,
        ref_lr=ref_lr,
        batch=batch,
        micro_batch=micro_batch,
        accumulation_steps=accumulation,
        world_size=world_size,
        max_micro_batch=max_micro_batch,
        exact=exact,
        rule=rule,  # type: ignore[arg-type]  # checked by plan_scaling
        reduction=reduction,  # type: ignore[arg-type]
        betas=(beta1, beta2),
        eps=eps,
        dataset_size=dataset_size,
        epochs=epochs,
        warmup_epochs=warmup_epochs,
        drop_last=drop_last,
    )
    emit(fmt, plan.to_dict(), lambda console: _render(console, plan))


def _render(console: Console, plan: ScalePlan) -> None:
    table = Table(title=f"lr for global batch {plan.global_batch} ({plan.rule} rule)")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    rows: list[tuple[str, str]] = [
        ("lr", f"{plan.lr:.6g}"),
        ("global batch", str(plan.global_batch)),
        ("micro-batch", str(plan.micro_batch)),
        ("accumulation steps", str(plan.accumulation_steps)),
        ("world size", str(plan.world_size)),
        ("κ (batch ratio)", f"{plan.kappa:.4g}"),
    ]
    if plan.betas is not None:
        rows += [("beta1", f"{plan.betas[0]:.6g}"), ("beta2", f"{plan.betas[1]:.6g}")]
    if plan.eps is not None:
        rows.append(("eps", f"{plan.eps:.4g}"))
    if plan.steps_per_epoch is not None:
        rows.append(("steps per epoch", str(plan.steps_per_epoch)))
    if plan.total_steps is not None:
        rows.append(("total steps", str(plan.total_steps)))
    if plan.warmup_steps is not None:
        rows.append(("warm-up steps", str(plan.warmup_steps)))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    for line in plan.explanation:
        console.print(f"• {line}")
