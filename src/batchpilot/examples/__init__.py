"""Built-in example tasks that run on a laptop CPU in seconds.

Each is an ordinary task file: copy one (``python -c "import batchpilot.examples.digits as m;
print(m.__file__)"``) and change the model and data to make it yours.

:data:`EXAMPLE_INFO` describes each without building it (no torch imported): ``batchpilot
examples`` lists them from it, and the tests check it against the loaded tasks.

>>> EXAMPLES["xor4"]
'batchpilot.examples.xor4:task'
>>> EXAMPLE_INFO["digits"].train_size
1437
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ExampleInfo:
    """What ``batchpilot examples`` shows of a built-in task, as its task file builds it."""

    name: str
    spec: str
    train_size: int
    val_size: int
    reference_batch: int
    reference_lr: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


EXAMPLE_INFO: dict[str, ExampleInfo] = {
    info.name: info
    for info in (
        ExampleInfo("digits", "batchpilot.examples.digits:task", 1437, 360, 64, 0.05),
        ExampleInfo("spiral", "batchpilot.examples.spiral:task", 250, 250, 10, 0.3),
        ExampleInfo("xor4", "batchpilot.examples.xor4:task", 16, 16, 4, 10.0),
    )
}
# name → task spec, what ``--example NAME`` loads
EXAMPLES: dict[str, str] = {name: info.spec for name, info in EXAMPLE_INFO.items()}

__all__ = ["EXAMPLES", "EXAMPLE_INFO", "ExampleInfo"]
