"""Float16-weight GEMV for the output layer: float32 logits[n] = sum_k x[k] * E[n, k].

Why a float kernel: the output layer (and the embedding it shares its matrix with) is not
ternary; it is the single largest matrix of a small model (128256 x 2560 for Llama-3
vocabularies), read once per decoded token. Stored as float16 (layout f16-tiles-v1) it is
half the bytes of float32 and, unlike int8, needs no quantization decision: the GEMV is
purely bandwidth-bound, so the goal is to read the weights at the machine's DRAM rate.

Compute: per tile of 64 rows, out[t, l] = sum_k float32(w[t, k, l]) * x[k]. Schedule: tiles in
parallel (TVM hands each thread a contiguous range of tiles, so each thread streams one
contiguous region); per tile the k loop (unrolled by ``k_unroll``) outside, the 64 lanes
inside, the 64 float32 accumulators in registers: vcvtph2ps (load folded in) and vfmadd231ps
on four zmm (eight ymm on AVX2, which has F16C) per k. With ``prefetch`` (default) the k step
is a small tensor intrinsic that also prefetches both cache lines of the tile's stream
PREFETCH_BYTES ahead; without it the lane loop is plainly vectorized (same instructions, no
prefetch). With the prefetch in the loop LLVM also stores the accumulators to their
(L1-resident) local buffer each step, which costs nothing measurable when streaming from
DRAM. The k order per output is sequential and the multiply-adds may be fused, so results
are close to, not bit-equal with, the exact reference (reference.F16_GEMV_RTOL).

Measured (128256 x 2560, 657 MB, from DRAM, rotating two copies; 2-core Xeon, median of 5
rounds): with prefetch 1 thread 56 ms (11.7 GB/s, ~100% of ops/bandwidth.py's read rate), 2
threads 31 ms (21.3 GB/s, 99%); without it 65 ms (90%) and 36 ms (85%): the hardware
prefetcher alone leaves the stream waiting on memory. k_unroll 1, 2, 4 and 8 were equal
within noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import tvm
from tvm import te
from tvm.script import tirx as T

from bitnet_runtime import layout_f16
from bitnet_runtime import reference as _reference
from bitnet_runtime.layout_f16 import ROWS
from bitnet_runtime.memory import aligned_zeros

from ..intrinsics import declare, registered
from .case import Case
from .operator import CPU_ISAS, Operator, knobs_of
from .space import SearchSpace, require_positive

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..target import TargetSpec

reference = _reference.f16_gemv
PREFETCH_BYTES = 4096  # software prefetch distance of a tile's weight stream
INTRIN = "bitnet_f16_fma_prefetch"


def _intrin() -> tuple[tvm.tirx.PrimFunc, tvm.tirx.PrimFunc]:
    """One k step of 64 lanes: widen, fused multiply-add, prefetch both cache lines ahead."""

    @T.prim_func(s_tir=True)
    def desc(
        W: T.Buffer((ROWS,), "float16", offset_factor=1),
        X: T.Buffer((1,), "float32", offset_factor=1),
        C: T.Buffer((ROWS,), "float32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:ROWS], W[0:ROWS], X[0:1])
            T.writes(C[0:ROWS])
            for lane in T.serial(ROWS):
                with T.sblock("update"):
                    vl = T.axis.remap("S", [lane])
                    C[vl] = C[vl] + T.Cast("float32", W[vl]) * X[0]

    @T.prim_func(s_tir=True)
    def impl(
        W: T.Buffer((ROWS,), "float16", offset_factor=1),
        X: T.Buffer((1,), "float32", offset_factor=1),
        C: T.Buffer((ROWS,), "float32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:ROWS], W[0:ROWS], X[0:1])
            T.writes(C[0:ROWS])
            weights = T.meta_var(T.Cast("float32x64", W.vload([0], "float16x64")))
            C.vstore([0], C.vload([0], "float32x64") + weights * T.broadcast(X[0], ROWS))
            for line in T.unroll(2):  # one k step is 128 bytes: both its cache lines (offsets in float16 elements)
                ahead = T.meta_var(W.access_ptr("r", offset=(PREFETCH_BYTES + 64 * line) // 2))
                T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", ahead, T.int32(0), T.int32(3), T.int32(1)))

    return desc, impl


declare(INTRIN, _intrin)


@dataclass(frozen=True)
class F16Knobs:
    """k_unroll: k steps unrolled in the inner loop (at most; the largest divisor of K up to it).
    prefetch: each k step also prefetches the tile's stream PREFETCH_BYTES ahead (a tensorized
    step); without it the lane loop is simply vectorized."""

    k_unroll: int
    prefetch: bool

    def check(self) -> None:
        require_positive(self, "k_unroll")

    def unroll_for(self, k: int) -> int:
        return max(d for d in range(1, self.k_unroll + 1) if k % d == 0)


SPACE = SearchSpace(knobs={"k_unroll": (1, 2, 4, 8), "prefetch": (True, False)})


def kernel_shape(n: int, k: int, knobs: dict, target: TargetSpec) -> tuple[dict, dict]:
    """Rows to whole tiles; K is not padded."""
    return {"n": n, "k": k, "n_padded": layout_f16.padded_rows(n), "k_padded": k}, knobs


def make_case(shape: dict, knobs: dict, rng: np.random.Generator, tokens: int) -> Case:
    """Random float16 tiles (made in the packed layout directly: a 128256-row vocabulary never
    exists as float32) and a random hidden state; right within reference.F16_GEMV_RTOL."""
    tiles, k = shape["n_padded"] // ROWS, shape["k"]
    packed = aligned_zeros((tiles, k, ROWS), np.float16)
    for start in range(0, tiles, 256):
        block = packed[start : start + 256]
        block[...] = rng.standard_normal(block.shape, dtype=np.float32)
    call = layout_f16.bind({}, shape)
    call.x[...] = rng.standard_normal((1, k), dtype=np.float32)
    want, bound = _reference.f16_gemv(call.x, packed, with_bound=True)
    tolerance = _reference.F16_GEMV_RTOL * bound + _reference.F16_GEMV_ATOL

    def check() -> str | None:
        off = np.abs(call.out.astype(np.float64) - want) > tolerance
        return f"{int(off.sum())} of {off.size} logits outside the float16 GEMV tolerance" if off.any() else None

    return Case(call.args(packed), 1, call.out, check)


def compute(tiles: int, k: int) -> tuple[te.Tensor, te.Tensor, te.Tensor]:
    x = te.placeholder((1, k), "float32", name="x")
    packed = te.placeholder((tiles, k, ROWS), "float16", name="packed")
    r = te.reduce_axis((0, k), "r")
    out = te.compute((tiles, ROWS), lambda t, l: te.sum(packed[t, r, l].astype("float32") * x[0, r], axis=r), name="out")
    return x, packed, out


def schedule(func: tvm.tirx.PrimFunc, k: int, knobs: F16Knobs) -> tvm.s_tir.Schedule:
    """Tiles in parallel; per tile the k loop outside, the 64 lanes vectorized inside, the
    accumulators in registers and written once."""
    sch = tvm.s_tir.Schedule(func)
    unroll = knobs.unroll_for(k)
    out = sch.get_sblock("out")
    t, lane, r = sch.get_loops(out)
    sch.parallel(t)
    acc = sch.cache_write(out, 0, "local")
    sch.reverse_compute_at(acc, t)
    r, r_inner = sch.split(r, [None, unroll])
    sch.reorder(r, r_inner, lane)
    if knobs.prefetch:
        sch.decompose_reduction(out, r)
        sch.tensorize(lane, registered(INTRIN))
    else:
        sch.vectorize(lane)
        sch.decompose_reduction(out, r)
    if unroll > 1:
        sch.unroll(r_inner)
    sch.vectorize(sch.get_loops(acc)[-1])
    return sch


def build_primfunc(name: str, n_padded: int, k: int, knobs: F16Knobs) -> tvm.tirx.PrimFunc:
    """Arguments (x float32 [1, k], packed float16 [n_padded/64, k, 64], out float32 [n_padded/64, 64])."""
    knobs.check()
    if n_padded % ROWS or n_padded < ROWS:
        raise ValueError(f"n_padded={n_padded} is not a positive multiple of {ROWS}: pad with layout_f16.padded_rows")
    sch = schedule(te.create_prim_func(list(compute(n_padded // ROWS, k))), k, knobs)
    return sch.mod["main"].with_attr("global_symbol", name)


def build(name: str, shape: dict, knobs: dict, target: TargetSpec) -> tvm.tirx.PrimFunc:
    return build_primfunc(name, shape["n_padded"], shape["k"], knobs_of(F16Knobs, knobs))


OPERATORS = (Operator("f16_gemv", "f16_gemv-1", layout_f16.VERSION, CPU_ISAS, SPACE, kernel_shape, make_case, build, reference),)
