"""Results as JSON: non-finite floats and paths made representable, the same everywhere.

>>> to_json({"a": float("inf"), "b": float("nan"), "c": (1, 2)})
'{"a": "inf", "b": null, "c": [1, 2]}'
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """``value`` with tuples as lists, paths as strings, NaN as null and ±inf as "inf"/"-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def fields_dict(result: Any) -> dict[str, Any]:
    """``dataclasses.asdict(result)`` with every tuple as a list: the fields of a result, once and
    in their order, as its ``to_dict`` gives them (which then adds only what is not a field).

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Fit:
    ...     slope: float
    ...     points: tuple[tuple[int, float], ...]
    >>> fields_dict(Fit(2.0, ((1, 2.0), (2, 4.0))))
    {'slope': 2.0, 'points': [[1, 2.0], [2, 4.0]]}
    """
    return _as_lists(asdict(result))


def _as_lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _as_lists(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_as_lists(item) for item in value]
    return value


def to_json(value: Any, *, indent: int | None = None) -> str:
    return json.dumps(json_safe(value), indent=indent)
