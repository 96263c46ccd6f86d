"""Float16-weight GEMV for the output layer: float32 logits[n] = sum_k x[k] * E[n, k].

Why a float kernel: the output layer (and the embedding it shares its matrix with) is not
ternary; it is the single largest matrix of a small model (128256 x 2560 for Llama-3
vocabularies), read once per decoded token. Stored as float16 (layout f16-tiles-v1) it is
half the bytes of float32 and, unlike int8, needs no quantization decision: the GEMV is
purely bandwidth-bound, so the goal is to read the weights at the machine's DRAM rate.

Compute: per tile of 64 rows, out[t, l] = sum_k float32(w[t, k, l]) * x[k]. Schedule: tiles in
parallel (TVM hands each thread a contiguous range of tiles, so each thread streams one
contiguous region); per tile the 64 accumulators live in registers (``local``), the lane loop
is vectorized, which LLVM turns into vcvtph2ps (with the load folded in) and vfmadd231ps:
four zmm (eight ymm on AVX2, F16C) per k. ``k_unroll`` unrolls the k loop (it does not change
the numbers). The k order per output is sequential, and LLVM may fuse the multiply-add, so
results are close to, not bit-equal with, the reference (see reference.F16_GEMV_RTOL).

Measured (128256 x 2560, 657 MB, from DRAM, 2-core Xeon): 1 thread 67 ms (9.8 GB/s, 89% of
ops/bandwidth.py's read rate), 2 threads 33 ms (20 GB/s, 95%), without software prefetch: a
tile is one contiguous 320 KB stream, which the hardware prefetcher follows. k_unroll 1, 2, 4
and 8 were equal within the (large, shared-machine) noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import te

from bitnet_runtime import reference as _reference
from bitnet_runtime.layout_f16 import ROWS

from ..errors import UserError

reference = _reference.f16_gemv


@dataclass(frozen=True)
class F16Knobs:
    """k_unroll: k steps unrolled in the inner loop (at most; the largest divisor of K up to it)."""

    k_unroll: int = 2

    def check(self) -> None:
        if self.k_unroll < 1:
            raise UserError(f"knob k_unroll={self.k_unroll} must be >= 1")

    def unroll_for(self, k: int) -> int:
        return max(d for d in range(1, self.k_unroll + 1) if k % d == 0)


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
    sch.vectorize(lane)
    sch.decompose_reduction(out, r)
    if unroll > 1:
        sch.unroll(r_inner)
    sch.vectorize(sch.get_loops(acc)[-1])
    return sch


def build_primfunc(name: str, n_padded: int, k: int, knobs: F16Knobs = F16Knobs()) -> tvm.tirx.PrimFunc:
    """Arguments (x float32 [1, k], packed float16 [n_padded/64, k, 64], out float32 [n_padded/64, 64])."""
    knobs.check()
    if n_padded % ROWS or n_padded < ROWS:
        raise ValueError(f"n_padded={n_padded} is not a positive multiple of {ROWS}: pad with layout_f16.padded_rows")
    sch = schedule(te.create_prim_func(list(compute(n_padded // ROWS, k))), k, knobs)
    return sch.mod["main"].with_attr("global_symbol", name)
