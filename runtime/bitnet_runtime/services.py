"""TVM's thread pool and workspace allocator for kernels run without the TVM compiler installed.

A kernel that TVM compiled with a ``parallel`` loop or a heap workspace does not link against
them: it calls through pointer slots in its own .so (``__TVMBackendParallelLaunch`` and the
others in ``SERVICE_SLOTS``), and libtvm_ffi fills those slots *when it loads the kernel*, from
the context symbols registered at that moment. With only apache-tvm-ffi in the process nothing
is registered, the slots stay NULL and the first parallel loop segfaults. TVM's
libtvm_runtime.so registers all of them from its static constructors, so loading the copy that
ships with the artifact before the first ``tvm_ffi.load_module`` is all it takes.

Gotchas, all measured with apache-tvm 0.27 / apache-tvm-ffi 0.1.14:
- Order matters twice: libtvm_runtime.so needs libtvm_ffi.so, which only resolves because
  ``import tvm_ffi`` (at the top of this module) already put it in the process; and kernels
  loaded before ``ensure_runtime_services`` keep their NULL slots for good.
- A process holds ONE libtvm_runtime: importing ``tvm`` after a copy was loaded from another
  path aborts the process ("Global Function ... is already registered"). If ``tvm`` is already
  imported, its runtime is reused and nothing is loaded.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from pathlib import Path

import tvm_ffi

from bitnet_runtime.errors import UserError

SERVICE_SLOTS = (
    "__TVMBackendParallelLaunch",
    "__TVMBackendParallelBarrier",
    "__TVMBackendAllocWorkspace",
    "__TVMBackendFreeWorkspace",
)
_CONFIG_THREADPOOL = "runtime.config_threadpool"
_NUM_THREADS = "runtime.NumThreads"
# TVM's ThreadGroup::AffinityMode kBig: the mode a pool configures itself with when created.
_AFFINITY_BIG_CORES = 1

_lock = threading.Lock()


def ensure_runtime_services(runtime_lib: Path | None) -> None:
    """Make TVM's runtime services available to kernels loaded from now on.

    Idempotent: a runtime already in the process (an earlier call, or an imported ``tvm``) is
    kept, because a second copy would abort the process. ``None`` means the artifact ships no
    runtime, which is only fine when one is already present.
    """
    with _lock:
        if _services_present():
            return
        # TVM would default to half the cores (it assumes hyperthreads): use them all.
        os.environ.setdefault("TVM_NUM_THREADS", str(usable_cores()))
        if runtime_lib is None:
            raise UserError("these kernels need TVM's libtvm_runtime.so, and none was given")
        _load_global(Path(runtime_lib))
        if not _services_present():
            raise UserError(f"{runtime_lib} is not TVM's runtime library (it registers no thread pool)")


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_num_threads(n: int) -> None:
    """Run the calling thread's kernels on ``n`` threads; best called before the first kernel.

    TVM's pool is per calling thread and gets its workers once, from TVM_NUM_THREADS, when that
    thread first launches a parallel loop with more than one thread (or queries the pool);
    ``runtime.config_threadpool`` can later only choose how many of those workers take part.
    So the variable is set for pools not created yet (all of them, when the runtime is not even
    loaded), this thread's pool is reconfigured, and a request the pool cannot meet is refused
    instead of silently running on fewer threads. More threads than the machine has CPUs only
    make them wait on each other (and a pool of thousands never starts): capped, with a
    warning. (The machine's count, not this process's affinity: TVM's pool pins the calling
    thread, and processes it starts inherit that mask.)
    """
    if n < 1:
        raise UserError(f"thread count must be at least 1, got {n}")
    cpus = os.cpu_count() or 1
    if n > cpus:
        print(f"warning: {n} threads asked for, but this machine has {cpus} CPUs: using {cpus}", file=sys.stderr)
        n = cpus
    os.environ["TVM_NUM_THREADS"] = str(n)
    if not _services_present():
        return
    tvm_ffi.get_global_func(_CONFIG_THREADPOOL)(_AFFINITY_BIG_CORES, n)
    got = tvm_ffi.get_global_func(_NUM_THREADS)()
    if got != n:
        raise UserError(
            f"cannot use {n} threads: this thread's TVM pool already started with {got}; set the thread count before the first kernel call"
        )


def check_kernel_services(kernel_lib: Path) -> None:
    """Turn the segfault of a kernel loaded before the services into a UserError.

    Reads the kernel's service slots in the copy ``tvm_ffi.load_module`` already loaded
    (RTLD_NOLOAD); call it after loading and before the first call.
    """
    lib = ctypes.CDLL(str(kernel_lib), mode=os.RTLD_NOLOAD | os.RTLD_NOW)
    empty = [name for name in SERVICE_SLOTS if _slot_is_empty(lib, name)]
    if empty:
        raise UserError(
            f"{Path(kernel_lib).name} was loaded without TVM's runtime services "
            f"({', '.join(empty)} unset); call ensure_runtime_services before loading kernels"
        )


def _services_present() -> bool:
    """TVM's runtime registers this global alongside the context symbols kernels need."""
    return tvm_ffi.get_global_func(_CONFIG_THREADPOOL, allow_missing=True) is not None


def _load_global(path: Path) -> None:
    """RTLD_GLOBAL because kernels from TVM's C backend name TVMBackend* as plain undefined
    symbols, which resolve only against a globally loaded library."""
    if not path.is_file():
        raise UserError(f"TVM runtime library not found: {path}")
    try:
        ctypes.CDLL(str(path), mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    except OSError as exc:
        raise UserError(f"cannot load TVM runtime library {path}: {exc}") from None


def _slot_is_empty(lib: ctypes.CDLL, name: str) -> bool:
    """A slot the kernel lacks is a service it never calls, not a missing one."""
    try:
        return ctypes.c_void_p.in_dll(lib, name).value is None
    except ValueError:
        return False
