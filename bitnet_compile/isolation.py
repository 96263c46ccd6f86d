"""Child processes that measure: the benchmark and tuning workers.

Measurement runs apart from the command that asked for it: TVM's thread pool takes its size
once per process (TVM_NUM_THREADS), and a candidate kernel that crashes or hangs must take
only its worker down. A device has no torch, while tvm_ffi imports it whenever it is installed
(here: the tests' reference model), adding its libraries to memory and ~1.5 s to each start:
the workers run with torch unimportable.
"""

from __future__ import annotations

import sys

_WITHOUT_TORCH = (
    "import sys, importlib.abc, runpy\n"
    "class _NoTorch(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'torch' or name.startswith('torch.'):\n"
    "            raise ImportError('not on the device')\n"
    "sys.meta_path.insert(0, _NoTorch())\n"
    "runpy.run_module({module!r}, run_name='__main__')\n"
)


def module_command(module: str, *args: str) -> list[str]:
    """argv running ``python -m module args...`` with torch unimportable."""
    return [sys.executable, "-c", _WITHOUT_TORCH.format(module=module), *args]
