"""Built-in example tasks that run on a laptop CPU in seconds.

Each is an ordinary task file: copy one (``python -c "import batchpilot.examples.digits as m;
print(m.__file__)"``) and change the model and data to make it yours.
"""

EXAMPLES: dict[str, str] = {
    "digits": "batchpilot.examples.digits:task",
    "spiral": "batchpilot.examples.spiral:task",
    "xor4": "batchpilot.examples.xor4:task",
}

__all__ = ["EXAMPLES"]
