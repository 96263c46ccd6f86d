"""Offline CUDA compilation: nvcc turns TVM's generated CUDA into a fatbin at compile time, so
the device needs only the NVIDIA driver, never a compiler.

Why this is more than a flag: TVM's codegen embeds a fatbin only when its CUDA runtime
extension (libtvm_runtime_cuda.so, in the apache-tvm wheel) is loaded in the compiling
process, and that library links against the CUDA runtime (libcudart.so.13, from the CUDA
toolkit that also holds nvcc) and the driver (libcuda.so.1). A build machine without a GPU
has no driver, so, as the CUDA toolkit's own link stubs do, we load a stub libcuda.so.1 whose
every function returns CUDA_ERROR_NO_DEVICE: compiling never calls the driver, it only needs
the library to resolve. The stub is built once (gcc) from the symbols the extension imports.
Then TVM's nvcc callback, inside the target's scope (it reads the arch from there), with fast
math off (act_quant's division must stay exact), compiles each module to a fatbin.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from bitnet_runtime.gpu import CUDA_RUNTIME_FILE
from bitnet_runtime.weights import cache_root

from .errors import UserError

CUDA_ERROR_NO_DEVICE = 100


def nvcc() -> Path:
    found = shutil.which("nvcc") or (Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc" if os.environ.get("CUDA_HOME") else None)
    if not found or not Path(found).is_file():
        raise UserError(
            "compiling for cuda needs nvcc (the CUDA toolkit, 12.x or 13.x) on PATH or in $CUDA_HOME/bin: the artifact carries a fatbin, so the device needs no compiler"
        )
    return Path(found)


def tvm_cuda_runtime() -> Path:
    """TVM's CUDA runtime extension, from the compiler's installation (shipped in the artifact)."""
    import tvm

    path = Path(tvm.__file__).parent / "lib" / CUDA_RUNTIME_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: this apache-tvm build has no CUDA runtime")
    return path


def _toolkit_roots() -> list[Path]:
    """Where the toolkit may live: $CUDA_HOME, beside nvcc (a wrapper script may stand on PATH), /usr/local/cuda."""
    roots = [Path(os.environ["CUDA_HOME"])] if os.environ.get("CUDA_HOME") else []
    return roots + [nvcc().resolve().parent.parent, Path("/usr/local/cuda")]


def cudart() -> Path:
    """libcudart.so.13, the CUDA runtime TVM's CUDA runtime links against."""
    for root in _toolkit_roots():
        for lib in ("lib64", "lib", "targets/x86_64-linux/lib"):
            path = root / lib / "libcudart.so.13"  # the SONAME TVM's CUDA runtime asks for
            if path.is_file():
                return path.resolve() if path.resolve().name == path.name else path
    raise UserError("no libcudart.so.13 found in $CUDA_HOME or /usr/local/cuda (TVM's CUDA runtime links against the CUDA 13 runtime)")


def _driver_stub() -> Path:
    """A libcuda.so.1 exporting every driver function TVM's CUDA runtime imports, all failing."""
    symbols = subprocess.run(["nm", "-D", "--undefined-only", str(tvm_cuda_runtime())], capture_output=True, text=True, check=True).stdout
    imported = {line.split()[-1].split("@")[0] for line in symbols.splitlines() if line.strip()}
    names = sorted({n for n in imported if n.startswith("cu") and n[2:3].isupper()} | {"cuInit", "cuDeviceGetCount"})
    source = "".join(f"int {name}(void) {{ return {CUDA_ERROR_NO_DEVICE}; }}\n" for name in names)
    out = cache_root() / "cuda-driver-stub" / hashlib.sha256(source.encode()).hexdigest()[:12] / "libcuda.so.1"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.with_suffix(".c")
    src.write_text(source)
    tmp = out.with_name(f"libcuda.so.1.tmp{os.getpid()}")
    done = subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(src)], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"building the CUDA driver stub failed: {done.stderr.strip()[:300]}")
    os.replace(tmp, out)
    return out


@lru_cache(maxsize=1)
def load_codegen_runtime() -> str:
    """Load TVM's CUDA runtime into this process (with the driver stub where there is no
    driver); returns which driver it got ("driver" or "stub")."""
    try:
        ctypes.CDLL("libcuda.so.1", mode=os.RTLD_GLOBAL)
        driver = "driver"
    except OSError:
        ctypes.CDLL(str(_driver_stub()), mode=os.RTLD_GLOBAL)
        driver = "stub"
    ctypes.CDLL(str(cudart()), mode=os.RTLD_GLOBAL)
    ctypes.CDLL(str(tvm_cuda_runtime()), mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    return driver


@contextmanager
def _env(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


CALLBACK = "tvm_callback_cuda_compile"


def gencode(arch: str) -> list[str]:
    """nvcc's code for ``arch`` (sm_XY): the SASS for it and its PTX, which the driver compiles
    for any newer GPU at load. SASS alone (TVM's own callback) fails on a newer GPU with
    CUDA_ERROR_NO_BINARY_FOR_GPU: an sm_80 artifact on an H200 (sm_90), seen here."""
    version = arch.removeprefix("sm_")
    return ["-gencode", f"arch=compute_{version},code=sm_{version}", "-gencode", f"arch=compute_{version},code=compute_{version}"]


def compile_fatbin(mod, target):
    """``tvm.compile`` whose CUDA device module holds a fatbin built by nvcc now (``gencode``).
    The callback is registered only for this call: left registered, it would make every later
    CUDA compile in the process (source inspection) call nvcc."""
    import tvm
    import tvm.support.nvcc
    import tvm_ffi

    nvcc_path = nvcc()
    load_codegen_runtime()
    path = f"{nvcc_path.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    arch = gencode(str(target.attrs["arch"]))

    def fatbin(code: str) -> bytes:
        return tvm.support.nvcc.compile_cuda(code, target_format="fatbin", arch=arch, compiler="nvcc")

    tvm_ffi.register_global_func(CALLBACK, fatbin, override=True)
    try:
        with _env(TVM_CUDA_COMPILE_MODE="nvcc", TVM_CUDA_NVCC_NO_FAST_MATH="1", PATH=path), target:
            return tvm.compile(mod, target=target)
    finally:
        tvm_ffi.remove_global_func(CALLBACK)


FATBIN_MAGIC = (0xBA55ED50).to_bytes(4, "little")


def embeds_fatbin(library: Path) -> bool:
    """Whether an exported library carries a fatbin (its header magic) rather than CUDA source."""
    return FATBIN_MAGIC in library.read_bytes()
