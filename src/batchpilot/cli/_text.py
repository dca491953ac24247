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


__all__ = ["plain"]
