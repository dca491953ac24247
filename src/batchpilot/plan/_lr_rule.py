"""The learning rate for a new global batch: the one rule every part of batchpilot uses.

``recommend``, ``tune``'s verification runs, sweeps and ``batchpilot scale`` all ask
:func:`lr_for_batch`, so they cannot disagree. Given an lr that worked at ``ref_batch`` and
κ = batch / ref_batch:

- ``rule="auto"`` picks by optimizer: Adam-family optimizers (they divide by a second moment) take
  Malladi et al.'s square-root rule; the others take McCandlish et al.'s noise-aware rule
  ε(B) ∝ 1 / (1 + B_noise / B) when a noise scale is known, else the linear rule (Goyal et al.);
- ``"linear"``, ``"sqrt"``, ``"adam"`` and ``"none"`` name a rule outright;
- the Adam rule (Malladi et al. 2022, arXiv 2205.10287) rescales β → 1 − κ(1 − β), which leaves
  (0, 1) once κ ≥ 1/(1 − β). β1 binds first (0.9 allows κ < 10, 0.999 allows κ < 1000). Beyond
  that κ the rule falls back to lr·√κ with betas and eps as they are, and says so;
- a sum-reduced loss already multiplies the gradient by the batch: the SGD rules are applied to
  the mean-equivalent lr (lr·B) and converted back, and Adam's eps is carried in sum units.

>>> lr_for_batch(0.1, ref_batch=256, batch=1024, optimizer="SGD").lr
0.4
>>> adam = lr_for_batch(1e-3, ref_batch=32, batch=64, optimizer="Adam")
>>> adam.rule, round(adam.lr, 6), tuple(round(b, 4) for b in adam.betas)
('adam', 0.001414, (0.8, 0.998))
>>> far = lr_for_batch(1e-3, ref_batch=32, batch=512, optimizer="AdamW")
>>> far.rule, round(far.lr, 6), far.betas
('sqrt', 0.004, (0.9, 0.999))
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from batchpilot.checks import Reduction, check_positive_float, check_positive_int, check_reduction
from batchpilot.errors import BadInputError

Rule = Literal["linear", "sqrt", "adam", "none"]
RULES: tuple[str, ...] = get_args(Rule)
RuleChoice = Literal["auto", "linear", "sqrt", "adam", "none"]

# Goyal et al. 2017 warm up over 5 epochs when they scale the lr linearly.
GOYAL_WARMUP_EPOCHS = 5.0


def check_rule(rule: str) -> Rule:
    if rule not in RULES:
        raise BadInputError(f"rule: unknown rule {rule!r}; expected one of {', '.join(RULES)}")
    return rule  # type: ignore[return-value]


def _sgd_factor(rule: Rule, kappa: float, reduction: Reduction) -> float:
    """Multiplier on the lr for the SGD-type rules.

    A sum-reduced loss already multiplies the gradient by the batch, so the mean-equivalent lr is
    lr·B: the rule is applied to that and converted back, which leaves lr unchanged under the
    linear rule and divides it by √κ under the square-root rule.
    """
    if rule == "none":
        return 1.0
    factor = kappa if rule == "linear" else math.sqrt(kappa)
    return factor / kappa if reduction == "sum" else factor


def scale_lr(
    ref_lr: float,
    *,
    ref_batch: int,
    batch: int,
    rule: Rule = "linear",
    reduction: Reduction = "mean",
) -> float:
    """The learning rate for global batch ``batch`` given one, ``ref_lr``, that worked at ``ref_batch``.

    >>> scale_lr(0.1, ref_batch=256, batch=1024, rule="linear", reduction="sum")
    0.1
    """
    ref_lr = check_positive_float("ref_lr", ref_lr)
    kappa = check_positive_int("batch", batch) / check_positive_int("ref_batch", ref_batch)
    rule = check_rule(rule)
    reduction = check_reduction(reduction)
    if rule == "adam":
        return ref_lr * math.sqrt(kappa)
    return ref_lr * _sgd_factor(rule, kappa, reduction)


@dataclass(frozen=True)
class AdamScaling:
    """Adam-family hyper-parameters rescaled by Malladi et al.'s square-root rule."""

    lr: float
    betas: tuple[float, float]
    eps: float


def scale_beta(name: str, beta: float, kappa: float) -> float:
    """β → 1 − κ(1 − β), refusing a result outside (0, 1) with by how much it misses."""
    if not 0.0 <= beta < 1.0:
        raise BadInputError(f"{name}: expected a value in [0, 1), got {beta!r}")
    if kappa == 1.0:
        return beta
    scaled = 1.0 - kappa * (1.0 - beta)
    if scaled <= 0.0:
        kappa_max = 1.0 / (1.0 - beta)
        raise BadInputError(
            f"{name}: the adam rule would push {name}={beta:g} to {scaled:.4g} (≤ 0) at "
            f"κ={kappa:.4g}, {kappa / kappa_max:.3g}× the κ < 1/(1 − {name}) = {kappa_max:.4g} "
            "that this rule allows"
        )
    if scaled >= 1.0:
        raise BadInputError(
            f"{name}: the adam rule would push {name}={beta:g} to {scaled:.6g} (≥ 1) at κ={kappa:.4g}"
        )
    return scaled


def scale_adam(
    ref_lr: float,
    *,
    ref_batch: int,
    batch: int,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    reduction: Reduction = "mean",
) -> AdamScaling:
    """Malladi et al.'s square-root rule for Adam: lr·√κ, β → 1 − κ(1 − β), eps → eps/√κ.

    Adam divides out the gradient's scale except in ``eps``; a sum-reduced loss makes gradients
    B times larger, so eps is carried in sum units (× κ) as well.

    >>> s = scale_adam(1e-3, ref_batch=64, batch=256, betas=(0.9, 0.999), eps=1e-8)
    >>> round(s.lr, 6), round(s.betas[0], 6), round(s.betas[1], 6), s.eps
    (0.002, 0.6, 0.996, 5e-09)
    """
    ref_lr = check_positive_float("ref_lr", ref_lr)
    kappa = check_positive_int("batch", batch) / check_positive_int("ref_batch", ref_batch)
    eps = check_positive_float("eps", eps)
    reduction = check_reduction(reduction)
    beta1 = scale_beta("beta1", betas[0], kappa)
    beta2 = scale_beta("beta2", betas[1], kappa)
    eps_scaled = eps / math.sqrt(kappa) * (kappa if reduction == "sum" else 1.0)
    return AdamScaling(lr=ref_lr * math.sqrt(kappa), betas=(beta1, beta2), eps=eps_scaled)


def is_adam_family(optimizer_name: str) -> bool:
    """Adam, AdamW, NAdam, RAdam, Adamax, and others that divide by a second moment.

    >>> is_adam_family("AdamW"), is_adam_family("SGD")
    (True, False)
    """
    name = optimizer_name.lower()
    return "adam" in name or name in ("adagrad", "rmsprop", "adafactor", "lamb", "lion")


def noise_aware_lr(
    ref_lr: float,
    *,
    ref_batch: int,
    batch: int,
    noise_scale: float | None,
    reduction: str = "mean",
) -> float:
    """SGD lr for ``batch`` from one at ``ref_batch``: ε(B) ∝ 1 / (1 + B_noise/B).

    McCandlish et al. (2018, eq. 2.6): linear scaling while B ≪ B_noise, no further gain beyond.
    Without a noise scale this is the linear rule.

    >>> round(noise_aware_lr(0.1, ref_batch=32, batch=64, noise_scale=32), 6)
    0.133333
    """
    ref_lr = check_positive_float("ref_lr", ref_lr)
    check_positive_int("ref_batch", ref_batch)
    check_positive_int("batch", batch)
    check_reduction(reduction)
    if noise_scale is None or not math.isfinite(noise_scale) or noise_scale <= 0:
        factor = batch / ref_batch
    else:
        factor = (1.0 + noise_scale / ref_batch) / (1.0 + noise_scale / batch)
    if reduction == "sum":
        factor *= ref_batch / batch
    return ref_lr * factor


@dataclass(frozen=True)
class BatchLr:
    """The lr (and, for Adam, betas and eps) at a new batch, with the rule used and why."""

    lr: float
    rule: str
    kappa: float
    betas: tuple[float, float] | None
    eps: float | None
    reason: str
    fell_back: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["betas"] = list(self.betas) if self.betas is not None else None
        return data


def adam_kappa_limit(betas: tuple[float, float]) -> float:
    """The largest κ the Adam rule allows: 1/(1 − β) for the smaller β (β1 binds).

    >>> round(adam_kappa_limit((0.9, 0.999)), 6)
    10.0
    """
    return 1.0 / (1.0 - min(betas))


def lr_for_batch(
    ref_lr: float,
    *,
    ref_batch: int,
    batch: int,
    optimizer: str = "SGD",
    rule: RuleChoice = "auto",
    reduction: Reduction = "mean",
    noise_scale: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> BatchLr:
    """The lr for global ``batch`` given ``ref_lr`` that worked at ``ref_batch``; see the module."""
    ref_lr = check_positive_float("ref_lr", ref_lr)
    check_positive_int("ref_batch", ref_batch)
    check_positive_int("batch", batch)
    reduction = check_reduction(reduction)
    if rule != "auto":
        check_rule(rule)
    kappa = batch / ref_batch
    chosen: str = rule
    if rule == "auto":
        if is_adam_family(optimizer):
            chosen = "adam"
        else:
            chosen = "noise-aware linear" if noise_scale is not None else "linear"
    if chosen == "adam":
        for name, beta in zip(("beta1", "beta2"), betas, strict=True):
            if not 0.0 <= beta < 1.0:
                raise BadInputError(f"{name}: expected a value in [0, 1), got {beta!r}")
        eps = check_positive_float("eps", eps)
        limit = adam_kappa_limit(betas)
        if kappa >= limit:
            return BatchLr(
                lr=ref_lr * math.sqrt(kappa),
                rule="sqrt",
                kappa=kappa,
                betas=betas,
                eps=eps,
                reason=(
                    f"κ = {batch}/{ref_batch} = {kappa:.4g} is beyond the {limit:.4g} up to which "
                    f"Adam's betas can follow Malladi et al.'s rule (β1 = {betas[0]:g} binds): "
                    f"lr × √κ = {ref_lr * math.sqrt(kappa):.4g}, betas and eps left as they are."
                ),
                fell_back=True,
            )
        adam = scale_adam(
            ref_lr, ref_batch=ref_batch, batch=batch, betas=betas, eps=eps, reduction=reduction
        )
        return BatchLr(
            lr=adam.lr,
            rule="adam",
            kappa=kappa,
            betas=adam.betas,
            eps=adam.eps,
            reason=(
                f"{optimizer if rule == 'auto' else 'The Adam rule'}: lr × √κ (κ = {batch}/{ref_batch}),"
                f" betas {betas[0]:g}/{betas[1]:g} → {adam.betas[0]:.4g}/{adam.betas[1]:.6g}, eps "
                f"{eps:g} → {adam.eps:.3g} (Malladi et al. 2022)."
            ),
        )
    if chosen == "noise-aware linear":
        lr = noise_aware_lr(
            ref_lr, ref_batch=ref_batch, batch=batch, noise_scale=noise_scale, reduction=reduction
        )
        reason = (
            f"ε(B) ∝ 1/(1 + B_noise/B) with B_noise = {noise_scale:.4g} (McCandlish et al. 2018) "
            f"gives {lr:.4g} at {batch}."
        )
    else:
        lr = scale_lr(ref_lr, ref_batch=ref_batch, batch=batch, rule=chosen, reduction=reduction)  # type: ignore[arg-type]
        named = {
            "linear": "the linear rule (Goyal et al. 2017)",
            "sqrt": "the square-root rule (Krizhevsky 2014; Hoffer et al. 2017)",
            "none": "no scaling",
        }[chosen]
        reason = f"{named} gives {lr:.4g} at {batch}."
    if reduction == "sum" and chosen != "none":
        reason += " The loss is a sum, so its gradient already grows with the batch."
    return BatchLr(lr=lr, rule=chosen, kappa=kappa, betas=None, eps=None, reason=reason)


def default_warmup_epochs(lr: float, ref_lr: float) -> float:
    """Goyal et al.'s 5 epochs when the lr grows by more than 1 %, else none.

    >>> default_warmup_epochs(0.4, 0.1), default_warmup_epochs(0.1, 0.1)
    (5.0, 0.0)
    """
    return GOYAL_WARMUP_EPOCHS if lr > ref_lr * 1.01 else 0.0


# Warm-up is never more than this share of the steps the plan predicts to the target: a warm-up
# that takes a large part of a short run costs more steps than it saves.
WARMUP_MAX_FRACTION = 0.1


@dataclass(frozen=True)
class Warmup:
    """A linear warm-up from ``start_lr`` over ``steps`` optimizer steps, and why (or why none)."""

    steps: int
    start_lr: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def warmup_from_evidence(
    lr: float,
    *,
    ref_lr: float,
    steps_per_epoch: int,
    stable_lr: float | None = None,
    verified_runs: int = 0,
    predicted_steps: float | None = None,
    adam_beta2: float | None = None,
) -> Warmup:
    """Warm-up only when the evidence says the lr needs it, sized against the run.

    - none when the lr does not grow past ``ref_lr`` (the lr already trained at the reference);
    - none when ``verified_runs`` runs at ``lr`` itself, constant from the first step, trained
      without diverging (the check at the recommended batch);
    - none when ``lr`` is below ``stable_lr``, the lr where the range test's loss broke down at the
      reference batch: that range was shown to train from a fresh start;
    - else a linear warm-up from ``ref_lr``: Goyal et al.'s 5 epochs for SGD, or Ma & Yarats'
      (2021) ``2 / (1 − β2)`` steps for Adam, never more than ``WARMUP_MAX_FRACTION`` of
      ``predicted_steps`` (the steps the plan expects to the target) when that is known.

    >>> warmup_from_evidence(0.4, ref_lr=0.1, steps_per_epoch=100, verified_runs=3).steps
    0
    >>> w = warmup_from_evidence(0.4, ref_lr=0.1, steps_per_epoch=100, predicted_steps=2000)
    >>> w.steps, w.start_lr
    (200, 0.1)
    """
    check_positive_float("lr", lr)
    check_positive_float("ref_lr", ref_lr)
    check_positive_int("steps_per_epoch", steps_per_epoch)
    if lr <= ref_lr * 1.01:
        return Warmup(
            0, lr, f"no warm-up: the lr does not grow past the {ref_lr:.3g} it was found at"
        )
    if verified_runs > 0:
        return Warmup(
            0,
            lr,
            f"no warm-up: {verified_runs} run{'s' if verified_runs > 1 else ''} at {lr:.3g}, "
            "constant from the first step, trained without diverging at this batch",
        )
    if stable_lr is not None and lr < stable_lr:
        return Warmup(
            0,
            lr,
            f"no warm-up: {lr:.3g} is below {stable_lr:.3g}, where the range test's loss broke down "
            "at the reference batch",
        )
    if adam_beta2 is not None and 0.0 < adam_beta2 < 1.0:
        wanted = math.ceil(2.0 / (1.0 - adam_beta2))
        source = f"Ma & Yarats' 2/(1 − β2) = {wanted} steps for Adam"
    else:
        wanted = round(GOYAL_WARMUP_EPOCHS * steps_per_epoch)
        source = f"Goyal et al.'s {GOYAL_WARMUP_EPOCHS:g} epochs = {wanted} steps"
    steps = wanted
    capped = ""
    if predicted_steps is not None and math.isfinite(predicted_steps) and predicted_steps > 0:
        cap = max(1, math.ceil(WARMUP_MAX_FRACTION * predicted_steps))
        if cap < wanted:
            steps = cap
            capped = (
                f", cut to {WARMUP_MAX_FRACTION:.0%} of the ~{predicted_steps:.0f} steps predicted "
                "to the target"
            )
    reason = (
        f"warm up from {ref_lr:.3g} to {lr:.3g} over {steps} steps ({source}{capped}): the lr "
        "grows past what was shown to train from a fresh start"
    )
    return Warmup(steps, ref_lr, reason)


__all__ = [
    "GOYAL_WARMUP_EPOCHS",
    "RULES",
    "WARMUP_MAX_FRACTION",
    "AdamScaling",
    "BatchLr",
    "Rule",
    "RuleChoice",
    "Warmup",
    "adam_kappa_limit",
    "check_rule",
    "default_warmup_epochs",
    "is_adam_family",
    "lr_for_batch",
    "noise_aware_lr",
    "scale_adam",
    "scale_beta",
    "scale_lr",
    "warmup_from_evidence",
]
