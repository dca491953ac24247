"""Which of the model copies an adapter built a list of parameters belongs to.

An adapter's optimizer factory receives parameters only; to build the user's own param groups it
needs the copy they came from. Copies are held by weak references, so none outlives its
measurement.
"""

from __future__ import annotations

import weakref

from torch import nn


def owner_of(built: list[weakref.ref[nn.Module]], params: list[nn.Parameter]) -> nn.Module | None:
    """The copy (newest first) whose parameters are exactly ``params``, if one is still alive."""
    wanted = {id(p) for p in params}
    built[:] = [ref for ref in built if ref() is not None]
    for ref in reversed(built):
        model = ref()
        if model is not None and wanted == {id(p) for p in model.parameters()}:
            return model
    return None
