"""Per-token absmax int8 activation quantization, as BitNet b1.58 defines it:
scale = 127 / max(max|x|, 1e-5), q = clamp(round(x * scale), -128, 127).

Writes q zero-padded to the matmul's padded K, so the runtime never copies activations twice.
Rounding is half-to-even (LLVM's nearbyint), like torch.round and numpy.round.
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

reference = _reference.quantize_activations
ABS_MASK = 0x7FFFFFFF  # clears a float32's sign bit
VECTOR = 16  # float32 lanes of a zmm; on ymm LLVM splits it in two


def quantize_of(x: te.Tensor, k: int, k_padded: int, scale_from_absmax: bool = False) -> tuple[te.Tensor, te.Tensor]:
    """(q, scale) of the float32 rows of ``x`` [tokens, k] (a placeholder, or a computed tensor
    such as rmsnorm_quant's normalized rows). With ``scale_from_absmax`` (the GPU form) q
    recomputes its scale from absmax (the same float32 division, so bit-identical) instead of
    reading the scale output: on a GPU one thread writes that output, and reading it back in
    other threads would race, while absmax sits in shared memory behind the reduction's barrier."""
    tokens = x.shape[0]
    r = te.reduce_axis((0, k), "r")
    # |x| as its int32 bit pattern: for non-negative floats the integer order is the float order
    # and NaN sorts above Inf, so the max keeps a NaN (a float max drops it) at the same cost.
    absmax = te.compute((tokens,), lambda m: te.max(tirx.reinterpret("int32", x[m, r]) & ABS_MASK, axis=r), name="absmax")

    def scale_of(m):
        top = tirx.reinterpret("float32", absmax[m])
        floor = tirx.const(float(_reference.ABSMAX_FLOOR), "float32")
        return tirx.const(127.0, "float32") / tirx.Select(top < floor, floor, top)  # NaN stays NaN

    scale = te.compute((tokens,), scale_of, name="scale")

    def quantize(m, c):
        product = x[m, c] * (scale_of(m) if scale_from_absmax else scale[m])
        clamped = te.min(te.max(tirx.nearbyint(product), tirx.const(-128.0, "float32")), tirx.const(127.0, "float32"))
        finite = tirx.Select(tirx.isnan(product), tirx.const(0, "int8"), clamped.astype("int8"))
        return tirx.Select(c < k, finite, tirx.const(0, "int8"))

    q = te.compute((tokens, k_padded), quantize, name="q")
    return q, scale


def compute(tokens, k: int, k_padded: int, scale_from_absmax: bool = False) -> tuple[te.Tensor, te.Tensor, te.Tensor]:
    """x -> (q, scale)."""
    x = te.placeholder((tokens, k), "float32", name="x")
    q, scale = quantize_of(x, k, k_padded, scale_from_absmax)
    return x, q, scale


def lanes_dividing(k: int) -> int:
    """Partial reductions per row: the most up to VECTOR that divide K (TVM 0.27
    mis-vectorizes an rfactor whose split needs a predicate)."""
    return max(d for d in range(1, VECTOR + 1) if k % d == 0)


def vectorize_partial(sch: tvm.s_tir.Schedule, partial, lanes: int) -> None:
    """Vectorize an rfactor block's lanes (its loops under the token: lanes, steps; steps
    elided when it is 1)."""
    if lanes > 1:
        inner = sch.get_loops(partial)[1:]
        if len(inner) == 2:
            sch.reorder(inner[1], inner[0])
        sch.vectorize(inner[0])


def schedule_quantize(sch: tvm.s_tir.Schedule, k: int, first: tuple = ()):
    """Tokens in parallel, each token's max, scale and rounding in one loop body (so the
    intermediates live on the stack, not in per-call heap workspaces). The max runs as
    vector-wide partial maxima: order-free, so still exact. ``first``: per-token blocks that x
    is computed from (rmsnorm_quant's inverse norm), merged into the token loop ahead of the
    quantization. Returns the token loop."""
    absmax, scale, q = sch.get_sblock("absmax"), sch.get_sblock("scale"), sch.get_sblock("q")
    _, r = sch.get_loops(absmax)
    lanes = lanes_dividing(k)
    _, r_inner = sch.split(r, [None, lanes])
    partial = sch.rfactor(r_inner, 0)
    if first:
        token = sch.merge(*(sch.get_loops(block)[0] for block in (*first, scale, q)))
    else:
        (token,) = sch.get_loops(scale)
    sch.parallel(token)
    sch.compute_at(absmax, token)
    sch.compute_at(partial, token)
    if not first:
        sch.reverse_compute_at(q, token)
    vectorize_partial(sch, partial, lanes)
    _, qc_inner = sch.split(sch.get_loops(q)[-1], [None, VECTOR])
    sch.vectorize(qc_inner)
    return token


def schedule(func: tvm.tirx.PrimFunc, k: int) -> tvm.s_tir.Schedule:
    sch = tvm.s_tir.Schedule(func)
    schedule_quantize(sch, k)
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


# ----------------------------------------------------------------------------- the operator


def kernel_shape(n: int, k: int, knobs: dict, target: TargetSpec) -> tuple[dict, dict]:
    """Unpadded: the planner hands quantize the padded K of the matmul it feeds."""
    return {"n": n, "k": k, "n_padded": n, "k_padded": k}, knobs


def make_case(shape: dict, knobs: dict, rng: np.random.Generator, tokens: int) -> Case:
    """Normal activations at a random magnitude; with two or more tokens the second is all
    zero, which must hit the scale floor, not divide by zero; with three or more the third
    holds a NaN and the fourth an Inf (scale NaN and 0, as the reference gives). Exact: q and
    the scales."""
    k, k_p = shape["k"], shape["k_padded"]
    x = aligned_copy((rng.standard_normal((tokens, k)) * rng.uniform(0.01, 100)).astype(np.float32))
    x[1:2] = 0.0
    x[2:3, rng.integers(k)] = np.nan
    x[3:4, rng.integers(k)] = -np.inf
    q, scale = aligned_zeros((tokens, k_p), np.int8), aligned_zeros((tokens,), np.float32)
    want_q, want_scale = reference(x, k_p)
    check_q, check_scale = exact(lambda: q, want_q), exact(lambda: scale, want_scale)
    return Case((x, q, scale), 0, q, lambda: check_q() or check_scale())


def build(name: str, shape: dict, knobs: dict, target: TargetSpec) -> tvm.tirx.PrimFunc:
    """The same compute on every target; only the schedule differs between CPU and GPU."""
    return (build_primfunc_gpu if target.is_gpu else build_primfunc)(name, shape["k"], shape["k_padded"])


OPERATORS = (
    Operator(
        "quantize",
        "quantize-1",
        None,
        CPU_ISAS | GPU_ISAS,
        FIXED,
        kernel_shape,
        make_case,
        build,
        reference,
        launch=lambda shape, knobs: launch_gpu(),
    ),
)
