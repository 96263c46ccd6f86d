"""Per-token absmax int8 activation quantization, as BitNet b1.58 defines it:
scale = 127 / max(max|x|, 1e-5), q = clamp(round(x * scale), -128, 127).

Writes q zero-padded to the matmul's padded K, so the runtime never copies activations twice.
Rounding is half-to-even (LLVM's nearbyint), like torch.round and numpy.round.
"""

from __future__ import annotations

import tvm
from tvm import te, tirx

from bitnet_runtime import reference as _reference

reference = _reference.quantize_activations
VECTOR = 16  # float32 lanes of a zmm; on ymm LLVM splits it in two


def compute(tokens, k: int, k_padded: int, scale_from_absmax: bool = False) -> tuple[te.Tensor, te.Tensor, te.Tensor]:
    """x -> (q, scale). With ``scale_from_absmax`` (the GPU form) q recomputes its scale from
    absmax (the same float32 division, so bit-identical) instead of reading the scale output:
    on a GPU one thread writes that output, and reading it back in other threads would race,
    while absmax sits in shared memory behind the reduction's barrier."""
    x = te.placeholder((tokens, k), "float32", name="x")
    r = te.reduce_axis((0, k), "r")
    absmax = te.compute((tokens,), lambda m: te.max(te.abs(x[m, r]), axis=r), name="absmax")

    def scale_of(m):
        return tirx.const(127.0, "float32") / te.max(absmax[m], tirx.const(float(_reference.ABSMAX_FLOOR), "float32"))

    scale = te.compute((tokens,), scale_of, name="scale")

    def quantize(m, c):
        rounded = tirx.nearbyint(x[m, c] * (scale_of(m) if scale_from_absmax else scale[m]))
        clamped = te.min(te.max(rounded, tirx.const(-128.0, "float32")), tirx.const(127.0, "float32"))
        return tirx.Select(c < k, clamped.astype("int8"), tirx.const(0, "int8"))

    q = te.compute((tokens, k_padded), quantize, name="q")
    return x, q, scale


def schedule(func: tvm.tirx.PrimFunc, k: int) -> tvm.s_tir.Schedule:
    """Tokens in parallel, each token's max, scale and rounding in one loop body (so the
    intermediates live on the stack, not in per-call heap workspaces). The max runs as
    VECTOR-wide partial maxima: order-free, so still exact. The partial count divides K:
    TVM 0.27 mis-vectorizes an rfactor whose split needs a predicate."""
    sch = tvm.s_tir.Schedule(func)
    absmax, scale, q = sch.get_sblock("absmax"), sch.get_sblock("scale"), sch.get_sblock("q")
    _, r = sch.get_loops(absmax)
    lanes = max(d for d in range(1, VECTOR + 1) if k % d == 0)
    _, r_inner = sch.split(r, [None, lanes])
    partial = sch.rfactor(r_inner, 0)
    (token,) = sch.get_loops(scale)
    sch.parallel(token)
    sch.compute_at(absmax, token)
    sch.compute_at(partial, token)
    sch.reverse_compute_at(q, token)
    if lanes > 1:  # loops now [token, lanes, steps], steps elided when it is 1
        inner = sch.get_loops(partial)[1:]
        if len(inner) == 2:
            sch.reorder(inner[1], inner[0])
        sch.vectorize(inner[0])
    _, qc_inner = sch.split(sch.get_loops(q)[-1], [None, VECTOR])
    sch.vectorize(qc_inner)
    return sch


def build_primfunc(name: str, k: int, k_padded: int) -> tvm.tirx.PrimFunc:
    tokens = tirx.Var("tokens", "int64")
    sch = schedule(te.create_prim_func(list(compute(tokens, k, k_padded))), k)
    return sch.mod["main"].with_attr("global_symbol", name)


# ----------------------------------------------------------------------------- GPU (CUDA, Metal)
GPU_THREADS = 256  # threads per token: one block per token


def schedule_gpu(func: tvm.tirx.PrimFunc, threads: int = GPU_THREADS) -> tvm.s_tir.Schedule:
    """One block per token (blockIdx.x): the absmax is a cross-thread max over threadIdx.x
    (warp shuffles, then shared memory across warps) into shared memory; then every thread
    quantizes every threads-th column. The scale output is written by thread 0."""
    sch = tvm.s_tir.Schedule(func)
    absmax, scale, q = sch.get_sblock("absmax"), sch.get_sblock("scale"), sch.get_sblock("q")
    token = sch.merge(sch.get_loops(scale)[0], sch.get_loops(q)[0])  # one token loop for both consumers
    sch.compute_at(absmax, token)
    sch.bind(token, "blockIdx.x")
    sch.set_scope(absmax, 0, "shared")
    _, lane = sch.split(sch.get_loops(absmax)[-1], [None, threads])
    sch.bind(lane, "threadIdx.x")
    _, lane = sch.split(sch.get_loops(q)[-1], [None, threads])
    sch.bind(lane, "threadIdx.x")
    return sch


def build_primfunc_gpu(name: str, k: int, k_padded: int, threads: int = GPU_THREADS) -> tvm.tirx.PrimFunc:
    tokens = tirx.Var("tokens", "int64")
    sch = schedule_gpu(te.create_prim_func(list(compute(tokens, k, k_padded, scale_from_absmax=True))), threads)
    return sch.mod["main"].with_attr("global_symbol", name)


def launch_gpu(threads: int = GPU_THREADS) -> dict:
    """One threadgroup per token."""
    return {"grid": ["tokens"], "threads": [threads]}
