"""Parallel kernels with workspace run where only apache-tvm-ffi and numpy are importable, and
the host's ISA features come out in LLVM's spelling."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import HOST, run_without_tvm

from bitnet_runtime import cpu

ROWS, COLS = 64, 128


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """An artifact-like folder: a kernel with parallel loops and a heap workspace, next to a
    copy of TVM's runtime library (copied, so nothing is loaded from the compiler's install)."""
    if cpu.host_arch() != "x86_64":
        pytest.skip("the test kernel is compiled for x86_64")
    tvm = pytest.importorskip("tvm")
    from tvm import s_tir, te

    a = te.placeholder((ROWS, COLS), "float32", name="A")
    b = te.compute((ROWS, COLS), lambda i, j: a[i, j] * 2, name="B")  # 32 KiB: a heap workspace
    c = te.compute((ROWS, COLS), lambda i, j: b[i, COLS - 1 - j] + 1, name="C")
    sch = s_tir.Schedule(te.create_prim_func([a, c]))
    for block in ("B", "C"):
        sch.parallel(sch.get_loops(sch.get_sblock(block))[0])
    mcpu = tvm.get_global_func("target.llvm_get_system_cpu")()
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu})
    out = tmp_path_factory.mktemp("artifact")
    tvm.compile(sch.mod, target=target).export_library(str(out / "kernel.so"))
    shutil.copy(Path(tvm.__file__).parent / "lib" / "libtvm_runtime.so", out)
    return out


def _script(kernel_dir: Path, body: str) -> str:
    """Prelude for the tvm-free child: proves tvm is out of reach, defines the kernel's check."""
    return f"""
import os, sys
from pathlib import Path
import numpy as np
import tvm_ffi
from bitnet_runtime import services
from bitnet_runtime.errors import UserError
from bitnet_runtime.memory import aligned_copy, aligned_empty
try:
    import tvm
    sys.exit("tvm was importable")
except ImportError:
    pass
KERNEL = Path({str(kernel_dir / "kernel.so")!r})
RUNTIME = Path({str(kernel_dir / "libtvm_runtime.so")!r})

def run_kernel(module):
    a = aligned_copy(np.arange({ROWS * COLS}, dtype="float32").reshape({ROWS}, {COLS}) - 100.5)
    c = aligned_empty(a.shape, "float32")
    module["main"](a, c)
    assert np.array_equal(c, a[:, ::-1] * 2 + 1), "wrong result"

def num_threads():
    return tvm_ffi.get_global_func("runtime.NumThreads")()
{body}
maps = Path("/proc/self/maps").read_text()
assert "tvm" not in sys.modules and "site-packages/tvm/" not in maps, "the compiler leaked in"
print("OK")
"""


def _run(kernel_dir: Path, body: str, threads: int = 2) -> None:
    done = run_without_tvm(_script(kernel_dir, body), threads=threads, timeout=60)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stdout + done.stderr


def test_parallel_kernel_with_workspace_runs_without_tvm(kernel_dir: Path) -> None:
    _run(
        kernel_dir,
        """
services.ensure_runtime_services(RUNTIME)
services.ensure_runtime_services(RUNTIME)
module = tvm_ffi.load_module(str(KERNEL))
services.check_kernel_services(KERNEL)
assert num_threads() == 2
for _ in range(3):
    run_kernel(module)
""",
    )


def test_kernel_loaded_before_services_is_refused_not_crashed(kernel_dir: Path) -> None:
    _run(
        kernel_dir,
        """
module = tvm_ffi.load_module(str(KERNEL))
services.ensure_runtime_services(RUNTIME)  # too late for this module: its slots stay empty
try:
    services.check_kernel_services(KERNEL)
    sys.exit("a kernel without services passed the check")
except UserError as err:
    assert "__TVMBackendParallelLaunch" in str(err) and "\\n" not in str(err), err
""",
    )


def test_thread_count_set_before_loading_and_lowered_after_use(kernel_dir: Path) -> None:
    _run(
        kernel_dir,
        """
services.set_num_threads(2)  # the runtime is not loaded yet: only the variable is set
services.ensure_runtime_services(RUNTIME)
module = tvm_ffi.load_module(str(KERNEL))
assert num_threads() == 2
run_kernel(module)
for n in (1, 2):
    services.set_num_threads(n)
    assert num_threads() == n
    run_kernel(module)
""",
        threads=1,
    )


def test_thread_count_cannot_grow_past_a_started_pool(kernel_dir: Path) -> None:
    _run(
        kernel_dir,
        """
import os
os.cpu_count = lambda: 64  # a big machine: 3 threads are not capped, so the pool must refuse them
services.ensure_runtime_services(RUNTIME)
run_kernel(tvm_ffi.load_module(str(KERNEL)))  # starts this thread's pool with 2 workers
try:
    services.set_num_threads(3)
    sys.exit("growing a started pool was accepted")
except UserError as err:
    assert "already started with 2" in str(err), err
""",
    )


def test_bad_runtime_libraries_are_user_errors(kernel_dir: Path, tmp_path: Path) -> None:
    not_elf = tmp_path / "libtvm_runtime.so"
    not_elf.write_text("not a library")
    _run(
        kernel_dir,
        f"""
for bad, message in [
    (None, "none was given"),
    (Path({str(tmp_path / "absent.so")!r}), "not found"),
    (Path({str(not_elf)!r}), "cannot load"),
    (KERNEL, "is not TVM's runtime library"),
]:
    try:
        services.ensure_runtime_services(bad)
        sys.exit(f"{{bad}} was accepted")
    except UserError as err:
        assert message in str(err) and "\\n" not in str(err), err
services.ensure_runtime_services(RUNTIME)
services.ensure_runtime_services(None)  # already present: nothing to load
""",
    )


CPUINFO_X86 = (
    "processor\t: 0\nflags\t\t: fpu sse sse2 pni ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 abm "
    "avx512f avx512bw avx512vl avx512_vnni avx512vbmi avx_vnni hypervisor\n"
)
CPUINFO_ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp i8mm sve sve2\n"


def test_cpuinfo_flags_become_llvm_names() -> None:
    x86 = cpu.to_llvm_features(cpu.parse_cpuinfo(CPUINFO_X86), "x86_64")
    assert x86 == {
        "sse", "sse2", "sse3", "ssse3", "sse4.1", "sse4.2", "avx", "avx2", "fma", "f16c", "bmi",
        "lzcnt", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512vbmi", "avxvnni",
    }  # fmt: skip
    arm = cpu.to_llvm_features(cpu.parse_cpuinfo(CPUINFO_ARM), "aarch64")
    assert arm == {"neon", "aes", "sha2", "crc", "lse", "fullfp16", "dotprod", "i8mm", "sve", "sve2"}
    assert cpu.to_llvm_features(cpu.parse_cpuinfo(CPUINFO_X86), "riscv64") == frozenset()


def test_macos_sysctl_output_becomes_llvm_names() -> None:
    intel = (
        "machdep.cpu.features: FPU SSE SSE2 SSE3 SSSE3 SSE4.1 SSE4.2 AVX1.0 FMA F16C\n"
        "machdep.cpu.leaf7_features: BMI1 AVX2 BMI2 AVX512F AVX512BW AVX512VNNI\n"
        "hw.optional.floatingpoint: 1\n"
    )
    assert cpu.to_llvm_features(cpu.parse_sysctl(intel), "x86_64") == {
        "sse", "sse2", "sse3", "ssse3", "sse4.1", "sse4.2", "avx", "fma", "f16c", "bmi", "avx2",
        "bmi2", "avx512f", "avx512bw", "avx512vnni",
    }  # fmt: skip
    apple = "hw.optional.neon: 1\nhw.optional.arm.FEAT_DotProd: 1\nhw.optional.arm.FEAT_I8MM: 1\nhw.optional.arm.FEAT_SME: 0\n"
    assert cpu.to_llvm_features(cpu.parse_sysctl(apple), "aarch64") == {"neon", "dotprod", "i8mm"}


@pytest.mark.skipif(cpu.host_arch() != "x86_64" or "avx2" not in HOST, reason="needs an x86 Linux host with AVX2")
def test_host_features_agree_with_llvm() -> None:
    """Every name is one LLVM knows, and LLVM's own host detection sees the same set."""
    tvm = pytest.importorskip("tvm")
    features = cpu.host_cpu_features()
    assert "avx2" in features
    detect = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")
    llvm_host = {name: bool(on) for name, on in detect().items()}
    assert features <= set(llvm_host)
    assert features == {name for name in cpu._LLVM_X86 if llvm_host[name]}
