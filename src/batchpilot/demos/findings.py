"""What every demonstration reports: the seed's claim split into parts, each checked by a number.

A demo never tunes itself until the seed is right: each :class:`Finding` pairs one part of the
claim with what was measured and whether the measurement agrees, and :func:`verdict` says so in
plain words.

>>> parts = (Finding("A", "a = 1", True), Finding("B", "b = 0", False))
>>> verdict(parts)
'partly reproduced: 1 of 2 parts hold (not: B)'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from batchpilot.jsonio import fields_dict


@dataclass(frozen=True)
class Finding:
    """One part of a seed's claim, what the demo measured for it, and whether that agrees."""

    claim: str
    measured: str
    holds: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def demo_dict(result: Any, **extra: Any) -> dict[str, Any]:
    """A demo result as JSON-ready data: its fields, its verdict, whether every part of the claim
    held, and ``extra`` (what is not a field, and nested runs as their own ``to_dict`` gives them)."""
    return {
        **fields_dict(result),
        "verdict": result.verdict,
        "reproduced": all(finding.holds for finding in result.findings),
        **extra,
    }


def verdict(findings: tuple[Finding, ...]) -> str:
    """``reproduced``, ``not reproduced`` or ``partly reproduced`` with the parts that fail."""
    held = sum(finding.holds for finding in findings)
    if held == len(findings):
        return "reproduced"
    if held == 0:
        return "not reproduced"
    failed = "; ".join(finding.claim for finding in findings if not finding.holds)
    return f"partly reproduced: {held} of {len(findings)} parts hold (not: {failed})"


def first_reaching(
    points: tuple[float, ...], values: tuple[float, ...], target: float, *, above: bool
) -> float | None:
    """The first point whose value reaches ``target`` (``>=`` if ``above``, else ``<=``).

    >>> first_reaching((1.0, 2.0, 3.0), (0.5, 0.2, 0.1), 0.2, above=False)
    2.0
    >>> first_reaching((1.0, 2.0), (0.5, 0.6), 0.9, above=True) is None
    True
    """
    for point, value in zip(points, values, strict=True):
        if (value >= target) if above else (value <= target):
            return point
    return None


__all__ = ["Finding", "demo_dict", "first_reaching", "verdict"]
