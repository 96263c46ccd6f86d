"""2-bit ternary dot products as TVM tensor intrinsics: vpdpbusd (AVX-512 VNNI) and sdot (NEON).

Weights are stored as w + 1 in {0, 1, 2}, four to a byte (layout dot2-v1). vpdpbusd multiplies
unsigned bytes by signed bytes and sums each group of four into int32: exact for every int8
activation. The kernel subtracts sum(activations) once per token to undo the +1. NEON's sdot
multiplies signed by signed, which holds {0, 1, 2} too, but not a masked field (up to 192).

Two forms of the same product:
- ``fields`` (GEMV): each byte field is *masked* in place (p & 3 << 2f), so the product carries
  a factor 4^f that the epilogue divides out exactly (acc_f >> 2f); one vpand per field, no
  shifts, and four independent accumulators.
- ``decoded`` (GEMM; on NEON the GEMV too): each field is shifted down to {0, 1, 2} once and
  reused by many tokens, all four fields feeding one accumulator per token. On NEON one call is
  16 sdot: 4 fields x 4 registers of 4 rows.

The GEMV form prefetches its weight stream ahead (see lut_shuffle.py for why, and why its
vectors are ``T.meta_var``).
"""

from __future__ import annotations

from tvm.script import tirx as T
from tvm.tirx import PrimFunc

from . import declare

ROWS = 16  # int32 lanes of a zmm: rows per vpdpbusd
VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"
FIELDS_INTRIN = "bitnet_dot2_fields_avx512"
PREFETCH_BYTES = 4096  # software prefetch distance per weight stream (a task reads row_blocks streams)
DECODED_INTRINS = {"avx512": "bitnet_dot2_decoded_avx512", "neon": "bitnet_dot2_decoded_neon"}
SDOT = "llvm.aarch64.neon.sdot"


def masked_field_term(p, a, f):
    """(p & (3 << 2f)) as u8 times a as s8: one vpdpbusd lane product, scaled by 4^f."""
    mask = T.shift_left(T.uint8(3), T.Cast("uint8", f * 2))
    return T.Cast("int32", T.bitwise_and(p, mask)) * T.Cast("int32", a)


def decoded_field_term(p, a, f):
    """((p >> 2f) & 3) * a: the weight + 1 of field f times its activation."""
    return T.Cast("int32", T.bitwise_and(T.shift_right(p, T.Cast("uint8", f * 2)), T.uint8(3))) * T.Cast("int32", a)


def _broadcast_dword(a4):
    return T.Shuffle([a4] * ROWS, list(range(4 * ROWS)))


def _broadcast_q(a4):
    """The activation dword in all four lanes of a NEON q register."""
    return T.Shuffle([a4] * 4, list(range(16)))


def _field(p, shift: int, three):
    """Field (shift / 2) of eight 16-bit lanes as {0, 1, 2} bytes (the mask drops what the
    16-bit shift brings in from the neighbour byte)."""
    return T.reinterpret("int8x16", T.bitwise_and(T.shift_right(p, T.broadcast(T.uint16(shift), 8)), three))


def _fields() -> tuple[PrimFunc, PrimFunc]:
    """The masked-field GEMV step (AVX-512)."""

    @T.prim_func(s_tir=True)
    def desc(
        P: T.Buffer((16, 4), "uint8", offset_factor=1),
        A: T.Buffer((4, 4), "int8", offset_factor=1),
        C: T.Buffer((4, 16), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:4, 0:16], P[0:16, 0:4], A[0:4, 0:4])
            T.writes(C[0:4, 0:16])
            for f, i, j in T.grid(4, 16, 4):
                with T.sblock("update"):
                    vf, vi, vj = T.axis.remap("SSR", [f, i, j])
                    C[vf, vi] = C[vf, vi] + masked_field_term(P[vi, vj], A[vf, vj], vf)

    @T.prim_func(s_tir=True)
    def impl(
        P: T.Buffer((16, 4), "uint8", offset_factor=1),
        A: T.Buffer((4, 4), "int8", offset_factor=1),
        C: T.Buffer((4, 16), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:4, 0:16], P[0:16, 0:4], A[0:4, 0:4])
            T.writes(C[0:4, 0:16])
            p = T.meta_var(P.vload([0, 0], "uint8x64"))
            for f in T.unroll(4):
                mask = T.meta_var(T.broadcast(T.shift_left(T.uint8(3), T.Cast("uint8", f * 2)), 64))
                field = T.meta_var(T.reinterpret("int8x64", T.bitwise_and(p, mask)))
                acts = T.meta_var(_broadcast_dword(A.vload([f, 0], "int8x4")))
                C.vstore([f, 0], T.call_llvm_pure_intrin("int32x16", VPDPBUSD, C.vload([f, 0], "int32x16"), field, acts))
            T.evaluate(
                T.call_llvm_intrin("void", "llvm.prefetch.p0", P.access_ptr("r", offset=PREFETCH_BYTES), T.int32(0), T.int32(3), T.int32(1))
            )

    return desc, impl


def _decoded_desc() -> PrimFunc:
    """What both ISAs' decoded step computes."""

    @T.prim_func(s_tir=True)
    def desc(
        P: T.Buffer((16, 4), "uint8", offset_factor=1),
        A: T.Buffer((4, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], P[0:16, 0:4], A[0:4, 0:4])
            T.writes(C[0:16])
            for i, f, j in T.grid(16, 4, 4):
                with T.sblock("update"):
                    vi, vf, vj = T.axis.remap("SRR", [i, f, j])
                    C[vi] = C[vi] + decoded_field_term(P[vi, vj], A[vf, vj], vf)

    return desc


def _decoded_avx512() -> tuple[PrimFunc, PrimFunc]:
    """Four vpdpbusd, one per decoded field."""

    @T.prim_func(s_tir=True)
    def impl(
        P: T.Buffer((16, 4), "uint8", offset_factor=1),
        A: T.Buffer((4, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], P[0:16, 0:4], A[0:4, 0:4])
            T.writes(C[0:16])
            # 16-bit shifts: the & 0x0303 drops the bits a shift brings in from the neighbour byte
            p = T.reinterpret("uint16x32", P.vload([0, 0], "uint8x64"))
            three = T.broadcast(T.uint16(0x0303), 32)
            f0 = T.reinterpret("int8x64", T.bitwise_and(p, three))
            f1 = T.reinterpret("int8x64", T.bitwise_and(T.shift_right(p, T.broadcast(T.uint16(2), 32)), three))
            f2 = T.reinterpret("int8x64", T.bitwise_and(T.shift_right(p, T.broadcast(T.uint16(4), 32)), three))
            f3 = T.reinterpret("int8x64", T.bitwise_and(T.shift_right(p, T.broadcast(T.uint16(6), 32)), three))
            c0 = T.call_llvm_pure_intrin("int32x16", VPDPBUSD, C.vload([0], "int32x16"), f0, _broadcast_dword(A.vload([0, 0], "int8x4")))
            c1 = T.call_llvm_pure_intrin("int32x16", VPDPBUSD, c0, f1, _broadcast_dword(A.vload([1, 0], "int8x4")))
            c2 = T.call_llvm_pure_intrin("int32x16", VPDPBUSD, c1, f2, _broadcast_dword(A.vload([2, 0], "int8x4")))
            C.vstore([0], T.call_llvm_pure_intrin("int32x16", VPDPBUSD, c2, f3, _broadcast_dword(A.vload([3, 0], "int8x4"))))

    return _decoded_desc(), impl


def _decoded_neon() -> tuple[PrimFunc, PrimFunc]:
    """16 sdot: 4 fields x 4 registers of 4 rows."""

    @T.prim_func(s_tir=True)
    def impl(
        P: T.Buffer((16, 4), "uint8", offset_factor=1),
        A: T.Buffer((4, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], P[0:16, 0:4], A[0:4, 0:4])
            T.writes(C[0:16])
            for part in T.unroll(4):  # rows 4 * part .. 4 * part + 3: one q register of weights
                p = T.meta_var(T.reinterpret("uint16x8", P.vload([part * 4, 0], "uint8x16")))
                three = T.meta_var(T.broadcast(T.uint16(0x0303), 8))
                acc = T.meta_var(C.vload([part * 4], "int32x4"))
                c0 = T.meta_var(
                    T.call_llvm_pure_intrin(
                        "int32x4", SDOT, acc, T.reinterpret("int8x16", T.bitwise_and(p, three)), _broadcast_q(A.vload([0, 0], "int8x4"))
                    )
                )
                c1 = T.meta_var(T.call_llvm_pure_intrin("int32x4", SDOT, c0, _field(p, 2, three), _broadcast_q(A.vload([1, 0], "int8x4"))))
                c2 = T.meta_var(T.call_llvm_pure_intrin("int32x4", SDOT, c1, _field(p, 4, three), _broadcast_q(A.vload([2, 0], "int8x4"))))
                C.vstore(
                    [part * 4], T.call_llvm_pure_intrin("int32x4", SDOT, c2, _field(p, 6, three), _broadcast_q(A.vload([3, 0], "int8x4")))
                )

    return _decoded_desc(), impl


declare(FIELDS_INTRIN, _fields)
declare(DECODED_INTRINS["avx512"], _decoded_avx512)
declare(DECODED_INTRINS["neon"], _decoded_neon)
