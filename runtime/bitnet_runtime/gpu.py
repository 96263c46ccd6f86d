"""GPU kernels on the device: TVM's CUDA runtime, device buffers, and calls that take numpy.

A CUDA artifact's kernels.so holds host launch code plus the device code (an nvcc fatbin).
Loading it needs TVM's CUDA module loader, ``libtvm_runtime_cuda.so``, which links against the
CUDA 13 runtime (libcudart.so.13) and the NVIDIA driver (libcuda.so.1). The artifact ships the
first two, so a device needs only the driver; a machine without it (or without a GPU) gets a
one-line error, never a crash.

``DeviceFunction`` makes a GPU kernel callable like a CPU one: numpy arrays in, results
written back into them. It copies every argument to device buffers (allocated once per shape)
and back, which is what verify needs; a model would keep its weights resident instead. The
buffers come from TVM's runtime functions through tvm_ffi, so the same code runs for any
device TVM knows, the CPU included (that is how it is tested without a GPU).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

CUDA_RUNTIME_FILE = "libtvm_runtime_cuda.so"
CUDA_LOADER = "ffi.Module.load_from_bytes.cuda"  # registered by libtvm_runtime_cuda.so
DRIVER_HINT = {
    "libcuda.so": "the NVIDIA driver (libcuda.so.1): this machine has no NVIDIA GPU driver",
    "libcudart.so": "the CUDA 13 runtime (libcudart.so.13, shipped in the artifact: copy the whole directory)",
}


def cuda_device_count() -> int:
    """NVIDIA GPUs the driver sees (0 without a driver), asked of libcuda directly."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if not hasattr(cuda, "cuDeviceGetCount") or cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def ensure_cuda_runtime(libraries: list[Path]) -> None:
    """Load the artifact's CUDA runtime and TVM's CUDA module loader, in order (RTLD_GLOBAL,
    after libtvm_runtime), or say what is missing. A loader already in the process (the
    compiler's) is kept: a second copy would abort the process, as with libtvm_runtime."""
    import tvm_ffi

    if tvm_ffi.get_global_func(CUDA_LOADER, allow_missing=True) is not None:
        libraries = []
    try:
        for library in libraries:
            ctypes.CDLL(str(library), mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    except OSError as err:
        text = str(err)
        missing = next((hint for lib, hint in DRIVER_HINT.items() if lib in text), text)
        raise UserError(f"this artifact runs on an NVIDIA GPU and needs {missing}") from None
    if cuda_device_count() == 0:
        raise UserError("this artifact runs on an NVIDIA GPU, and the driver sees none on this machine")


class DeviceFunction:
    """A kernel on ``device`` (a tvm_ffi Device) called with numpy arrays, like a CPU kernel."""

    def __init__(self, function: Callable[..., Any], device: Any):
        import tvm_ffi

        self.function, self.device = function, device
        self._alloc = tvm_ffi.get_global_func("runtime.TVMTensorAllocWithScope")
        self._copy = tvm_ffi.get_global_func("runtime.TVMTensorCopyFromTo")
        self._buffers: dict[tuple, Any] = {}

    def _buffer(self, index: int, array: np.ndarray) -> Any:
        import tvm_ffi

        key = (index, array.shape, array.dtype.str)
        if key not in self._buffers:
            self._buffers[key] = self._alloc(tvm_ffi.Shape(array.shape), tvm_ffi.dtype(str(array.dtype)), self.device, None)
        return self._buffers[key]

    def __call__(self, *arrays: np.ndarray) -> None:
        import tvm_ffi

        hosts = [np.ascontiguousarray(a) for a in arrays]
        buffers = [self._buffer(i, a) for i, a in enumerate(hosts)]
        for host, buffer in zip(hosts, buffers):
            self._copy(tvm_ffi.from_dlpack(host), buffer)
        try:
            self.function(*buffers)
        except RuntimeError as err:  # the driver's refusal (no code for this GPU, out of memory): one line
            raise UserError(f"the GPU could not run the kernel: {str(err).splitlines()[-1]}") from None
        for array, host, buffer in zip(arrays, hosts, buffers):
            self._copy(buffer, tvm_ffi.from_dlpack(host))  # a device-to-host copy waits for the kernel
            if host is not array:
                array[...] = host
