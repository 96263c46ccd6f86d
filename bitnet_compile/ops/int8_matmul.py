"""Plain int8 x int8 -> int32 matmul: the baseline the LUT kernels are benchmarked against.

int32 out[M, N] = a[M, K] @ w[N, K]^T with the ternary weights simply stored as int8, i.e. what
TVM gives without any BitNet-specific work: a TE compute definition and a short generic
schedule, no tensor intrinsics, LLVM choosing the instructions. It is a fair "what would I get
anyway" reference, not a tuned int8 kernel (those use vpdpbusd with a sign trick).

Schedule: rows in parallel; each row's K reduction split into LANES-wide partial sums (an
rfactor) that TVM vectorizes and LLVM keeps in registers; products are formed in int16
(exact: |a * w| <= 128 * 128) and widened to int32 for the sum. Of the simple schedules tried
on AVX-512 (LLVM's own loop vectorizer on the plain reduction, int32 products, 16/64 lanes)
this was the fastest. K must be a multiple of LANES: callers zero-pad with ``padded_k``.
"""

from __future__ import annotations

import tvm
from tvm import te

from bitnet_runtime import reference as _reference
from bitnet_runtime.layout import round_up

reference = _reference.ternary_matmul
LANES = 32  # int32 partial sums per row: 2 zmm (4 ymm) accumulators


def padded_k(k: int) -> int:
    """K as the kernel sees it; the extra activations and weights must be zero."""
    return round_up(k, LANES)


def compute(tokens, n: int, k: int) -> tuple[te.Tensor, te.Tensor, te.Tensor]:
    if k % LANES:
        raise ValueError(f"k={k} is not a multiple of {LANES}: pad it with padded_k")
    a = te.placeholder((tokens, k), "int8", name="a")
    w = te.placeholder((n, k), "int8", name="w")
    r = te.reduce_axis((0, k), "r")
    out = te.compute(
        (tokens, n),
        lambda m, j: te.sum((a[m, r].astype("int16") * w[j, r].astype("int16")).astype("int32"), axis=r),
        name="out",
    )
    return a, w, out


def schedule(func: tvm.tirx.PrimFunc) -> tvm.s_tir.Schedule:
    """Rows (weight rows, so each thread streams its own part of W) in parallel; per row and
    token, LANES vectorized partial sums over K, then one horizontal sum."""
    sch = tvm.s_tir.Schedule(func)
    out = sch.get_sblock("out")
    m, j, r = sch.get_loops(out)
    _, r_inner = sch.split(r, [None, LANES])
    partial = sch.rfactor(r_inner, 2)
    m, j, _ = sch.get_loops(out)
    sch.reorder(j, m)
    sch.parallel(j)
    sch.compute_at(partial, m, preserve_unit_loops=True)
    sch.set_scope(partial, 0, "local")
    inner = sch.get_loops(partial)[2:]  # under (j, m): one per block var, lane first, K steps last
    lane, step = inner[0], inner[-1]
    sch.reorder(step, lane)
    sch.vectorize(lane)  # before decompose_reduction: it needs the block's init to check the loop
    sch.decompose_reduction(partial, step)
    return sch


def build_primfunc(name: str, n: int, k: int, gemv: bool) -> tvm.tirx.PrimFunc:
    """A scheduled, named PrimFunc over a padded K (see ``padded_k``); GEMM takes any token count."""
    tokens = 1 if gemv else tvm.tirx.Var("tokens", "int64")
    sch = schedule(te.create_prim_func(list(compute(tokens, n, k))))
    return sch.mod["main"].with_attr("global_symbol", name)
