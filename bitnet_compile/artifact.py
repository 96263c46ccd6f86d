"""Build an artifact: every kernel a model's linear layers need (plan.py), compiled into ONE
library, plus ``manifest.json`` describing it, plus the small TVM runtime library the kernels
call into.

Layout of an artifact directory (manifest format version 3), by target kind (``EMITTERS``):
    CPU (llvm)   kernels.so, libtvm_runtime.so (for the target's architecture)
    CUDA         kernels.so (host launch code + an nvcc fatbin), libtvm_runtime.so,
                 libcudart.so.13 and libtvm_runtime_cuda.so (the CUDA runtime and TVM's CUDA
                 module loader), kernels.cu (the source, for reading)
    Metal        kernels.metal (Metal Shading Language source; the host side is macOS's)
    manifest.json  written last: its presence means the artifact is complete
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bitnet_runtime.decode_step import FUNCTIONS
from bitnet_runtime.manifest import (
    CUDA_SOURCE_FILE,
    DECODER_OPS,
    LIBRARY_FILE,
    MANIFEST_FILE,
    METAL_SOURCE_FILE,
    RUNTIME_LIBRARY_FILE,
    Device,
    FileEntry,
    KernelEntry,
    LinearEntry,
    Manifest,
    OutputLayer,
    Program,
    file_sha256,
)
from bitnet_runtime.progress import progress

from . import __version__, cross, program, schedule_db
from .errors import UserError
from .families import Family, choose
from .models import Decoder, Linear
from .ops import registry
from .plan import launch, plan, plan_output_layer, schedule_summary
from .target import TargetSpec


def tvm_runtime_library(target: TargetSpec) -> Path:
    """TVM's libtvm_runtime.so for the target's architecture, shipped inside the artifact: the
    compiler's own for this machine's, the same release's from PyPI for another (cross.py)."""
    path = cross.runtime_libraries(target.arch, target.triple)["runtime"]
    if not path.is_file():
        raise UserError(f"TVM's runtime library is missing at {path}: reinstall apache-tvm")
    return path


def compile_kernels(kernels: list[KernelEntry], target: TargetSpec, program=None):
    """Schedule every kernel (with progress), then compile them together into one module
    (for CUDA with nvcc run now, so the artifact carries a fatbin). ``program``: the decode
    step's Relax module, compiled on its own and given the kernels as an import."""
    import tvm

    funcs, step_funcs = {}, {}
    for k in progress(kernels, "scheduling", "kernel"):
        (step_funcs if k.op in DECODER_OPS else funcs)[k.name] = registry.get(k.op).build(k.name, k.shape, k.knobs, target)
    module = tvm.IRModule(funcs)
    what = "LLVM" if not target.is_gpu else f"TVM's {target.kind} codegen" + (" and nvcc" if target.kind == "cuda" else "")
    print(
        f"compiling {len(funcs) + len(step_funcs)} kernels for {target.gpu_arch or target.mcpu} ({target.isa}) with {what} ...",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    if target.kind == "cuda":
        from . import cuda_toolchain

        executable = cuda_toolchain.compile_fatbin(module, target.tvm_target())
    else:
        executable = tvm.compile(module, target=target.tvm_target())
    if program is not None:
        from tvm import relax

        # the plain build pipeline: no operator fusion, the program only calls kernels
        step = tvm.compile(program, target=target.tvm_target(), relax_pipeline=relax.pipeline.default_build_pipeline())
        step.mod.import_module(executable.mod)
        # the decode step's own kernels in a library of their own: compiled in one module with
        # the matmuls, they measured the prompt's GEMM kernels 3-5x slower
        step.mod.import_module(tvm.compile(tvm.IRModule(step_funcs), target=target.tvm_target()).mod)
        executable = step
    print(f"compiled in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return executable


def _write(out_dir: Path, name: str, write: Callable[[Path], object]) -> FileEntry:
    """``write(tmp_path)``, then rename into place: a file appears whole or not at all. The
    temporary name is this build's own, and it is removed when writing fails."""
    tmp = out_dir / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        write(tmp)
        os.replace(tmp, out_dir / name)
        return FileEntry(name, file_sha256(out_dir / name))
    except OSError as err:  # a full disk, a read-only directory: one line, and nothing half-written left
        raise UserError(f"cannot write {name} into {out_dir}: {err.strerror or err}") from None
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def build_lock(out_dir: Path) -> Iterator[None]:
    """One build at a time per artifact directory: an advisory lock on the directory itself
    (no lock file left in the artifact), released when the process ends, however it ends; a
    second build waits for the first."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir, os.O_RDONLY)
    except OSError as err:
        raise UserError(f"cannot create the artifact directory {out_dir}: {err.strerror or err}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another build of {out_dir} to finish ...", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


LINK_SPACE = 16 << 20  # free bytes below which a failed link is put down to the full disk


def _export(executable, target: TargetSpec, path: Path) -> None:
    try:
        executable.export_library(str(path), fcompile=cross.compiler(target.arch, target.triple))
    except UserError:
        raise
    except Exception as err:  # the system C compiler links the library; name what failed
        if shutil.disk_usage(path.parent).free < LINK_SPACE:
            raise UserError(f"cannot write {LIBRARY_FILE} into {path.parent}: No space left on device") from None
        lines = [line for line in str(err).splitlines() if line.strip()]
        detail = lines[0] + (f" ... {lines[-1]}" if len(lines) > 1 else "")
        raise UserError(f"linking {LIBRARY_FILE} failed (is a C compiler such as gcc installed?): {detail}") from None


def _emit_cpu(executable, target: TargetSpec, out_dir: Path, kernels: list[KernelEntry]) -> dict:
    return {
        "library": _write(out_dir, LIBRARY_FILE, lambda tmp: _export(executable, target, tmp)),
        "runtime_library": _write(out_dir, RUNTIME_LIBRARY_FILE, lambda tmp: shutil.copyfile(tvm_runtime_library(target), tmp)),
    }


def _emit_cuda(executable, target: TargetSpec, out_dir: Path, kernels: list[KernelEntry]) -> dict:
    from bitnet_runtime.gpu import CUDA_RUNTIME_FILE

    from . import cuda_toolchain

    files = _emit_cpu(executable, target, out_dir, kernels)
    if not cuda_toolchain.embeds_fatbin(out_dir / LIBRARY_FILE):
        raise UserError(f"{LIBRARY_FILE} holds no fatbin: nvcc did not run (TVM left CUDA source, which the device cannot compile)")
    source = executable.mod.imports[0].inspect_source("cuda")
    cudart = cuda_toolchain.cudart()  # redistributable; shipped so the device needs only the driver
    files["device_libraries"] = (
        _write(out_dir, cudart.name, lambda tmp: shutil.copyfile(cudart, tmp)),
        _write(out_dir, CUDA_RUNTIME_FILE, lambda tmp: shutil.copyfile(cuda_toolchain.tvm_cuda_runtime(), tmp)),
    )
    files["sources"] = (_write(out_dir, CUDA_SOURCE_FILE, lambda tmp: tmp.write_text(source)),)
    files["device"] = Device("cuda", "fatbin", {k.name: launch(k) for k in kernels}, arch=target.gpu_arch)
    return files


# TVM's Metal codegen spells round-half-to-even as C's nearbyint, which MSL lacks; MSL's rint
# is the same rounding (to nearest, ties to even).
_MSL_FIXES = {"nearbyint(": "rint("}


def metal_source(executable) -> str:
    source = executable.mod.imports[0].inspect_source("metal")
    for wrong, right in _MSL_FIXES.items():
        source = source.replace(wrong, right)
    return source


def metal_signatures(source: str) -> dict[str, list[dict]]:
    """Each MSL kernel's buffer bindings in order (TVM orders buffers by name, not as the
    PrimFunc's parameters, so a host must bind by this table), and its scalar arguments."""
    signatures = {}
    for match in re.finditer(r"kernel void (\w+)_kernel\((.*?)\)\s*\{", source, re.S):
        args = []
        for name, index in re.findall(r"device \w+\* (\w+)_ptr \[\[ buffer\((\d+)\) \]\]", match[2]):
            args.append({"buffer": int(index), "tensor": name})
        scalars = re.search(r"constant (\w+)& arg \[\[ buffer\((\d+)\) \]\]", match[2])
        if scalars:
            struct = re.search(r"struct " + scalars[1] + r" \{(.*?)\};", source, re.S)
            fields = re.findall(r"(\w+) (\w+);", struct[1]) if struct else []
            args.append({"buffer": int(scalars[2]), "scalars": [f"{t} {n}" for t, n in fields]})
        signatures[match[1]] = args
    return signatures


def _emit_metal(executable, target: TargetSpec, out_dir: Path, kernels: list[KernelEntry]) -> dict:
    source = metal_source(executable)
    device = Device("metal", "msl-source", {k.name: launch(k) for k in kernels}, arguments=metal_signatures(source))
    return {"library": _write(out_dir, METAL_SOURCE_FILE, lambda tmp: tmp.write_text(source)), "runtime_library": None, "device": device}


# target kind -> writer of the artifact's files (returns their manifest fields)
EMITTERS = {"llvm": _emit_cpu, "cuda": _emit_cuda, "metal": _emit_metal}


def _plan_program(
    decoder: Decoder | None, target: TargetSpec, linears: list[LinearEntry], output: OutputLayer | None, kernels: list[KernelEntry]
):
    """The decode step's manifest entry and its Relax module (IR only: compile_kernels compiles
    it); its extra kernels are appended to ``kernels``. (None, None) where there is no step:
    no decoder given, a GPU target, or a model whose linears the step does not have."""
    if decoder is None:
        return None, None
    by_name = {entry.name: entry for entry in linears}
    if target.is_gpu or not {"qkv", "o", "gate_up", "down"} <= set(by_name):
        print("decode step: not compiled for this target or model (tokens run kernel by kernel)", file=sys.stderr)
        return None, None
    roles, extra = program.plan_kernels(decoder, by_name)
    kernels += [k for k in extra if k.name not in {p.name for p in kernels}]
    module, calls = program.module(decoder, by_name, roles, output)
    entry = Program(decoder, functions={fmt: FUNCTIONS[fmt] for fmt in calls}, kernels=roles, kernel_calls=calls)
    return entry, module


def build(
    target: TargetSpec,
    linears: list[Linear],
    out_dir: Path,
    family: Family | None = None,
    model_name: str | None = None,
    output_layer: tuple[int, int] | None = None,
    decoder: Decoder | None = None,
    if_missing: bool = False,
) -> Path:
    """Write a complete artifact to ``out_dir`` (family: the preferred one the target runs;
    output_layer: (vocab, hidden) for a model's logits kernels, CPU targets only; decoder: the
    model's, for the compiled decode step, CPU targets only); files appear only once fully
    written, one build at a time. ``if_missing``: keep a complete artifact already there
    (another process's build that finished while this one waited)."""
    with build_lock(out_dir):
        if if_missing and (out_dir / MANIFEST_FILE).is_file():
            return out_dir / MANIFEST_FILE
        return _build(target, linears, out_dir, family, model_name, output_layer, decoder)


def _build(
    target: TargetSpec,
    linears: list[Linear],
    out_dir: Path,
    family: Family | None,
    model_name: str | None,
    output_layer: tuple[int, int] | None,
    decoder: Decoder | None,
) -> Path:
    import tvm

    family = family or choose(target, "auto", schedule_db.family_preference(target.isa))
    kernels, entries = plan(linears, target, family)
    output_entry = None
    if output_layer and target.is_gpu:
        print(f"output layer: no {target.kind} kernels for it yet; the artifact holds the linear layers only", file=sys.stderr)
    elif output_layer:
        output_entry, output_kernels = plan_output_layer(*output_layer, target)
        kernels += [k for k in output_kernels if k.name not in {p.name for p in kernels}]
    program_entry, add_program = _plan_program(decoder, target, entries, output_entry, kernels)
    print(schedule_summary(kernels, target), file=sys.stderr)
    executable = compile_kernels(kernels, target, add_program)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # an artifact without manifest is incomplete
    manifest = Manifest(
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        compiler={"bitnet_compile": __version__, "tvm": tvm.__version__},
        model=model_name,
        target=target.to_json(),
        required_cpu_features=tuple(target.required_features),
        family=family.name,
        kernels=tuple(kernels),
        linears=tuple(entries),
        output_layer=output_entry,
        program=program_entry,
        **EMITTERS[target.kind](executable, target, out_dir, kernels),
    )
    _write(out_dir, MANIFEST_FILE, lambda tmp: tmp.write_text(manifest.dumps()))
    return out_dir / MANIFEST_FILE
