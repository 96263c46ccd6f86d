"""Which kernels a model's layers need on a target: for each kernel its operator, padded
shape and knobs (a tuning record's, else the defaults), as the manifest's kernel and linear
entries, before anything is compiled.

Padding is decided by the operators' own ``kernel_shape``; what is planned here is what the
kernels of one layer must agree on, because they share its packed weights: the LUT GEMM takes
the GEMV's k-block, the dot2 kernels pad N for both kernels' row blocks.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

from bitnet_runtime import layout, layout_dot2, layout_f16, layout_i8
from bitnet_runtime.manifest import KernelEntry, LinearEntry, OutputFormat, OutputLayer

from . import records, schedule_db
from .families import Family
from .models import Linear
from .ops import registry
from .target import TargetSpec

Plan = tuple[dict, dict[str, str], list[KernelEntry]]  # a linear's layout params, kernel names by role, kernels


def knobs_for(op: str, target: TargetSpec, n: int, k: int, accept: Callable[[dict], bool] | None = None) -> tuple[dict, str]:
    """Knobs for one kernel of an (n, k) layer on ``target`` at its core count, and where they
    came from (for the manifest and the compile log): the matching tuning record's best that
    ``accept`` allows, else the defaults; a kernel without knobs is "fixed"."""
    operator = registry.get(op)
    if not operator.tunable:
        return {}, "fixed"
    found = records.lookup(target, op, operator.version, operator.layout, n, k, target.num_cores, accept or (lambda _: True))
    if found is not None and (problems := _invalid_knobs(operator, found[0])):
        print(f"warning: ignoring the tuning record of {op} {n}x{k} ({'; '.join(problems)}): using the defaults", file=sys.stderr)
        found = None
    return found or (schedule_db.default_knobs(op, target.isa), "default")


def _invalid_knobs(operator, knobs: object) -> list[str]:
    """What is wrong with knobs read from a records file (a hand edit, another version): each
    must be one of its search space's values (a huge one would hang the compile), no others."""
    if not isinstance(knobs, dict):
        return [f"knobs are {type(knobs).__name__}, not an object"]
    unknown = [f"unknown knob {name!r}" for name in knobs if name not in operator.space.knobs]
    wrong_type = [
        f"{name}={value!r}"
        for name, value in knobs.items()
        if isinstance(value, bool) != isinstance(operator.space.knobs.get(name, [value])[0], bool)
    ]
    return unknown + wrong_type + operator.space.outside_domains(knobs)


def _shape(op: str, lin: Linear, knobs: dict, target: TargetSpec) -> dict:
    return registry.get(op).kernel_shape(lin.n, lin.k, knobs, target)[0]


def _lut_linear(lin: Linear, target: TargetSpec) -> Plan:
    """lut4-v1: the GEMM takes the GEMV's kblock, since kblock fixes the padded K and so the
    packed weights, and one packed copy serves decode and prompt alike (a tuned GEMM record
    contributes its best trial with that kblock)."""
    gemv, gemv_src = knobs_for("lut_gemv", target, lin.n, lin.k)
    shape, gemv = registry.get("lut_gemv").kernel_shape(lin.n, lin.k, gemv, target)
    kblock = gemv["kblock"]
    same_k = lambda knobs: layout.effective_kblock(lin.k, knobs["kblock"]) == kblock  # noqa: E731
    gemm, gemm_src = knobs_for("lut_gemm", target, lin.n, lin.k, accept=same_k)
    base = {key: shape[key] for key in ("n", "k", "n_padded", "k_padded")}
    names = {"lut_table": f"lut_table_k{shape['k_padded']}", "gemv": f"lut_gemv_n{lin.n}_k{lin.k}", "gemm": f"lut_gemm_n{lin.n}_k{lin.k}"}
    kernels = [
        KernelEntry(names["lut_table"], "lut_table", base),
        KernelEntry(names["gemv"], "lut_gemv", shape, gemv, gemv_src),
        KernelEntry(names["gemm"], "lut_gemm", shape, gemm | {"kblock": kblock}, gemm_src),
    ]
    return {"rows": shape["rows"], "kblock": kblock}, names, kernels


def _dot2_linear(lin: Linear, target: TargetSpec) -> Plan:
    """dot2-v1: the GEMV (decode, the bulk of a model's time) decides the padding of N and K;
    the GEMM takes its tuned knobs whose row blocks divide that padding, else its defaults,
    and N is then padded for both kernels' row blocks."""
    gemv, gemv_src = knobs_for("dot2_gemv", target, lin.n, lin.k)
    gemv_blocks = _shape("dot2_gemv", lin, gemv, target)["n_padded"] // layout_dot2.ROWS
    fits = lambda knobs: gemv_blocks % knobs["row_blocks"] == 0  # noqa: E731
    gemm, gemm_src = knobs_for("dot2_gemm", target, lin.n, lin.k, accept=fits)
    both = {"row_blocks": math.lcm(gemv["row_blocks"], gemm["row_blocks"]), "k_unroll": gemv["k_unroll"]}
    shape = _shape("dot2_gemv", lin, both, target)
    names = {"gemv": f"dot2_gemv_n{lin.n}_k{lin.k}", "gemm": f"dot2_gemm_n{lin.n}_k{lin.k}"}
    kernels = [
        KernelEntry(names["gemv"], "dot2_gemv", shape, gemv, gemv_src),
        KernelEntry(names["gemm"], "dot2_gemm", shape, gemm, gemm_src),
    ]
    return {"token_tile": gemm["token_tile"]}, names, kernels


def _gpu2_linear(lin: Linear, target: TargetSpec) -> Plan:
    """dot2-v1 on a GPU: N padded for both kernels' rows per block, K to whole chunks."""
    gemv, gemv_src = knobs_for("gpu2_gemv", target, lin.n, lin.k)
    gemm, gemm_src = knobs_for("gpu2_gemm", target, lin.n, lin.k)
    rows = math.lcm(layout_dot2.ROWS, gemv["rows_per_block"], gemm["rows_per_block"])
    shape = _shape("gpu2_gemv", lin, {"rows_per_block": rows}, target)
    names = {"gemv": f"gpu2_gemv_n{lin.n}_k{lin.k}", "gemm": f"gpu2_gemm_n{lin.n}_k{lin.k}"}
    kernels = [
        KernelEntry(names["gemv"], "gpu2_gemv", shape, gemv, gemv_src),
        KernelEntry(names["gemm"], "gpu2_gemm", shape, gemm, gemm_src),
    ]
    return {"token_tile": gemm["token_tile"]}, names, kernels


# kernel family -> planner of one linear layer
LINEAR_PLANNERS = {"lut": _lut_linear, "dot2": _dot2_linear, "gpu2": _gpu2_linear}


def plan(linears: list[Linear], target: TargetSpec, family: Family) -> tuple[list[KernelEntry], list[LinearEntry]]:
    """Kernels for the distinct shapes among ``linears``, and each linear's manifest entry:
    every layer is quantize (or, for a normalized input on a CPU, rmsnorm_quantize), the
    family's matmuls, dequantize."""
    kernels: dict[str, KernelEntry] = {}
    entries = []
    for lin in linears:
        params, names, matmuls = LINEAR_PLANNERS[family.name](lin, target)
        shape = {key: matmuls[0].shape[key] for key in ("n", "k", "n_padded", "k_padded")}
        names = {"quantize": f"quantize_k{lin.k}_p{shape['k_padded']}", **names, "dequantize": f"dequantize_n{lin.n}_p{shape['n_padded']}"}
        fixed = [KernelEntry(names["quantize"], "quantize", shape), KernelEntry(names["dequantize"], "dequantize", shape)]
        if not target.is_gpu:  # no GPU schedule yet: GPU artifacts do not run models
            names["rmsnorm_quantize"] = f"rmsnorm_quantize_k{lin.k}_p{shape['k_padded']}"
            fixed.append(KernelEntry(names["rmsnorm_quantize"], "rmsnorm_quantize", shape))
        for entry in (fixed[0], *fixed[2:], *matmuls, fixed[1]):
            kernels.setdefault(entry.name, entry)
        entries.append(LinearEntry(lin.name, *shape.values(), family.layout, params, names))
    return list(kernels.values()), entries


def _f16_output(vocab: int, hidden: int, target: TargetSpec) -> tuple[OutputFormat, list[KernelEntry]]:
    knobs, source = knobs_for("f16_gemv", target, vocab, hidden)
    shape = _shape("f16_gemv", Linear("output", vocab, hidden), knobs, target)
    names = {"gemv": f"f16_gemv_n{vocab}_k{hidden}", "gemm": f"f16_gemm_n{vocab}_k{hidden}"}  # gemm: the server's batched decode
    kernels = [KernelEntry(names["gemv"], "f16_gemv", shape, knobs, source), KernelEntry(names["gemm"], "f16_gemm", shape, {}, "fixed")]
    return OutputFormat(layout_f16.VERSION, names), kernels


def _i8_output(vocab: int, hidden: int, target: TargetSpec) -> tuple[OutputFormat, list[KernelEntry]]:
    """int8 rows: the hidden state quantized like a BitLinear input, an int8 GEMV (a GEMM for
    several tokens), and the per-row scale applied by the dequantize kernel."""
    knobs, source = knobs_for("i8_gemv", target, vocab, hidden)
    shape = _shape("i8_gemv", Linear("output", vocab, hidden), knobs, target)
    n_p, k_p = shape["n_padded"], shape["k_padded"]
    plain = {key: shape[key] for key in ("n", "k", "n_padded", "k_padded")}
    names = {
        "quantize": f"quantize_k{hidden}_p{k_p}",
        "gemv": f"i8_gemv_n{vocab}_k{hidden}",
        "gemm": f"i8_gemm_n{vocab}_k{hidden}",  # the server's batched decode
        "dequantize": f"dequantize_n{vocab}_p{n_p}",
    }
    kernels = [
        KernelEntry(names["quantize"], "quantize", plain),
        KernelEntry(names["gemv"], "i8_gemv", shape, knobs, source),
        KernelEntry(names["gemm"], "i8_gemm", shape, {}, "fixed"),
        KernelEntry(names["dequantize"], "dequantize", plain),
    ]
    return OutputFormat(layout_i8.VERSION, names, n_p, k_p), kernels


# output-layer format -> planner: (its manifest entry, the kernels it needs)
OUTPUT_PLANNERS = {"f16": _f16_output, "i8": _i8_output}


def plan_output_layer(vocab: int, hidden: int, target: TargetSpec) -> tuple[OutputLayer, list[KernelEntry]]:
    """The output layer's manifest entry, every format in it, and the kernels they need."""
    formats, kernels = {}, []
    for fmt, planner in OUTPUT_PLANNERS.items():
        formats[fmt], entries = planner(vocab, hidden, target)
        kernels += entries
    return OutputLayer(vocab, hidden, formats), kernels


def launch(kernel: KernelEntry) -> dict:
    """A GPU kernel's grid and threadgroup (x first; a string is a runtime extent)."""
    operator = registry.get(kernel.op)
    if operator.launch is None:
        raise ValueError(f"kernel {kernel.op} has no GPU launch geometry")
    return operator.launch(kernel.shape, kernel.knobs)


def schedule_summary(kernels: list[KernelEntry], target: TargetSpec) -> str:
    """One line saying which tunable kernels got tuned knobs and which run on defaults."""
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
