"""Building for a CPU other than the build machine's: the cross toolchain, TVM's runtime
libraries for that architecture, and qemu user-mode emulation to run kernels there.

Why each piece: LLVM (inside TVM) emits object code for any architecture, but linking the
kernels' shared library needs that architecture's C toolchain; the artifact ships TVM's
libtvm_runtime.so, which must be the device's build, not the compiler's (it comes from the
same apache-tvm release's wheel for that platform on PyPI, fetched once into the cache); and
checking kernels exactly on the build machine needs an emulator plus a small host program
(kernel_host.c) that loads them as bitnet_runtime would on the device.

Per-architecture facts are data (``CROSS``); the build machine's own architecture needs none
of this.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bitnet_runtime import cpu
from bitnet_runtime.weights import cache_root

from .errors import UserError

KERNEL_HOST_SOURCE = Path(__file__).with_name("kernel_host.c")


@dataclass(frozen=True)
class CrossArch:
    """What building for and emulating one foreign architecture takes."""

    arch: str
    gcc: str  # C compiler that links the kernels' shared library
    gcc_package: str  # Debian/Ubuntu package that provides it
    sysroot: str  # libraries qemu resolves the program's dynamic loader and libc from
    qemu: tuple[str, ...]  # emulator executables, first found wins
    wheel_platform: str  # PyPI platform tag of TVM's wheels for the architecture


CROSS = {
    "aarch64": CrossArch(
        "aarch64", "aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu", "/usr/aarch64-linux-gnu",
        ("qemu-aarch64-static", "qemu-aarch64"), "manylinux_2_28_aarch64",
    ),
}  # fmt: skip

ANDROID_HINT = (
    "Android targets (*-linux-android triples) link with the Android NDK's clang, which is not "
    "installed: set ANDROID_NDK_HOME to an NDK (r26+) or build for aarch64 Linux (arm-neon)"
)


def is_foreign(arch: str) -> bool:
    return arch != cpu.host_arch()


def _cross(arch: str) -> CrossArch:
    if arch not in CROSS:
        raise UserError(f"cannot build for {arch} on this {cpu.host_arch()} machine: no cross toolchain is known for it")
    return CROSS[arch]


def android_compiler(triple: str) -> Callable | None:
    """The NDK clang for an Android triple, or a clear error naming what is missing."""
    ndk = os.environ.get("ANDROID_NDK_HOME") or os.environ.get("ANDROID_NDK_ROOT")
    if not ndk:
        raise UserError(ANDROID_HINT)
    api = os.environ.get("ANDROID_API", "28")
    clang = Path(ndk) / "toolchains" / "llvm" / "prebuilt" / "linux-x86_64" / "bin" / f"{triple.split('-')[0]}-linux-android{api}-clang"
    if not clang.is_file():
        raise UserError(f"the Android NDK at {ndk} has no {clang.name} (ANDROID_API={api}); {ANDROID_HINT}")
    from tvm.support import cc

    return cc.cross_compiler(str(clang))


def compiler(arch: str, triple: str) -> Callable | None:
    """fcompile for ``export_library``: None (the system compiler) for this machine's arch."""
    if triple.endswith("android"):
        return android_compiler(triple)
    if not is_foreign(arch):
        return None
    cross = _cross(arch)
    if shutil.which(cross.gcc) is None:
        raise UserError(f"linking {arch} kernels needs {cross.gcc} (Debian/Ubuntu: apt install {cross.gcc_package})")
    from tvm.support import cc

    return cc.cross_compiler(cross.gcc)


# ----------------------------------------------------------------------------- runtime libraries


def _versions() -> tuple[str, str]:
    return importlib.metadata.version("apache-tvm"), importlib.metadata.version("apache-tvm-ffi")


def runtime_dir(arch: str) -> Path:
    """Where TVM's runtime libraries for ``arch`` are kept (same release as the compiler)."""
    tvm_version, ffi_version = _versions()
    return cache_root() / "tvm-runtime" / f"{arch}-tvm{tvm_version}-ffi{ffi_version}"


ANDROID_RUNTIME_ENV = "BITNET_ANDROID_TVM_RUNTIME"


def runtime_libraries(arch: str, triple: str = "") -> dict[str, Path]:
    """libtvm_runtime.so and libtvm_ffi.so built for ``arch``: the installed ones for this
    machine, else the cached ones, fetched from PyPI the first time. Android's bionic libc
    needs its own build of TVM's runtime, which PyPI does not have: the user points to one."""
    if triple.endswith("android"):
        given = os.environ.get(ANDROID_RUNTIME_ENV)
        if not given or not Path(given).is_file():
            raise UserError(
                f"an Android artifact ships TVM's libtvm_runtime.so built with the NDK for bionic, which PyPI does not have: "
                f"build it (TVM's CMake with the NDK toolchain file, ANDROID_ABI=arm64-v8a) and set {ANDROID_RUNTIME_ENV} to it"
            )
        return {"runtime": Path(given)}
    if not is_foreign(arch):
        import tvm
        import tvm_ffi

        return {
            "runtime": Path(tvm.__file__).parent / "lib" / "libtvm_runtime.so",
            "ffi": Path(tvm_ffi.__file__).parent / "lib" / "libtvm_ffi.so",
        }
    out = runtime_dir(arch)
    libs = {"runtime": out / "libtvm_runtime.so", "ffi": out / "libtvm_ffi.so"}
    if not all(p.is_file() for p in libs.values()):
        _fetch_runtime(_cross(arch), out)
    return libs


def _fetch_runtime(cross: CrossArch, out: Path) -> None:
    """pip download the two wheels for the platform and keep only their runtime libraries."""
    tvm_version, ffi_version = _versions()
    print(f"fetching TVM {tvm_version}'s {cross.arch} runtime libraries from PyPI (once, into {out}) ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--platform", cross.wheel_platform, "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}",
            f"apache-tvm=={tvm_version}", f"apache-tvm-ffi=={ffi_version}", "-d", tmp,
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(
                f"could not download TVM's {cross.arch} runtime ({last}); put libtvm_runtime.so and libtvm_ffi.so "
                f"of apache-tvm {tvm_version} / apache-tvm-ffi {ffi_version} for {cross.arch} into {out}"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent))  # beside the cache entry, so the rename is atomic
        for wheel in Path(tmp).glob("*.whl"):
            _extract_libraries(wheel, staging)
        if not {"libtvm_runtime.so", "libtvm_ffi.so"} <= {p.name for p in staging.iterdir()}:
            shutil.rmtree(staging)
            raise UserError(f"the {cross.arch} wheels of apache-tvm {tvm_version} lack libtvm_runtime.so or libtvm_ffi.so")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(staging, out)  # appears whole or not at all


def _extract_libraries(wheel: Path, dest: Path) -> None:
    wanted = {"libtvm_runtime.so", "libtvm_ffi.so"}
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if Path(name).name in wanted and "/lib/" in name:
                (dest / Path(name).name).write_bytes(z.read(name))


# ----------------------------------------------------------------------------- emulation


def emulator(arch: str) -> list[str]:
    """The qemu command line prefix that runs an ``arch`` Linux program here."""
    cross = _cross(arch)
    found = next((shutil.which(q) for q in cross.qemu if shutil.which(q)), None)
    if found is None:
        raise UserError(f"running {arch} kernels here needs {cross.qemu[0]} (Debian/Ubuntu: apt install qemu-user-static)")
    if not Path(cross.sysroot).is_dir():
        raise UserError(f"running {arch} kernels here needs the {arch} C library in {cross.sysroot} (apt install {cross.gcc_package})")
    return [found, "-L", cross.sysroot, "-cpu", "max"]


def kernel_host(arch: str) -> Path:
    """kernel_host.c built for ``arch`` (cached by the source's hash)."""
    import tvm_ffi

    source = KERNEL_HOST_SOURCE.read_bytes()
    binary = cache_root() / "kernel-host" / f"{arch}-{hashlib.sha256(source).hexdigest()[:12]}"
    if binary.is_file():
        return binary
    cross = _cross(arch)
    if shutil.which(cross.gcc) is None:
        raise UserError(f"building the {arch} kernel host needs {cross.gcc} (Debian/Ubuntu: apt install {cross.gcc_package})")
    binary.parent.mkdir(parents=True, exist_ok=True)
    include = Path(tvm_ffi.__file__).parent / "include"
    tmp = binary.with_suffix(f".tmp{os.getpid()}")
    cmd = [cross.gcc, "-O2", "-std=c11", "-Wall", "-D_GNU_SOURCE", f"-I{include}", "-o", str(tmp), str(KERNEL_HOST_SOURCE), "-ldl"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"building the {arch} kernel host failed: {done.stderr.strip()[:400]}")
    os.replace(tmp, binary)
    return binary
