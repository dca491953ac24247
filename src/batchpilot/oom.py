"""Telling an out-of-memory failure from any other error, on every backend torch runs on.

>>> is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
True
>>> is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
False
"""

from __future__ import annotations

import torch

# Messages of the allocators that do not (or did not always) raise torch.OutOfMemoryError.
_OOM_MESSAGES = (
    "out of memory",  # CUDA, ROCm/HIP ("HIP out of memory"), XPU ("XPU out of memory")
    "can't allocate memory",  # CPU: DefaultCPUAllocator
    "not enough memory",  # CPU on Windows: "DefaultCPUAllocator: not enough memory"
    "cannot allocate memory",  # CPU: posix_memalign / errno ENOMEM
    "failed to allocate memory",  # CPU and oneDNN
    # oneDNN (CPU convolutions) reports a failed scratch-pad allocation only as this.
    "could not create a primitive",
    "std::bad_alloc",  # a C++ allocation inside an operator
    "mps backend out of memory",  # Apple MPS
    "cudnn_status_alloc_failed",  # cuDNN workspace
    "cublas_status_alloc_failed",  # cuBLAS handle / workspace
    "hipblas_status_alloc_failed",
    "miopen_status_alloc_failed",
    "ur_result_error_out_of_device_memory",  # XPU through Unified Runtime
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure rather than an error in the user's code."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    message = str(exc).lower()
    return any(pattern in message for pattern in _OOM_MESSAGES)
