"""Build an artifact: every kernel a model's linear layers need, in ONE shared library, plus
``manifest.json`` describing it, plus the small TVM runtime library parallel kernels call into.

Layout of an artifact directory (format version 1):
    kernels.so          the generated kernels (host code for the target)
    libtvm_runtime.so   TVM's runtime services (thread pool, workspaces) the kernels call
    manifest.json       written last: its presence means the artifact is complete
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bitnet_runtime import layout
from bitnet_runtime.manifest import FORMAT_VERSION, LIBRARY_FILE, MANIFEST_FILE, RUNTIME_LIBRARY_FILE

from . import __version__, schedule_db
from .errors import UserError
from .intrinsics.x86_lut import VECTOR_ISAS
from .models import Linear
from .ops import act_quant, dequant, lut_matmul, lut_table
from .target import TargetSpec


@dataclass
class KernelPlan:
    """One kernel to generate: which operator, for which shape, with which knobs."""

    name: str
    op: str
    shape: dict
    knobs: dict = field(default_factory=dict)
    knob_source: str = "fixed"

    def primfunc(self, isa: str):
        s = self.shape
        if self.op == "quantize":
            return act_quant.build_primfunc(self.name, s["k"], s["k_padded"])
        if self.op == "lut_table":
            return lut_table.build_primfunc(self.name, s["k_padded"])
        if self.op == "dequantize":
            return dequant.build_primfunc(self.name, s["n"], s["n_padded"])
        knobs = lut_matmul.LutKnobs(**self.knobs)
        return lut_matmul.build_primfunc(self.name, s["n_padded"], s["k_padded"], isa, knobs, gemv=self.op == "lut_gemv")


def plan(linears: list[Linear], isa: str) -> tuple[list[KernelPlan], list[dict]]:
    """Kernels for the distinct shapes among ``linears``, and each linear's kernel names.

    The GEMM takes the GEMV's kblock: kblock fixes the padded K and so the packed weights,
    and one packed copy must serve both decode and prompt processing.
    """
    rows = VECTOR_ISAS[isa].rows
    kernels: dict[str, KernelPlan] = {}
    entries = []
    for lin in linears:
        gemv_knobs, gemv_src = schedule_db.knobs_for("lut_gemv", isa)
        gemm_knobs, gemm_src = schedule_db.knobs_for("lut_gemm", isa)
        kblock = layout.effective_kblock(lin.k, gemv_knobs.kblock)
        n_p, k_p = layout.padded_shape(lin.n, lin.k, rows, kblock)
        shape = {"n": lin.n, "k": lin.k, "n_padded": n_p, "k_padded": k_p}
        names = {
            "quantize": f"quantize_k{lin.k}_p{k_p}",
            "lut_table": f"lut_table_k{k_p}",
            "lut_gemv": f"lut_gemv_n{lin.n}_k{lin.k}",
            "lut_gemm": f"lut_gemm_n{lin.n}_k{lin.k}",
            "dequantize": f"dequantize_n{lin.n}_p{n_p}",
        }
        matmul_knobs = {
            "lut_gemv": (asdict(gemv_knobs) | {"kblock": kblock}, gemv_src),
            "lut_gemm": (asdict(gemm_knobs) | {"kblock": kblock}, gemm_src),
        }
        for op, name in names.items():
            if name not in kernels:
                knobs, source = matmul_knobs.get(op, ({}, "fixed"))
                kernels[name] = KernelPlan(name, op, shape, knobs, source)
        entries.append({"name": lin.name, **shape, "kernels": names})
    return list(kernels.values()), entries


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tvm_runtime_library() -> Path:
    """TVM's libtvm_runtime.so from the compiler's installation, shipped inside the artifact."""
    import tvm

    path = Path(tvm.__file__).parent / "lib" / "libtvm_runtime.so"
    if not path.is_file():
        raise UserError(f"TVM's runtime library is missing at {path}: reinstall apache-tvm")
    return path


def _progress(items, desc: str):
    """A progress bar when a person is watching, plain iteration in logs and tests."""
    if not sys.stderr.isatty():
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="kernel", leave=False)


def compile_kernels(kernels: list[KernelPlan], target: TargetSpec):
    """Schedule every kernel (with progress), then compile them together into one module."""
    import tvm

    funcs = {}
    for k in _progress(kernels, "scheduling"):
        funcs[k.name] = k.primfunc(target.isa)
    print(f"compiling {len(funcs)} kernels for {target.mcpu} ({target.isa}) with LLVM ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    executable = tvm.compile(tvm.IRModule(funcs), target=target.tvm_target())
    print(f"compiled in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return executable


def build(target: TargetSpec, linears: list[Linear], out_dir: Path, model_name: str | None = None) -> Path:
    """Write a complete artifact to ``out_dir``; files appear only once fully written."""
    import tvm

    kernels, entries = plan(linears, target.isa)
    executable = compile_kernels(kernels, target)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # an artifact without manifest is incomplete
    lib_tmp = out_dir / (LIBRARY_FILE + ".tmp")
    executable.export_library(str(lib_tmp))
    os.replace(lib_tmp, out_dir / LIBRARY_FILE)
    rt_tmp = out_dir / (RUNTIME_LIBRARY_FILE + ".tmp")
    shutil.copyfile(tvm_runtime_library(), rt_tmp)
    os.replace(rt_tmp, out_dir / RUNTIME_LIBRARY_FILE)
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "compiler": {"bitnet_compile": __version__, "tvm": tvm.__version__},
        "model": model_name,
        "target": target.to_json(),
        "required_cpu_features": target.required_features,
        "layout": {"version": layout.LAYOUT_VERSION, "rows": VECTOR_ISAS[target.isa].rows},
        "library": {"file": LIBRARY_FILE, "sha256": sha256(out_dir / LIBRARY_FILE)},
        "runtime_library": {"file": RUNTIME_LIBRARY_FILE, "sha256": sha256(out_dir / RUNTIME_LIBRARY_FILE)},
        "kernels": [{"name": k.name, "op": k.op, "shape": k.shape, "knobs": k.knobs, "knob_source": k.knob_source} for k in kernels],
        "linears": entries,
    }
    man_tmp = out_dir / (MANIFEST_FILE + ".tmp")
    man_tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(man_tmp, out_dir / MANIFEST_FILE)
    return out_dir / MANIFEST_FILE
