"""Results as JSON: non-finite floats and paths made representable, the same everywhere.

>>> to_json({"a": float("inf"), "b": float("nan"), "c": (1, 2)})
'{"a": "inf", "b": null, "c": [1, 2]}'
"""

from __future__ import annotations

import json
import math
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


def to_json(value: Any, *, indent: int | None = None) -> str:
    return json.dumps(json_safe(value), indent=indent)
