"""Dequantization: float32 y[m, n] = (acc[m, n] * weight_scale[n]) * (1 / act_scale[m]).

The weight scale is per output row because fused layers (q|k|v, gate|up) concatenate
matrices that each carry their own scale. Reads the matmul's padded int32 output and writes
only the N real columns; the reciprocal is taken once per token, not per element.
"""

from __future__ import annotations

import tvm
from tvm import te, tirx

from bitnet_runtime import reference as _reference

reference = _reference.dequantize
VECTOR = 16


def compute(tokens, n: int, n_padded: int) -> tuple[te.Tensor, ...]:
    acc = te.placeholder((tokens, n_padded), "int32", name="acc")
    act_scale = te.placeholder((tokens,), "float32", name="act_scale")
    weight_scale = te.placeholder((n,), "float32", name="weight_scale")
    inverse = te.compute((tokens,), lambda m: tirx.const(1.0, "float32") / act_scale[m], name="inverse")
    out = te.compute((tokens, n), lambda m, c: (acc[m, c].astype("float32") * weight_scale[c]) * inverse[m], name="out")
    return acc, act_scale, weight_scale, out


def schedule(func: tvm.tirx.PrimFunc) -> tvm.s_tir.Schedule:
    sch = tvm.s_tir.Schedule(func)
    m, c = sch.get_loops(sch.get_sblock("out"))
    sch.parallel(m)
    _, inner = sch.split(c, [None, VECTOR])
    sch.vectorize(inner)
    return sch


def build_primfunc(name: str, n: int, n_padded: int) -> tvm.tirx.PrimFunc:
    tokens = tirx.Var("tokens", "int64")
    sch = schedule(te.create_prim_func(list(compute(tokens, n, n_padded))))
    return sch.mod["main"].with_attr("global_symbol", name)


# ----------------------------------------------------------------------------- GPU (CUDA, Metal)
GPU_THREADS = 256


def schedule_gpu(func: tvm.tirx.PrimFunc, threads: int = GPU_THREADS) -> tvm.s_tir.Schedule:
    """Elementwise: token on blockIdx.y, columns over blockIdx.x * threads + threadIdx.x
    (coalesced). The reciprocal is inlined: each thread divides once, the same float32
    1 / act_scale the CPU kernel takes per token, so results are identical."""
    sch = tvm.s_tir.Schedule(func)
    sch.compute_inline(sch.get_sblock("inverse"))
    m, c = sch.get_loops(sch.get_sblock("out"))
    block, lane = sch.split(c, [None, threads])
    sch.bind(m, "blockIdx.y")
    sch.bind(block, "blockIdx.x")
    sch.bind(lane, "threadIdx.x")
    return sch


def build_primfunc_gpu(name: str, n: int, n_padded: int, threads: int = GPU_THREADS) -> tvm.tirx.PrimFunc:
    tokens = tirx.Var("tokens", "int64")
    sch = schedule_gpu(te.create_prim_func(list(compute(tokens, n, n_padded))), threads)
    return sch.mod["main"].with_attr("global_symbol", name)


def launch_gpu(n: int, threads: int = GPU_THREADS) -> dict:
    """Columns over x in threadgroups of ``threads``, tokens over y."""
    return {"grid": [-(-n // threads), "tokens"], "threads": [threads, 1]}
