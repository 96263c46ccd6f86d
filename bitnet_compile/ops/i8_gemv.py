"""int8 GEMV for the output layer: int32 acc[n] = sum_k q[k] * w[n, k], one token, exact.

Why int8: the output layer (128256 x 2560 for Llama-3 vocabularies) is the largest matrix of
a small model and is read once per decoded token, so its bytes are its time; int8 halves the
float16 layout's bytes (328 MB) at the cost of a per-row quantization of the embedding
(layout i8-tiles-v1). The per-row scale is applied afterwards by the dequantize kernel, which
takes per-row weight scales; the activations are the quantize kernel's int8 output.

Weights are int8 in [-127, 127] in tiles of 64 rows x chunks of 4 (``[tiles, K/4, 64, 4]``),
the activations int8 in [-128, 127]. Variants (``VARIANTS``; ``variant_for`` picks one from a
target's features), all computing the same ``(q + 128) * w`` sum minus the per-row
``correction = 128 * sum(w)`` in int32, so all are exact and interchangeable:

- ``avx512-vnni``: one vpdpbusd (u8 x s8, four products summed into each int32 lane) per 16
  rows x 4 weights; the activation dword is broadcast and its sign bits flipped (q ^ 0x80 =
  q + 128 as u8) once per chunk, so vpdpbusd sees it unsigned. |(q + 128) * w| <= 255 * 127,
  no saturation (vpdpbusd, not vpdpbusds), exact in int32 for K < 66 000 and in any case
  modulo 2**32, so the final value is exact whenever it fits int32.
- ``neon-dotprod`` (AArch64): sdot (s8 x s8, four products into each int32 lane) on the plain
  q * w, four calls of 4 rows x 4 weights per 16 x 4 block; it needs no shift, so its compute
  takes the correction argument (same signature) but leaves it unused.
- ``avx512`` and ``avx2`` (no VNNI): the same 16 x 4 block sign-extended to int16 (vpmovsxbw)
  and multiplied by the shifted activations with vpmaddwd (int16 x int16, pairs summed into
  int32: exact), accumulating per row two pair-sums that the epilogue adds.

Each intrinsic call also prefetches its 64-byte line of the weight stream PREFETCH_BYTES
ahead: without it the non-VNNI variants read 128256 x 2560 from DRAM at 80-88% of
ops/bandwidth.py's rate, with it all three variants at 99-104% (328 MB: 29 ms on 1 thread,
14 ms on 2; 2-core Xeon, median of 5 rounds). With the prefetch in the loop LLVM also stores
the accumulators to their (L1-resident) local buffer each step: no measurable cost here.

The intrinsics are written with LLVM's target intrinsics (TVM's own VNNI intrinsic fails LLVM
22 verification, see intrinsics/dot2_products.py) and live here, used by this operator only. Tiles
run in parallel; each task streams its tiles' weights contiguously.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import tvm
from tvm import te
from tvm.script import tirx as T

from bitnet_runtime import layout_i8
from bitnet_runtime import reference as _reference
from bitnet_runtime.layout_i8 import CHUNK, ROWS, SHIFT
from bitnet_runtime.memory import aligned_zeros

from ..errors import UserError
from ..intrinsics import declare, registered
from .case import Case, exact
from .operator import CPU_ISAS, Operator, knobs_of
from .space import SearchSpace, require_positive

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..target import TargetSpec

reference = _reference.i8_gemv
GROUP = 16  # rows per intrinsic call: one zmm of int32, one 64-byte cache line of weights
VARIANTS = ("avx512-vnni", "avx512", "avx2", "neon-dotprod")
PREFETCH_BYTES = 4096  # software prefetch distance of the tile's weight stream
VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"
PMADDWD = {"avx512": ("llvm.x86.avx512.pmaddw.d.512", 32), "avx2": ("llvm.x86.avx2.pmadd.wd", 16)}  # intrinsic, int16 lanes
VNNI_INTRIN = "bitnet_i8_vnni_avx512"
GEMM_SUFFIX = "_gemm"  # the same intrinsics without the prefetch, for i8_gemm.py
SDOT = "llvm.aarch64.neon.sdot"
SDOT_INTRIN = "bitnet_i8_sdot_neon"
PMADDWD_INTRIN = {isa: f"bitnet_i8_pmaddwd_{isa}" for isa in PMADDWD}


def variant_for(isa: str, features) -> str:
    """The kernel variant for a target's ISA ("avx512" / "avx2") and LLVM feature set."""
    if isa == "avx512":
        return "avx512-vnni" if "avx512vnni" in features else "avx512"
    if isa == "avx2":
        return "avx2"
    if isa == "neon":
        return "neon-dotprod"
    raise UserError(f"the int8 output-layer GEMV has no kernel for ISA {isa!r}")


def shifted_term(w, a):
    """w * (q + 128) in int32: one lane product of the kernel's sum (a is the signed activation)."""
    return T.Cast("int32", w) * (T.Cast("int32", a) + T.int32(SHIFT))


@dataclass(frozen=True)
class I8Knobs:
    """k_unroll: chunks of 4 weights unrolled per loop step (at most; the largest divisor of
    K/4 up to it); groups_per_pass: 16-row groups of a tile accumulated in one pass over K
    (4 = the whole tile in one pass; fewer passes less often over the stream but need more
    registers: on AVX2 the 64 rows of pair sums take all 16 ymm and LLVM spills two, which
    still measured 1.4x faster than two passes of 32 rows)."""

    k_unroll: int
    groups_per_pass: int

    def check(self) -> None:
        require_positive(self, "k_unroll")
        if self.groups_per_pass not in (1, 2, 4):
            raise UserError(f"knob groups_per_pass={self.groups_per_pass} must be 1, 2 or 4")

    def unroll_for(self, chunks: int) -> int:
        return max(d for d in range(1, self.k_unroll + 1) if chunks % d == 0)


SPACE = SearchSpace(knobs={"k_unroll": (1, 2, 4, 8), "groups_per_pass": (1, 2, 4)})


def kernel_shape(n: int, k: int, knobs: dict, target: TargetSpec) -> tuple[dict, dict]:
    """Rows to whole tiles, K to whole chunks; the shape names the variant the target gets."""
    n_p, k_p = layout_i8.padded_shape(n, k)
    return {"n": n, "k": k, "n_padded": n_p, "k_padded": k_p, "variant": variant_for(target.isa, target.features)}, knobs


def make_case(shape: dict, knobs: dict, rng: np.random.Generator, tokens: int) -> Case:
    """Random int8 weight tiles (in the packed layout directly) and activations; exact."""
    n_p, k_p = shape["n_padded"], shape["k_padded"]
    packed = aligned_zeros(layout_i8.packed_shape(n_p, k_p), np.int8)
    for start in range(0, packed.shape[0], 256):
        block = packed[start : start + 256]
        block[...] = rng.integers(-127, 128, block.shape, dtype=np.int8)
    call = layout_i8.bind({}, shape)
    call.q[...] = rng.integers(-128, 128, (1, k_p), dtype=np.int8)
    correction = layout_i8.correction(packed).reshape(-1, ROWS)
    return Case(call.args(packed, correction), 1, call.out, exact(lambda: call.out, _reference.i8_gemv(call.q, packed)))


# ----------------------------------------------------------------------------- intrinsics


def _broadcast_dword(a4, lanes: int):
    return T.Shuffle([a4] * (lanes // CHUNK), list(range(lanes)))


def _vnni(prefetch: bool = True) -> tuple[tvm.tirx.PrimFunc, tvm.tirx.PrimFunc]:
    """16 rows x 4 weights in one vpdpbusd, activations shifted to unsigned."""

    @T.prim_func(s_tir=True)
    def desc(
        P: T.Buffer((16, 4), "int8", offset_factor=1),
        A: T.Buffer((4,), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], P[0:16, 0:4], A[0:4])
            T.writes(C[0:16])
            for i, j in T.grid(16, 4):
                with T.sblock("update"):
                    vi, vj = T.axis.remap("SR", [i, j])
                    C[vi] = C[vi] + shifted_term(P[vi, vj], A[vj])

    @T.prim_func(s_tir=True)
    def impl(
        P: T.Buffer((16, 4), "int8", offset_factor=1),
        A: T.Buffer((4,), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], P[0:16, 0:4], A[0:4])
            T.writes(C[0:16])
            acts = T.meta_var(T.bitwise_xor(_broadcast_dword(A.vload([0], "int8x4"), 64), T.broadcast(T.int8(-128), 64)))
            C.vstore([0], T.call_llvm_pure_intrin("int32x16", VPDPBUSD, C.vload([0], "int32x16"), acts, P.vload([0, 0], "int8x64")))
            if prefetch:
                T.evaluate(
                    T.call_llvm_intrin(
                        "void", "llvm.prefetch.p0", P.access_ptr("r", offset=PREFETCH_BYTES), T.int32(0), T.int32(3), T.int32(1)
                    )
                )

    return desc, impl


def _pmaddwd(isa: str, prefetch: bool = True) -> tuple[tvm.tirx.PrimFunc, tvm.tirx.PrimFunc]:
    intrin, lanes = PMADDWD[isa]  # int16 lanes per register; one call covers lanes // 4 rows
    rows = lanes // CHUNK
    i8v, i16v, i32v = f"int8x{lanes}", f"int16x{lanes}", f"int32x{lanes // 2}"

    @T.prim_func(s_tir=True)
    def desc(
        P: T.Buffer((16, 4), "int8", offset_factor=1),
        A: T.Buffer((4,), "int8", offset_factor=1),
        C: T.Buffer((16, 2), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16, 0:2], P[0:16, 0:4], A[0:4])
            T.writes(C[0:16, 0:2])
            for i, h, j in T.grid(16, 2, 2):
                with T.sblock("update"):
                    vi, vh, vj = T.axis.remap("SSR", [i, h, j])
                    C[vi, vh] = C[vi, vh] + shifted_term(P[vi, vh * 2 + vj], A[vh * 2 + vj])

    @T.prim_func(s_tir=True)
    def impl(
        P: T.Buffer((16, 4), "int8", offset_factor=1),
        A: T.Buffer((4,), "int8", offset_factor=1),
        C: T.Buffer((16, 2), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16, 0:2], P[0:16, 0:4], A[0:4])
            T.writes(C[0:16, 0:2])
            acts = T.meta_var(T.Cast(i16v, _broadcast_dword(A.vload([0], "int8x4"), lanes)) + T.broadcast(T.int16(SHIFT), lanes))
            for part in T.unroll(16 // rows):
                w = T.meta_var(T.Cast(i16v, P.vload([part * rows, 0], i8v)))
                C.vstore([part * rows, 0], C.vload([part * rows, 0], i32v) + T.call_llvm_pure_intrin(i32v, intrin, w, acts))
            if prefetch:
                T.evaluate(
                    T.call_llvm_intrin(
                        "void", "llvm.prefetch.p0", P.access_ptr("r", offset=PREFETCH_BYTES), T.int32(0), T.int32(3), T.int32(1)
                    )
                )

    return desc, impl


def _sdot(prefetch: bool = True) -> tuple[tvm.tirx.PrimFunc, tvm.tirx.PrimFunc]:
    """16 rows x 4 weights in four sdot, signed by signed (no shift)."""

    @T.prim_func(s_tir=True)
    def desc(
        P: T.Buffer((16, 4), "int8", offset_factor=1),
        A: T.Buffer((4,), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], P[0:16, 0:4], A[0:4])
            T.writes(C[0:16])
            for i, j in T.grid(16, 4):
                with T.sblock("update"):
                    vi, vj = T.axis.remap("SR", [i, j])
                    C[vi] = C[vi] + T.Cast("int32", P[vi, vj]) * T.Cast("int32", A[vj])

    @T.prim_func(s_tir=True)
    def impl(
        P: T.Buffer((16, 4), "int8", offset_factor=1),
        A: T.Buffer((4,), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], P[0:16, 0:4], A[0:4])
            T.writes(C[0:16])
            acts = T.meta_var(_broadcast_dword(A.vload([0], "int8x4"), 16))
            for part in T.unroll(4):
                C.vstore(
                    [part * 4],
                    T.call_llvm_pure_intrin("int32x4", SDOT, C.vload([part * 4], "int32x4"), P.vload([part * 4, 0], "int8x16"), acts),
                )
            if prefetch:
                T.evaluate(
                    T.call_llvm_intrin(
                        "void", "llvm.prefetch.p0", P.access_ptr("r", offset=PREFETCH_BYTES), T.int32(0), T.int32(3), T.int32(1)
                    )
                )

    return desc, impl


declare(VNNI_INTRIN, _vnni)
declare(SDOT_INTRIN, _sdot)
declare(VNNI_INTRIN + GEMM_SUFFIX, functools.partial(_vnni, prefetch=False))
declare(SDOT_INTRIN + GEMM_SUFFIX, functools.partial(_sdot, prefetch=False))
for _isa in PMADDWD:
    declare(PMADDWD_INTRIN[_isa], functools.partial(_pmaddwd, _isa))
    declare(PMADDWD_INTRIN[_isa] + GEMM_SUFFIX, functools.partial(_pmaddwd, _isa, prefetch=False))


# ----------------------------------------------------------------------------- compute


def _placeholders(tiles: int, chunks: int) -> tuple[te.Tensor, te.Tensor, te.Tensor]:
    q = te.placeholder((1, chunks, CHUNK), "int8", name="q")
    packed = te.placeholder((tiles, chunks, ROWS, CHUNK), "int8", name="packed")
    corr = te.placeholder((tiles, ROWS), "int32", name="correction")
    return q, packed, corr


def compute_vnni(tiles: int, chunks: int) -> tuple[te.Tensor, ...]:
    q, packed, corr = _placeholders(tiles, chunks)
    c, j = te.reduce_axis((0, chunks), "c"), te.reduce_axis((0, CHUNK), "j")
    part = te.compute((tiles, ROWS), lambda t, i: te.sum(shifted_term(packed[t, c, i, j], q[0, c, j]), axis=[c, j]), name="partial")
    out = te.compute((tiles, ROWS), lambda t, i: part[t, i] - corr[t, i], name="out")
    return q, packed, corr, out


def compute_sdot(tiles: int, chunks: int) -> tuple[te.Tensor, ...]:
    """The plain q * w sum (sdot multiplies signed by signed): the correction is not needed."""
    q, packed, corr = _placeholders(tiles, chunks)
    c, j = te.reduce_axis((0, chunks), "c"), te.reduce_axis((0, CHUNK), "j")
    product = lambda t, i: te.sum(packed[t, c, i, j].astype("int32") * q[0, c, j].astype("int32"), axis=[c, j])  # noqa: E731
    part = te.compute((tiles, ROWS), product, name="partial")
    out = te.compute((tiles, ROWS), lambda t, i: part[t, i], name="out")
    return q, packed, corr, out


def compute_pairs(tiles: int, chunks: int) -> tuple[te.Tensor, ...]:
    """Per row two pair-sums (weights 0-1 and 2-3 of each chunk), as vpmaddwd leaves them."""
    q, packed, corr = _placeholders(tiles, chunks)
    c, j = te.reduce_axis((0, chunks), "c"), te.reduce_axis((0, 2), "j")
    part = te.compute(
        (tiles, ROWS, 2),
        lambda t, i, h: te.sum(shifted_term(packed[t, c, i, h * 2 + j], q[0, c, h * 2 + j]), axis=[c, j]),
        name="partial",
    )
    out = te.compute((tiles, ROWS), lambda t, i: part[t, i, 0] + part[t, i, 1] - corr[t, i], name="out")
    return q, packed, corr, out


# variant -> (compute, tensor intrinsic, whether the compute keeps two pair-sums per row)
_KERNELS = {
    "avx512-vnni": (compute_vnni, VNNI_INTRIN, False),
    "neon-dotprod": (compute_sdot, SDOT_INTRIN, False),
    "avx512": (compute_pairs, PMADDWD_INTRIN["avx512"], True),
    "avx2": (compute_pairs, PMADDWD_INTRIN["avx2"], True),
}


def intrinsic(variant: str, gemm: bool = False) -> tuple[str, bool]:
    """The variant's tensor intrinsic (16 rows x 4 weights), and whether it keeps two pair-sums
    per row. ``gemm``: the form without the weight-stream prefetch, for the GEMM of several
    tokens (i8_gemm.py), whose block reuses each weight from registers: there the prefetch
    only made LLVM store the accumulators after every step."""
    _, intrin, pairs = _KERNELS[variant]
    return intrin + (GEMM_SUFFIX if gemm else ""), pairs


def schedule(func: tvm.tirx.PrimFunc, variant: str, chunks: int, knobs: I8Knobs) -> tvm.s_tir.Schedule:
    """Tiles in parallel; per tile ``groups_per_pass`` groups of 16 rows per pass over the
    k-chunks (unrolled by ``k_unroll``), one tensorized step per group and chunk, the
    accumulators in registers; then the correction and the store."""
    sch = tvm.s_tir.Schedule(func)
    out, part = sch.get_sblock("out"), sch.get_sblock("partial")
    t, _ = sch.get_loops(out)
    sch.parallel(t)
    sch.compute_at(part, t, preserve_unit_loops=True)
    sch.set_scope(part, 0, "local")
    loops = sch.get_loops(part)
    intrin, pairs = intrinsic(variant)
    if pairs:
        i, h, c, j = loops[-4:]
    else:
        i, c, j = loops[-3:]
    npass, g, ii = sch.split(i, [None, knobs.groups_per_pass, GROUP])
    co, ci = sch.split(c, [None, knobs.unroll_for(chunks)])
    if pairs:
        sch.reorder(npass, co, ci, g, ii, h, j)
    else:
        sch.reorder(npass, co, ci, g, ii, j)
    sch.decompose_reduction(part, co)
    sch.tensorize(ii, registered(intrin))
    sch.unroll(ci)
    sch.unroll(g)
    _, lane = sch.split(sch.get_loops(out)[-1], [None, 16])
    sch.vectorize(lane)
    return sch


def build_primfunc(name: str, n_padded: int, k_padded: int, variant: str, knobs: I8Knobs) -> tvm.tirx.PrimFunc:
    """Arguments (q int8 [1, k_padded/4, 4], packed int8 [n_padded/64, k_padded/4, 64, 4],
    correction int32 [n_padded/64, 64], out int32 [n_padded/64, 64]); see layout_i8.bind."""
    knobs.check()
    if variant not in VARIANTS:
        raise UserError(f"unknown int8 GEMV variant {variant!r}; choose {', '.join(VARIANTS)}")
    if n_padded % ROWS or n_padded < ROWS or k_padded % CHUNK or k_padded < CHUNK:
        raise ValueError(f"unpadded shape n_padded={n_padded} k_padded={k_padded}: pad with layout_i8.padded_shape")
    tiles, chunks = n_padded // ROWS, k_padded // CHUNK
    compute = _KERNELS[variant][0]
    sch = schedule(te.create_prim_func(list(compute(tiles, chunks))), variant, chunks, knobs)
    return sch.mod["main"].with_attr("global_symbol", name)


def build(name: str, shape: dict, knobs: dict, target: TargetSpec) -> tvm.tirx.PrimFunc:
    return build_primfunc(name, shape["n_padded"], shape["k_padded"], shape["variant"], knobs_of(I8Knobs, knobs))


OPERATORS = (Operator("i8_gemv", "i8_gemv-1", layout_i8.VERSION, CPU_ISAS, SPACE, kernel_shape, make_case, build, reference),)
