"""Build an artifact: every kernel a model's linear layers need, in ONE library, plus
``manifest.json`` describing it, plus the small TVM runtime library the kernels call into.

Layout of an artifact directory (format version 2), by target kind (``EMITTERS``):
    CPU (llvm)   kernels.so, libtvm_runtime.so (for the target's architecture)
    CUDA         kernels.so (host launch code + an nvcc fatbin), libtvm_runtime.so,
                 libcudart.so.13 and libtvm_runtime_cuda.so (the CUDA runtime and TVM's CUDA
                 module loader), kernels.cu (the source, for reading)
    Metal        kernels.metal (Metal Shading Language source; the host side is macOS's)
    manifest.json  written last: its presence means the artifact is complete
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bitnet_runtime import layout, layout_dot2, layout_f16, layout_i8
from bitnet_runtime.progress import progress
from bitnet_runtime.manifest import (
    CUDA_SOURCE_FILE, LIBRARY_FILE, MANIFEST_FILE, METAL_SOURCE_FILE, RUNTIME_LIBRARY_FILE, Device, FileEntry, KernelEntry,
    LinearEntry, Manifest, OutputFormat, OutputLayer, file_sha256,
)

from . import __version__, cross, schedule_db
from .errors import UserError
from .intrinsics.lut_shuffle import VECTOR_ISAS
from .families import Family, choose
from .models import Linear
from .ops import act_quant, dequant, dot2_matmul, f16_gemv, gpu_matmul, i8_gemv, lut_matmul, lut_table
from .target import GPU_KINDS, TargetSpec


@dataclass
class KernelPlan:
    """One kernel to generate: which operator, for which shape, with which knobs."""

    name: str
    op: str
    shape: dict
    knobs: dict = field(default_factory=dict)
    knob_source: str = "fixed"

    def primfunc(self, isa: str):
        return BUILDERS[self.op](self, isa)


def _lut_builder(gemv: bool):
    return lambda p, isa: lut_matmul.build_primfunc(p.name, p.shape["n_padded"], p.shape["k_padded"], isa, lut_matmul.LutKnobs(**p.knobs), gemv)


def _gpu2_builder(gemv: bool):
    return lambda p, isa: gpu_matmul.build_primfunc(p.name, p.shape["n_padded"], p.shape["k_padded"], gpu_matmul.GpuKnobs(**p.knobs), gemv, isa)


def _on_gpu(isa: str, gpu_build, cpu_build):
    """quantize and dequantize compute the same on every target; only their schedule differs."""
    return gpu_build if isa in GPU_KINDS else cpu_build


def _dot2_builder(gemv: bool):
    return lambda p, isa: dot2_matmul.build_primfunc(p.name, p.shape["n_padded"], p.shape["k_padded"], dot2_matmul.Dot2Knobs(**p.knobs), gemv, isa)


# operator -> PrimFunc builder: what each manifest "op" is generated from
BUILDERS = {
    "quantize": lambda p, isa: _on_gpu(isa, act_quant.build_primfunc_gpu, act_quant.build_primfunc)(p.name, p.shape["k"], p.shape["k_padded"]),
    "lut_table": lambda p, isa: lut_table.build_primfunc(p.name, p.shape["k_padded"]),
    "dequantize": lambda p, isa: _on_gpu(isa, dequant.build_primfunc_gpu, dequant.build_primfunc)(p.name, p.shape["n"], p.shape["n_padded"]),
    "gpu2_gemv": _gpu2_builder(True),
    "gpu2_gemm": _gpu2_builder(False),
    "lut_gemv": _lut_builder(True),
    "lut_gemm": _lut_builder(False),
    "dot2_gemv": _dot2_builder(True),
    "dot2_gemm": _dot2_builder(False),
    "f16_gemv": lambda p, isa: f16_gemv.build_primfunc(p.name, p.shape["n_padded"], p.shape["k"], f16_gemv.F16Knobs(**p.knobs)),
    "i8_gemv": lambda p, isa: i8_gemv.build_primfunc(p.name, p.shape["n_padded"], p.shape["k_padded"], p.shape["variant"], i8_gemv.I8Knobs(**p.knobs)),
}


def _lut_linear(lin: Linear, target: TargetSpec) -> tuple[dict, dict, list[KernelPlan]]:
    """lut4-v1: the GEMM takes the GEMV's kblock, since kblock fixes the padded K and so the
    packed weights, and one packed copy serves decode and prompt alike (a tuned GEMM record
    contributes its best trial with that kblock)."""
    rows = VECTOR_ISAS[target.isa].rows
    gemv, gemv_src = schedule_db.knobs_for("lut_gemv", target, lin.n, lin.k)
    kblock = layout.effective_kblock(lin.k, gemv["kblock"])
    same_k = lambda knobs: layout.effective_kblock(lin.k, knobs["kblock"]) == kblock  # noqa: E731
    gemm, gemm_src = schedule_db.knobs_for("lut_gemm", target, lin.n, lin.k, accept=same_k)
    n_p, k_p = layout.padded_shape(lin.n, lin.k, rows, kblock)
    shape = {"n": lin.n, "k": lin.k, "n_padded": n_p, "k_padded": k_p}
    params = {"rows": rows, "kblock": kblock}
    names = {"lut_table": f"lut_table_k{k_p}", "gemv": f"lut_gemv_n{lin.n}_k{lin.k}", "gemm": f"lut_gemm_n{lin.n}_k{lin.k}"}
    plans = [
        KernelPlan(names["lut_table"], "lut_table", shape),
        KernelPlan(names["gemv"], "lut_gemv", shape | {"rows": rows}, gemv | {"kblock": kblock}, gemv_src),
        KernelPlan(names["gemm"], "lut_gemm", shape | {"rows": rows}, gemm | {"kblock": kblock}, gemm_src),
    ]
    return params, names, plans


def _dot2_linear(lin: Linear, target: TargetSpec) -> tuple[dict, dict, list[KernelPlan]]:
    """dot2-v1: the GEMV (decode, the bulk of a model's time) decides the padding of N and K;
    the GEMM takes its tuned knobs whose row blocks divide that padding, else its defaults,
    and N is then padded for both kernels' row blocks."""
    gemv, gemv_src = schedule_db.knobs_for("dot2_gemv", target, lin.n, lin.k)
    gemv_blocks = layout_dot2.padded_shape(lin.n, lin.k, gemv.get("row_blocks", 1), 1)[0] // layout_dot2.ROWS
    fits = lambda knobs: gemv_blocks % knobs.get("row_blocks", 1) == 0  # noqa: E731
    gemm, gemm_src = schedule_db.knobs_for("dot2_gemm", target, lin.n, lin.k, accept=fits)
    row_blocks = math.lcm(gemv.get("row_blocks", 1), gemm.get("row_blocks", 1))
    n_p, k_p = layout_dot2.padded_shape(lin.n, lin.k, row_blocks, gemv.get("k_unroll", 1))
    shape = {"n": lin.n, "k": lin.k, "n_padded": n_p, "k_padded": k_p}
    gemm_knobs = asdict(dot2_matmul.Dot2Knobs(**gemm))
    names = {"gemv": f"dot2_gemv_n{lin.n}_k{lin.k}", "gemm": f"dot2_gemm_n{lin.n}_k{lin.k}"}
    plans = [
        KernelPlan(names["gemv"], "dot2_gemv", shape, asdict(dot2_matmul.Dot2Knobs(**gemv)), gemv_src),
        KernelPlan(names["gemm"], "dot2_gemm", shape, gemm_knobs, gemm_src),
    ]
    return {"token_tile": gemm_knobs["token_tile"]}, names, plans


def _gpu2_linear(lin: Linear, target: TargetSpec) -> tuple[dict, dict, list[KernelPlan]]:
    """dot2-v1 on a GPU: N padded for both kernels' rows per block, K to whole chunks."""
    gemv, gemv_src = schedule_db.knobs_for("gpu2_gemv", target, lin.n, lin.k)
    gemm, gemm_src = schedule_db.knobs_for("gpu2_gemm", target, lin.n, lin.k)
    gemv, gemm = asdict(gpu_matmul.GpuKnobs(**gemv)), asdict(gpu_matmul.GpuKnobs(**gemm))
    rows = math.lcm(layout_dot2.ROWS, gemv["rows_per_block"], gemm["rows_per_block"])
    n_p, k_p = layout.round_up(lin.n, rows), layout.round_up(lin.k, layout_dot2.CHUNK)
    shape = {"n": lin.n, "k": lin.k, "n_padded": n_p, "k_padded": k_p}
    names = {"gemv": f"gpu2_gemv_n{lin.n}_k{lin.k}", "gemm": f"gpu2_gemm_n{lin.n}_k{lin.k}"}
    plans = [
        KernelPlan(names["gemv"], "gpu2_gemv", shape, gemv, gemv_src),
        KernelPlan(names["gemm"], "gpu2_gemm", shape, gemm, gemm_src),
    ]
    return {"token_tile": gemm["token_tile"]}, names, plans


# kernel family -> planner of one linear layer: (layout params, kernel names, kernels)
LINEAR_PLANNERS = {"lut": _lut_linear, "dot2": _dot2_linear, "gpu2": _gpu2_linear}


def launch(k: KernelPlan) -> dict:
    """A GPU kernel's grid and threadgroup (x first; a string is a runtime extent)."""
    if k.op in ("gpu2_gemv", "gpu2_gemm"):
        return gpu_matmul.launch(k.shape, k.knobs, k.op == "gpu2_gemv")
    if k.op == "quantize":
        return act_quant.launch_gpu()
    return dequant.launch_gpu(k.shape["n"])


def plan(linears: list[Linear], target: TargetSpec, family: Family) -> tuple[list[KernelPlan], list[dict]]:
    """Kernels for the distinct shapes among ``linears``, and each linear's manifest entry."""
    kernels: dict[str, KernelPlan] = {}
    entries = []
    for lin in linears:
        params, names, plans = LINEAR_PLANNERS[family.name](lin, target)
        shape = plans[0].shape
        n_p, k_p = shape["n_padded"], shape["k_padded"]
        names = {"quantize": f"quantize_k{lin.k}_p{k_p}", **names, "dequantize": f"dequantize_n{lin.n}_p{n_p}"}
        plans = [KernelPlan(names["quantize"], "quantize", shape), *plans, KernelPlan(names["dequantize"], "dequantize", shape)]
        for p in plans:
            kernels.setdefault(p.name, p)
        entries.append({"name": lin.name, **shape, "layout": family.layout, "layout_params": params, "kernels": names})
    return list(kernels.values()), entries


def _f16_output(vocab: int, hidden: int, target: TargetSpec) -> tuple[dict, list[KernelPlan]]:
    knobs, source = schedule_db.knobs_for("f16_gemv", target, vocab, hidden)
    shape = {"n": vocab, "k": hidden, "n_padded": layout_f16.padded_rows(vocab), "k_padded": hidden}
    name = f"f16_gemv_n{vocab}_k{hidden}"
    return {"layout": layout_f16.VERSION, "kernels": {"gemv": name}}, [KernelPlan(name, "f16_gemv", shape, knobs, source)]


def _i8_output(vocab: int, hidden: int, target: TargetSpec) -> tuple[dict, list[KernelPlan]]:
    """int8 rows: the hidden state quantized like a BitLinear input, an int8 GEMV, and the
    per-row scale applied by the dequantize kernel."""
    knobs, source = schedule_db.knobs_for("i8_gemv", target, vocab, hidden)
    n_p, k_p = layout_i8.padded_shape(vocab, hidden)
    shape = {"n": vocab, "k": hidden, "n_padded": n_p, "k_padded": k_p}
    names = {"quantize": f"quantize_k{hidden}_p{k_p}", "gemv": f"i8_gemv_n{vocab}_k{hidden}", "dequantize": f"dequantize_n{vocab}_p{n_p}"}
    plans = [
        KernelPlan(names["quantize"], "quantize", shape),
        KernelPlan(names["gemv"], "i8_gemv", shape | {"variant": i8_gemv.variant_for(target.isa, target.features)}, knobs, source),
        KernelPlan(names["dequantize"], "dequantize", shape),
    ]
    return {"layout": layout_i8.VERSION, "n_padded": n_p, "k_padded": k_p, "kernels": names}, plans


# output-layer format -> planner: (manifest entry of the format, kernels it needs)
OUTPUT_PLANNERS = {"f16": _f16_output, "i8": _i8_output}


def plan_output_layer(vocab: int, hidden: int, target: TargetSpec) -> tuple[dict, list[KernelPlan]]:
    """The output layer's manifest entry, every format in it, and the kernels they need."""
    formats, kernels = {}, []
    for fmt, planner in OUTPUT_PLANNERS.items():
        formats[fmt], plans = planner(vocab, hidden, target)
        kernels += plans
    return {"n": vocab, "k": hidden, "formats": formats}, kernels


def schedule_summary(kernels: list[KernelPlan], target: TargetSpec) -> str:
    """One line saying which tunable kernels got tuned knobs and which run on defaults."""
    from .tuning import records

    tunable = [k for k in kernels if k.knob_source != "fixed"]
    if target.is_gpu:
        return f"schedules: defaults for all {len(tunable)} tunable kernels ({target.kind} kernels are not tuned yet: tuning times them on a GPU)"
    tuned = [k for k in tunable if k.knob_source.startswith("tuned")]
    paths = records.paths_for(target)
    path = next((p for p in paths if p.is_file()), paths[0])
    if not tuned:
        return f"schedules: defaults for all {len(tunable)} tunable kernels (no tuning record for this target in {path}; bitnet-compile tune makes one)"
    rest = [k.name for k in tunable if k not in tuned]
    text = f"schedules: {len(tuned)} of {len(tunable)} tunable kernels tuned (records {path})"
    return text + (f"; defaults for {', '.join(rest)} (no matching record)" if rest else "")


def tvm_runtime_library(target: TargetSpec) -> Path:
    """TVM's libtvm_runtime.so for the target's architecture, shipped inside the artifact: the
    compiler's own for this machine's, the same release's from PyPI for another (cross.py)."""
    path = cross.runtime_libraries(target.arch, target.triple)["runtime"]
    if not path.is_file():
        raise UserError(f"TVM's runtime library is missing at {path}: reinstall apache-tvm")
    return path


def compile_kernels(kernels: list[KernelPlan], target: TargetSpec):
    """Schedule every kernel (with progress), then compile them together into one module
    (for CUDA with nvcc run now, so the artifact carries a fatbin)."""
    import tvm

    funcs = {}
    for k in progress(kernels, "scheduling", "kernel"):
        funcs[k.name] = k.primfunc(target.isa)
    what = "LLVM" if not target.is_gpu else f"TVM's {target.kind} codegen" + (" and nvcc" if target.kind == "cuda" else "")
    print(f"compiling {len(funcs)} kernels for {target.gpu_arch or target.mcpu} ({target.isa}) with {what} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    if target.kind == "cuda":
        from . import cuda_toolchain

        executable = cuda_toolchain.compile_fatbin(tvm.IRModule(funcs), target.tvm_target())
    else:
        executable = tvm.compile(tvm.IRModule(funcs), target=target.tvm_target())
    print(f"compiled in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return executable


def _write(out_dir: Path, name: str, write) -> FileEntry:
    """``write(tmp_path)``, then rename into place: a file appears whole or not at all."""
    tmp = out_dir / (name + ".tmp")
    write(tmp)
    os.replace(tmp, out_dir / name)
    return FileEntry(name, file_sha256(out_dir / name))


def _export(executable, target: TargetSpec, path: Path) -> None:
    try:
        executable.export_library(str(path), fcompile=cross.compiler(target.arch, target.triple))
    except UserError:
        raise
    except Exception as err:  # the system C compiler links the library; name what failed
        raise UserError(f"linking {LIBRARY_FILE} failed (is a C compiler such as gcc installed?): {str(err).splitlines()[0]}") from None


def _emit_cpu(executable, target: TargetSpec, out_dir: Path, kernels: list[KernelPlan]) -> dict:
    """Returns (as all the emitters) the Manifest fields of the files it wrote."""
    return {
        "library": _write(out_dir, LIBRARY_FILE, lambda tmp: _export(executable, target, tmp)),
        "runtime_library": _write(out_dir, RUNTIME_LIBRARY_FILE, lambda tmp: shutil.copyfile(tvm_runtime_library(target), tmp)),
    }


def _emit_cuda(executable, target: TargetSpec, out_dir: Path, kernels: list[KernelPlan]) -> dict:
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


def _emit_metal(executable, target: TargetSpec, out_dir: Path, kernels: list[KernelPlan]) -> dict:
    source = metal_source(executable)
    device = Device("metal", "msl-source", {k.name: launch(k) for k in kernels}, arguments=metal_signatures(source))
    return {"library": _write(out_dir, METAL_SOURCE_FILE, lambda tmp: tmp.write_text(source)), "runtime_library": None, "device": device}


# target kind -> writer of the artifact's files (returns their manifest entries)
EMITTERS = {"llvm": _emit_cpu, "cuda": _emit_cuda, "metal": _emit_metal}


def build(
    target: TargetSpec,
    linears: list[Linear],
    out_dir: Path,
    family: Family | None = None,
    model_name: str | None = None,
    output_layer: tuple[int, int] | None = None,
) -> Path:
    """Write a complete artifact to ``out_dir`` (family: the preferred one the target runs;
    output_layer: (vocab, hidden) for a model's logits kernels, CPU targets only); files
    appear only once fully written."""
    import tvm

    family = family or choose(target, "auto", schedule_db.family_preference(target.isa))
    kernels, entries = plan(linears, target, family)
    output_entry = None
    if output_layer and target.is_gpu:
        print(f"output layer: no {target.kind} kernels for it yet; the artifact holds the linear layers only", file=sys.stderr)
    elif output_layer:
        output_entry, output_kernels = plan_output_layer(*output_layer, target)
        kernels += [k for k in output_kernels if k.name not in {p.name for p in kernels}]
    print(schedule_summary(kernels, target), file=sys.stderr)
    executable = compile_kernels(kernels, target)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # an artifact without manifest is incomplete
    files = EMITTERS[target.kind](executable, target, out_dir, kernels)
    manifest = Manifest(
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        compiler={"bitnet_compile": __version__, "tvm": tvm.__version__},
        model=model_name,
        target=target.to_json(),
        required_cpu_features=tuple(target.required_features),
        family=family.name,
        kernels=tuple(KernelEntry(k.name, k.op, k.shape, k.knobs, k.knob_source) for k in kernels),
        linears=tuple(LinearEntry(**e) for e in entries),
        output_layer=output_entry and OutputLayer(output_entry["n"], output_entry["k"], {f: OutputFormat(**e) for f, e in output_entry["formats"].items()}),
        **files,
    )
    man_tmp = out_dir / (MANIFEST_FILE + ".tmp")
    man_tmp.write_text(manifest.dumps())
    os.replace(man_tmp, out_dir / MANIFEST_FILE)
    return out_dir / MANIFEST_FILE
