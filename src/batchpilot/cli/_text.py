"""User strings in rich output: a name, a path or an error message is text, never markup.

Rich reads ``[...]`` as a style tag, so a task called ``resnet[cifar10]`` would lose its
bracket and one called ``bad[/] name`` would crash the table it is a title of.

>>> plain("resnet[cifar10]")
'resnet\\\\[cifar10]'
"""

from __future__ import annotations

from rich.markup import escape


def plain(value: object) -> str:
    """``value`` as text that rich prints literally."""
    return escape(str(value))


# What each precision runs (docs/precision.md): autocast, and a GradScaler for fp16.
_PRECISION_RUNS = {
    "bf16-mixed": "bf16-mixed (autocast to bfloat16)",
    "16-mixed": "16-mixed (autocast to float16 + GradScaler)",
}


def precision_text(precision: str) -> str:
    """The precision a table's numbers were measured in, or ``""`` for fp32 (the default).

    >>> precision_text("32"), precision_text("16-mixed")
    ('', '16-mixed (autocast to float16 + GradScaler)')
    """
    return "" if precision == "32" else _PRECISION_RUNS.get(precision, precision)


__all__ = ["plain", "precision_text"]
