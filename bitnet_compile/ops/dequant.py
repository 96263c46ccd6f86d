"""Dequantization: float32 y[m, n] = (acc[m, n] * weight_scale[n]) * (1 / act_scale[m]).

The weight scale is per output row because fused layers (q|k|v, gate|up) concatenate
matrices that each carry their own scale. Reads the matmul's padded int32 output and writes
only the N real columns; the reciprocal is taken once per token, not per element.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import tvm
from tvm import te, tirx

from bitnet_runtime import reference as _reference
from bitnet_runtime.memory import aligned_copy, aligned_zeros

from .case import Case, exact
from .operator import CPU_ISAS, FIXED, GPU_ISAS, Operator

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..target import TargetSpec

reference = _reference.dequantize
VECTOR = 16


def compute(tokens, n: int, n_padded: int) -> tuple[te.Tensor, ...]:
    acc = te.placeholder((tokens, n_padded), "int32", name="acc")
    act_scale = te.placeholder((tokens,), "float32", name="act_scale")
    weight_scale = te.placeholder((n,), "float32", name="weight_scale")
    inverse = te.compute((tokens,), lambda m: tirx.const(1.0, "float32") / act_scale[m], name="inverse")
    out = te.compute((tokens, n), lambda m, c: (acc[m, c].astype("float32") * weight_scale[c]) * inverse[m], name="out")
    return acc, act_scale, weight_scale, out


def parallel_rows(sch: tvm.s_tir.Schedule, block: str) -> tvm.s_tir.Schedule:
    """Tokens in parallel, each row's columns in vectors of VECTOR (residual_dequant's too)."""
    m, c = sch.get_loops(sch.get_sblock(block))
    sch.parallel(m)
    _, inner = sch.split(c, [None, VECTOR])
    sch.vectorize(inner)
    return sch


def schedule(func: tvm.tirx.PrimFunc) -> tvm.s_tir.Schedule:
    return parallel_rows(tvm.s_tir.Schedule(func), "out")


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


# ----------------------------------------------------------------------------- the operator


def kernel_shape(n: int, k: int, knobs: dict, target: TargetSpec) -> tuple[dict, dict]:
    """Unpadded: the planner hands dequantize the padded N of the matmul it reads."""
    return {"n": n, "k": k, "n_padded": n, "k_padded": k}, knobs


def make_case(shape: dict, knobs: dict, rng: np.random.Generator, tokens: int) -> Case:
    """Accumulators of up to 2**24 and scales over five decades; exact."""
    n, n_p = shape["n"], shape["n_padded"]
    acc = aligned_copy(rng.integers(-(2**24), 2**24, (tokens, n_p), dtype=np.int32))
    act_scale = aligned_copy(rng.uniform(0.1, 1000, tokens).astype(np.float32))
    weight_scale = aligned_copy(rng.uniform(0.01, 2, n).astype(np.float32))
    out = aligned_zeros((tokens, n), np.float32)
    want = reference(acc[:, :n], act_scale, weight_scale)
    return Case((acc, act_scale, weight_scale, out), 0, out, exact(lambda: out, want))


def build(name: str, shape: dict, knobs: dict, target: TargetSpec) -> tvm.tirx.PrimFunc:
    """The same compute on every target; only the schedule differs between CPU and GPU."""
    return (build_primfunc_gpu if target.is_gpu else build_primfunc)(name, shape["n"], shape["n_padded"])


OPERATORS = (
    Operator(
        "dequantize", "dequantize-1", None, CPU_ISAS | GPU_ISAS, FIXED, kernel_shape, make_case, build, reference,
        launch=lambda shape, knobs: launch_gpu(shape["n"]),
    ),
)  # fmt: skip
