"""The ``tune`` report: every recommendation, every plot, and where every number came from."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt

from batchpilot.jsonio import to_json
from batchpilot.measure._lr_check import LrCheck
from batchpilot.measure._noise import DIMINISHING_RETURNS, NoiseScaleResult
from batchpilot.plots.lr_find import plot_lr_check, plot_lr_find
from batchpilot.plots.memory import plot_memory, plot_step_time_residuals, plot_throughput
from batchpilot.plots.noise import plot_goodput, plot_noise_history
from batchpilot.report.html import Document, Figure, Section, Table, render_html
from batchpilot.tune import TuneResult

FORMULAS = (
    "Global batch = micro-batch × accumulation steps × world size; each micro-loss is divided by "
    "the accumulation steps before backward.",
    "Linear rule (Goyal et al. 2017, arXiv 1706.02677): lr = lr_ref · B/B_ref, warm-up over ~5 epochs.",
    "Square-root rule for Adam (Malladi et al. 2022, arXiv 2205.10287), κ = B/B_ref: lr·√κ, "
    "β → 1 − κ(1 − β), eps → eps/√κ.",
    "Optimal SGD lr vs batch (McCandlish et al. 2018, arXiv 1812.06162): ε(B) = ε_max/(1 + B_noise/B).",
    "Gradient noise scale: E|G_b|² = |G|² + tr(Σ)/b; from micro-batch (b) and step (B) gradients, "
    "|G|² ≈ (B|G_B|² − b|G_b|²)/(B − b), tr(Σ) ≈ (|G_b|² − |G_B|²)/(1/b − 1/B); "
    "B_simple = EMA(tr Σ)/EMA(|G|²).",
    "Steps to a target: S(B)/S_min = 1 + B_crit/B; B_crit is the noise scale weighted by "
    "progress over the run (McCandlish et al. 2018, appendix D).",
    "Statistical efficiency (Pollux, OSDI'21): E(B) = (B_noise + B0)/(B_noise + B); "
    "goodput(B) = samples/s(B) · E(B).",
    "Memory model: peak(b) = fixed + per_sample · b, fitted to probes and checked by one real step.",
)


def _figure(draw: object, result: object, caption: str) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 3.8))
    draw(result, ax=ax)  # type: ignore[operator]
    figure = Figure.from_matplotlib(fig, caption)
    plt.close(fig)
    return figure


def build_tune_document(result: TuneResult) -> Document:
    rec = result.recommendation
    task = result.task
    memory, throughput, lr_find, noise = (
        result.memory,
        result.throughput,
        result.lr_find,
        result.noise,
    )
    headline = (
        f"Train {task.name} at global batch {rec.global_batch} (micro-batch {rec.micro_batch} × "
        f"{rec.accumulation_steps} accumulation × {rec.world_size} devices) with lr {rec.lr:.4g}"
        + (f" and a {rec.warmup_steps}-step warm-up" if rec.warmup_steps else "")
        + ("" if task.precision == "32" else f", in {task.precision} precision (measured so)")
        + f". The batch is bound by {rec.bound_by}."
        + (
            f" The scaling rule gave lr {rec.rule_lr:.4g}; short runs at this batch chose "
            f"{rec.lr:.4g}."
            if rec.lr_source == "checked" and rec.rule_lr is not None
            else ""
        )
    )
    rows: list[list[object]] = [
        ["global batch", rec.global_batch],
        ["micro-batch", rec.micro_batch],
        ["accumulation steps", rec.accumulation_steps],
        ["world size", rec.world_size],
        ["learning rate", rec.lr],
        ["lr rule", rec.lr_rule],
    ]
    if rec.rule_lr is not None and rec.lr_source == "checked":
        rows.append(["the rule's lr (before the check)", rec.rule_lr])
    if rec.betas is not None and rec.eps is not None:
        rows += [["Adam beta1", rec.betas[0]], ["Adam beta2", rec.betas[1]], ["Adam eps", rec.eps]]
    rows += [
        ["warm-up steps", rec.warmup_steps],
        ["steps per epoch", rec.steps_per_epoch],
        ["expected samples/s", rec.expected_samples_per_second],
    ]
    if rec.steps_to_target_ratio is not None:
        rows.append(["steps to target / minimum", rec.steps_to_target_ratio])
    sections = [
        Section(
            "Recommendation",
            paragraphs=[headline, _settings_to_change(result)],
            tables=[Table(["", "value"], rows)],
            bullets=list(rec.reasons),
            css_class="headline",
            anchor="recommendation",
        ),
    ]
    if rec.warnings:
        sections.append(
            Section(
                "Warnings",
                bullets=[f"{a.code}: {a.message}" for a in rec.warnings],
                css_class="warning",
                anchor="warnings",
            )
        )
    sections.append(_provenance(result))
    sections.append(
        Section(
            "1. Memory: the largest micro-batch that fits",
            paragraphs=[
                f"Budget {memory.budget_bytes / 2**20:,.0f} MiB ({memory.budget_source}), margin "
                f"{memory.margin_bytes / 2**20:,.1f} MiB; a step had to stay under "
                f"{memory.limit_bytes / 2**20:,.0f} MiB. Fitted peak(b) = "
                f"{memory.fixed_bytes / 2**20:,.2f} MiB + {memory.bytes_per_sample / 1024:,.1f} KiB · b "
                f"from {len(memory.probes)} probes ({memory.steps} training steps, "
                f"{memory.seconds:.1f} s, mode {memory.mode}); the answer is capped by "
                f"{memory.capped_by}.",
                *memory.notes,
            ],
            tables=[
                Table(
                    ["micro-batch", "peak MiB", "fits"],
                    [
                        [
                            p.batch,
                            "out of memory" if p.peak_bytes is None else p.peak_bytes / 2**20,
                            "yes" if p.ok else "no",
                        ]
                        for p in memory.probes
                    ],
                )
            ],
            figures=[
                _figure(plot_memory, memory, "Peak memory of one training step vs micro-batch")
            ],
            anchor="memory",
        )
    )
    sections.append(
        Section(
            "2. Throughput: samples per second vs micro-batch",
            paragraphs=[_throughput_paragraph(throughput)],
            bullets=list(throughput.warnings),
            tables=[
                Table(
                    [
                        "micro-batch",
                        "median samples/s",
                        "fitted samples/s",
                        "± (1 s.e.)",
                        "median ms per step",
                        "residual",
                    ],
                    [
                        [
                            p.batch,
                            p.samples_per_second,
                            throughput.samples_per_second_at(p.batch),
                            f"{throughput.relative_uncertainty_at(p.batch):.1%}",
                            p.seconds_per_step * 1e3,
                            _residual(throughput, p.batch),
                        ]
                        for p in throughput.points
                    ],
                )
            ],
            figures=[
                _figure(plot_throughput, throughput, "Training samples per second vs micro-batch"),
                _figure(
                    plot_step_time_residuals,
                    throughput,
                    "Median step time of each batch against the fitted model",
                ),
            ],
            anchor="throughput",
        )
    )
    spread = lr_find.spread.get(lr_find.method, {})
    sections.append(
        Section(
            "3. Learning-rate range test",
            paragraphs=[
                f"{len(lr_find.runs)} range test(s) at batch {lr_find.global_batch}, lr from "
                f"{lr_find.min_lr:g} to {lr_find.max_lr:g} over {lr_find.steps} steps ({lr_find.mode}). "
                f"Suggested lr ({lr_find.method}): "
                + (f"{lr_find.suggestion:.4g}" if lr_find.suggestion is not None else "none")
                + (f" — {lr_find.message}" if lr_find.message else "")
                + (
                    f"; across repeats the median is {spread['median']:.3g}, interquartile "
                    f"{spread['q1']:.3g} to {spread['q3']:.3g}."
                    if spread.get("median") is not None
                    and spread.get("q1") is not None
                    and spread.get("q3") is not None
                    else "."
                ),
                *lr_find.notes,
            ],
            tables=[
                Table(
                    ["method", "suggested lr"],
                    [
                        [name, "none" if value is None else value]
                        for name, value in lr_find.suggestions.items()
                    ],
                )
            ],
            figures=[_figure(plot_lr_find, lr_find, "Loss vs learning rate, suggestions marked")],
            anchor="lr",
        )
    )
    if noise is not None:
        low, high = noise.noise_scale_interval
        plan_low, plan_high = noise.plan_interval
        sections.append(
            Section(
                "4. Gradient noise scale and goodput",
                paragraphs=[
                    f"Trained {noise.steps} steps at batch {noise.batch} ({noise.micro_batches} "
                    f"micro-batches of {noise.micro_batch}) and lr {noise.lr:.3g}; it stopped at "
                    f"{noise.window_reason}. The window is the first {noise.window_steps} steps"
                    + (
                        f", up to the best {noise.progress_split} loss"
                        if noise.window_steps < noise.steps
                        else " (the loss was still falling: a longer run's critical batch is larger)"
                    )
                    + f". At its end B_simple = {noise.noise_scale:,.1f} (interval {low:,.1f} to "
                    f"{high:,.1f}), |G|² = {noise.gradient_sq_norm:.4g}, tr(Σ) = "
                    f"{noise.trace_covariance:.4g}.",
                    f"The plan uses the {noise.plan_quantity}: {noise.plan_noise_scale:,.1f} "
                    f"(interval {plan_low:,.1f} to {plan_high:,.1f}), the progress-weighted noise "
                    "scale that predicts the steps to the loss the window reached, "
                    "S(B) = S_min (1 + B_crit/B) (McCandlish et al. 2018, appendix D).",
                    _measured_critical_sentence(result),
                    *noise.warnings,
                ],
                figures=[
                    _figure(
                        plot_noise_history, noise, "Noise-scale estimate over the training steps"
                    ),
                    _figure(
                        lambda r, ax: plot_goodput(r, ax=ax),
                        _goodput_plan(result),
                        "Goodput (samples/s × efficiency) vs global batch",
                    ),
                ],
                anchor="noise",
            )
        )
    if result.lr_check is not None:
        sections.append(_lr_check_section(result))
    if result.verification is not None:
        verification = result.verification
        sections.append(
            Section(
                "6. Verification (the halve-or-double check: ×0.5 and ×2)",
                paragraphs=[
                    f"Each batch trained {verification.epochs:.2g} epochs from the same seed with the lr "
                    f"its rule gives; best validation loss at batch {verification.best_batch}"
                    + (
                        " — the recommendation holds."
                        if verification.agrees
                        else " — not the recommended batch; prefer the measured best."
                    )
                ],
                tables=[
                    Table(
                        ["global batch", "lr", "steps", "val loss", "metric", "seconds"],
                        [
                            [
                                r.global_batch,
                                r.lr,
                                r.steps,
                                "-" if r.score is None else r.score,
                                "-" if r.metric is None else r.metric,
                                r.seconds,
                            ]
                            for r in verification.runs
                        ],
                    )
                ],
                anchor="verify",
            )
        )
    sections.append(_arithmetic(result))
    sections.append(Section("Formulas", bullets=list(FORMULAS), anchor="formulas"))
    if result.notes:
        sections.append(Section("Notes", bullets=list(result.notes), anchor="notes"))
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in result.phase_seconds.items())
    sections.append(
        Section(
            "Run",
            paragraphs=[
                f"Device {result.options.device}, precision {task.precision}, seed "
                f"{result.options.seed}. Time: {timing}."
            ],
        )
    )
    return Document(
        f"batchpilot: {task.name}",
        sections,
        subtitle="batch size and learning rate, measured on your model",
    )


def _throughput_paragraph(curve: object) -> str:
    model = getattr(curve, "model", None)
    text = (
        f"Knee (smallest batch within {curve.knee_fraction:.0%} of the best fitted samples/s): "  # type: ignore[attr-defined]
        f"{curve.knee_batch}; fastest: {curve.best_batch}."  # type: ignore[attr-defined]
    )
    if model is not None:
        text += (
            f" Step time T(b) = {model.alpha_seconds * 1e3:.3g} ms + "
            f"{model.beta_seconds_per_sample * 1e6:.3g} µs × b (Pollux's model, Theil–Sen fit over "
            f"{curve.timed_steps} interleaved rounds; residual scale {model.residual_scale:.1%})."  # type: ignore[attr-defined]
        )
    conditions = getattr(curve, "conditions", None)
    if conditions is not None:
        text += (
            f" Measured with {conditions.threads} thread(s) ({conditions.reason}); 1-min load "
            f"{conditions.load_1min:.2f} on {conditions.cores} cores."
        )
    return text


def _residual(curve: object, batch: int) -> str:
    model = getattr(curve, "model", None)
    if model is None:
        return "-"
    value = model.relative_residuals.get(batch)
    mark = " (rejected)" if batch in model.rejected_batches else ""
    return "-" if value is None else f"{value:+.1%}{mark}"


def _goodput_plan(result: TuneResult) -> object:
    """The plan the batch was chosen from, as the recommendation keeps it (never re-planned)."""
    return result.recommendation.goodput


def _provenance(result: TuneResult) -> Section:
    rec, memory, lr_find, noise = (
        result.recommendation,
        result.memory,
        result.lr_find,
        result.noise,
    )
    rows: list[list[object]] = [
        [
            "max micro-batch",
            memory.max_micro_batch,
            f"memory phase: {len(memory.probes)} probes, mode {memory.mode}, capped by {memory.capped_by}",
        ],
        [
            "throughput knee",
            result.throughput.knee_batch,
            f"throughput phase: {len(result.throughput.points)} micro-batches timed",
        ],
        [
            "reference lr",
            rec.reference_lr,
            f"range test at batch {rec.reference_batch} ({lr_find.method}, {len(lr_find.runs)} repeats)"
            if result.options.lr is None
            else "given with --lr",
        ],
        [
            "noise scale",
            "-" if noise is None else noise.noise_scale,
            "not measured"
            if noise is None
            else f"{noise.steps} training steps at batch {noise.batch}, lr {noise.lr:.3g}",
        ],
        ["global batch", rec.global_batch, "highest goodput among powers of two"],
        [
            "micro-batch × accumulation",
            f"{rec.micro_batch} × {rec.accumulation_steps}",
            "fastest exact split under the memory limit",
        ],
        [
            "learning rate",
            rec.lr,
            f"{rec.lr_rule} rule from the reference lr"
            + (
                f" ({rec.rule_lr:.4g}), then checked by short runs at batch {rec.global_batch}"
                if rec.lr_source == "checked" and rec.rule_lr is not None
                else ""
            ),
        ],
        ["warm-up steps", rec.warmup_steps, rec.warmup_reason or "-"],
        [
            "expected samples/s",
            rec.expected_samples_per_second,
            "measured throughput at the micro-batch × world size",
        ],
    ]
    return Section(
        "Where each number comes from",
        tables=[Table(["number", "value", "source"], rows)],
        anchor="provenance",
    )


def _settings_to_change(result: TuneResult) -> str:
    """One sentence: the optimizer settings to change from what the task's factory sets."""
    rec = result.recommendation
    changes = [f"lr {rec.lr:.4g}"]
    if rec.betas is not None and rec.eps is not None:
        changes.append(f"betas ({rec.betas[0]:.4g}, {rec.betas[1]:.5g}) and eps {rec.eps:.3g}")
    if rec.warmup_steps:
        changes.append(
            f"a linear warm-up from {rec.reference_lr:.3g} over {rec.warmup_steps} steps"
        )
    text = "Optimizer settings to change: " + "; ".join(changes) + "."
    if result.betas_check is not None and not result.betas_check.keep_rescaled:
        text += (
            f" Keep the optimizer's betas and eps: at lr {result.betas_check.lr:.3g} and "
            f"{result.betas_check.steps} steps, {result.betas_check.reason}."
        )
    elif rec.betas is None and result.task.optimizer.lower().startswith("adam"):
        text += (
            f" Keep the optimizer's betas and eps: the {rec.lr_rule} rule moves only the lr "
            "(beyond the batch ratio the betas allow, Malladi et al.'s rescaling does not apply)."
        )
    return text


def _lr_check_section(result: TuneResult) -> Section:
    check = result.lr_check
    assert check is not None
    return Section(
        f"5. The lr checked at batch {check.global_batch}",
        paragraphs=[
            f"Every lr below trained a fresh model at micro-batch {check.micro_batch} × "
            f"{check.accumulation_steps} accumulation, constant lr, no warm-up, {check.seeds} "
            f"seed(s) each, for the steps in the table; "
            + (
                f"scored by the steps to the target {check.split} loss "
                f"{check.target_loss:.4g} (median over seeds; a run stops there), as a grid "
                "search to a target scores them (Shallue et al. 2019)"
                if check.score == "steps to target" and check.target_loss is not None
                else f"scored by the {check.split} loss at the end (median over seeds)"
            )
            + f". The rule gave {check.rule_lr:.4g} (grid point "
            f"{check.rule_grid_lr:.4g}); {check.reason}."
            + ("" if check.complete else " The time budget ended the grid early.")
            + _horizon_sentence(check, result.noise, result.options.target_loss),
            "The grid is fixed powers of √2. An lr ties with the best when its median is at or "
            "below the best's worst seed; the grid grows (in steps of ×√2, ×2, ×4, … while the "
            "best is at its edge) until an lr outside the tie, or one that diverged, bounds it on "
            "both sides, and the tie's centre is chosen: noise that does not change the outcome "
            "of training does not move the answer.",
        ],
        tables=[
            Table(
                [
                    "steps",
                    "lr",
                    "median loss",
                    "losses per seed",
                    "steps to target per seed",
                    "diverged",
                    "",
                ],
                [
                    [
                        t.steps,
                        t.lr,
                        t.median,
                        ", ".join(f"{v:.4g}" for v in t.losses),
                        ", ".join("not reached" if math.isinf(v) else f"{v:.4g}" for v in t.reached)
                        or "-",
                        "yes" if t.diverged else "no",
                        "chosen"
                        if t.lr == check.lr and t.steps == check.steps
                        else ("rule" if t.lr == check.rule_grid_lr else ""),
                    ]
                    for t in (*check.earlier, *check.trials)
                ],
            )
        ],
        figures=[
            _figure(
                plot_lr_check,
                check,
                f"Steps until the loss stays below {check.target_loss:.3g} vs lr"
                if check.deepened_from is not None and check.target_loss is not None
                else "Steps to the noise window's loss vs lr"
                if check.score == "steps to target"
                else "Loss after the check's steps vs lr",
            )
        ],
        anchor="lr-check",
    )


def _measured_critical_sentence(result: TuneResult) -> str:
    """The critical batch read through the steps to the window's loss at two batches, or why
    there is none."""
    measured = result.critical_batch
    if measured is None:
        return (
            "The critical batch was not measured through steps at two batches (the lr check did "
            "not run, ran at the reference batch, or no lr reached the window's loss): the noise "
            "scale above stands for it."
        )
    low, high = measured.interval
    value = measured.critical_batch
    return (
        f"Measured directly: the noise run reached loss {measured.target_loss:.4g} after "
        f"{measured.reference_steps:.4g} steps at batch {measured.reference_batch}, the lr check "
        f"after {measured.steps:.4g} (median; seeds {measured.steps_range[0]:.4g}–"
        f"{measured.steps_range[1]:.4g}) at batch {measured.batch}; through S(B) = S_min (1 + "
        f"B_crit/B) the two give B_crit ≈ {value:,.3g} (interval {low:,.3g} to {high:,.3g}, "
        f"from the seeds' spread and ±{measured.reference_resolution:.0%} on the noise run's "
        "reading)"
        + (
            ": the recommendation reports this one."
            if math.isfinite(value) and value > 0
            else "; not a usable value, so the noise scale stands."
        )
    )


def _horizon_sentence(
    check: LrCheck, noise: NoiseScaleResult | None = None, given: float | None = None
) -> str:
    """How long the check's runs were: the plan's prediction to the target loss, and whether
    they were lengthened (the reason says why) and reached it; where the target came from."""
    text = ""
    if len(check.horizons) > 1:
        text = (
            f" The horizon doubled from {check.horizons[0]} to {check.steps} steps (short runs "
            "favour large lrs: Wu et al. 2018)."
        )
    if check.target_loss is not None:
        window = None if noise is None else noise.window_loss
        start = noise.progress[0][1] if noise is not None and noise.progress else None
        if given is not None:
            source = f"the one you gave (--target-loss), {given:.4g}"
        elif noise is not None and noise.target_source == "rounding":
            source = (
                f"float32's resolution (ε = 1.2e-7) times the noise run's first loss, "
                f"{check.target_loss:.4g}, above the window's {window or math.nan:.3g}, whose "
                "digits are rounding"
            )
        elif noise is not None and noise.target_source == "descent":
            source = (
                f"{check.target_loss:.4g}, where the noise run had made "
                f"{1 - DIMINISHING_RETURNS:.0%} of its log-loss progress from {start or math.nan:.3g} "
                f"to the window's {window or math.nan:.3g} (a loss still on the descent, crossed once: the "
                "window's own level is a floor the runs' fluctuations cross by luck)"
            )
        else:
            source = f"the noise window's loss, {check.target_loss:.4g}"
        if check.deepened_from is not None:
            source = (
                f"{check.target_loss:.4g}, deeper than the first, {check.deepened_from:.4g}, "
                "which every lr reached within its first updates (a loss on a plateau); the "
                f"last {check.steps}-step runs are scored by the steps until they stay below it"
            )
        text += f" The target was {source}: " + ("reached." if check.reached else "not reached.")
    return text


def _arithmetic(result: TuneResult) -> Section:
    """The epoch and iteration arithmetic of the recommendation, read from it (nothing re-planned)."""
    rec, size = result.recommendation, result.task.train_size
    per_step = rec.global_batch
    full, left = divmod(size, per_step)
    lines = [
        f"Global batch {rec.global_batch} = micro-batch {rec.micro_batch} × "
        f"{rec.accumulation_steps} accumulation steps × {rec.world_size} devices"
        + (
            f". Each micro-loss is divided by {rec.accumulation_steps} before backward."
            if rec.accumulation_steps > 1
            else "."
        ),
        f"κ = global batch / reference batch = {rec.global_batch} / {rec.reference_batch} = "
        f"{rec.global_batch / rec.reference_batch:g}.",
        f"{size} samples / {per_step} per step = {rec.steps_per_epoch} steps per epoch"
        + (f" ({full} with drop_last, which skips the last {left} samples)." if left else "."),
        f"10 epochs × {rec.steps_per_epoch} steps = {10 * rec.steps_per_epoch} optimizer steps in all.",
    ]
    if rec.predicted_steps is not None:
        lines.append(
            f"The plan predicts ~{rec.predicted_steps:.0f} steps at this batch to the loss the "
            "noise-scale window reached."
        )
    lines.append(
        f"Warm-up: {rec.warmup_steps} steps"
        + (f" ({rec.warmup_reason})." if rec.warmup_reason else ".")
    )
    return Section(
        "Epochs and iterations",
        bullets=lines,
        anchor="arithmetic",
        paragraphs=["For a 10-epoch run (scale the totals to your run's length):"],
    )


def write_tune_report(result: TuneResult, folder: Path) -> Path:
    """Write ``report.html`` and ``result.json`` into ``folder`` (created) and return the HTML path."""
    folder.mkdir(parents=True, exist_ok=True)
    page = folder / "report.html"
    page.write_text(render_html(build_tune_document(result)), encoding="utf-8")
    (folder / "result.json").write_text(to_json(result.to_dict(), indent=2))
    return page


def write_partial_report(
    partial: dict[str, object], folder: Path, *, phase: str, error: BaseException
) -> Path:
    """When a phase failed: ``result.json`` with everything measured before it, and a short
    ``report.html`` that says which phase failed and why. Returns the HTML path."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {"incomplete": True, "failed_phase": phase, "error": str(error), **partial}
    (folder / "result.json").write_text(to_json(data, indent=2))
    measured = [key for key in partial if key not in ("notes", "conditions", "task")]
    listed = partial.get("notes")
    notes = [str(note) for note in listed] if isinstance(listed, list | tuple) else []
    document = Document(
        title="batchpilot tune: incomplete",
        subtitle=f"the {phase} phase failed; nothing was recommended",
        sections=[
            Section(
                title="What happened",
                paragraphs=[
                    f"The {phase} phase failed: {error}",
                    "Everything measured before it is in result.json next to this page: "
                    + (", ".join(measured) if measured else "nothing yet")
                    + ".",
                ],
                bullets=notes,
            )
        ],
    )
    page = folder / "report.html"
    page.write_text(render_html(document), encoding="utf-8")
    return page
