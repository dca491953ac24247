"""Where a run of several phases reports its progress: one bar per phase.

:func:`batchpilot.measure.run_noise` takes any object with these three methods; the command line
draws them as rich bars on stderr (``batchpilot.cli.app.PhaseBars``), and :class:`NoProgress`
draws nothing.
"""

from __future__ import annotations

from typing import Protocol


class PhaseProgress(Protocol):
    """Progress of a run, phase by phase."""

    def start(self, phase: str, total: int) -> None: ...

    def update(self, phase: str, completed: int) -> None: ...

    def finish(self, phase: str, note: str = "") -> None: ...


class NoProgress:
    """A :class:`PhaseProgress` that shows nothing."""

    def start(self, phase: str, total: int) -> None:
        pass

    def update(self, phase: str, completed: int) -> None:
        pass

    def finish(self, phase: str, note: str = "") -> None:
        pass


__all__ = ["NoProgress", "PhaseProgress"]
