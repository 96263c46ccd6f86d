"""The LUT lookup as a TVM tensor intrinsic over a 16-entry byte shuffle: vpshufb on ymm (AVX2)
and zmm (AVX-512), tbl on NEON q registers (AArch64).

A data-dependent gather does not vectorize (LLVM scalarizes it), and a description holding a
gather does not tensorize. So the lookup of one group for a block of rows is *described* as
a one-hot reduction over the 16 table entries, with only affine indices, and *implemented*
with the byte shuffle on the two byte planes of the int16 table, an interleave of the two
results (vpunpck{l,h}bw; zip1/zip2 on NEON) to rebuild the int16 entries, and int16
accumulation. vpshufb shuffles within each 128-bit lane of a wide register, so the 16-byte
table is replicated across lanes; NEON's tbl takes one 16-byte register, so a NEON block of
rows is looked up one 16-byte slice at a time (LLVM keeps the slices in separate registers). The row order inside a block (see layout lut4-v1) is chosen
so that the unpacked words land in natural row order.

The implementation also prefetches the weight stream PREFETCH_BYTES ahead: decoding streams
weights from DRAM, and the hardware prefetcher alone left the lookups waiting on memory
(measured: 1.8x faster GEMV from DRAM on one core). Its intermediate vectors are
``T.meta_var`` (substituted, not let-bound): with a statement beside them, TVM would spill
let-bound vectors to heap workspaces.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T
from tvm.tirx import PrimFunc

from . import declare

PREFETCH_BYTES = 8192  # software prefetch distance of the weight stream (one per task)


@dataclass(frozen=True)
class VectorISA:
    """What the lookup needs to know about one vector extension."""

    name: str
    rows: int  # rows per block = bytes looked up per intrinsic call
    shuffle: str  # LLVM intrinsic: 16-entry byte table lookup (per 128-bit lane on x86)
    width: int  # bytes the shuffle intrinsic takes at once (a register)

    @property
    def intrin_name(self) -> str:
        return f"bitnet_lut_shuffle_{self.name}"


VECTOR_ISAS = {
    "avx512": VectorISA("avx512", 64, "llvm.x86.avx512.pshuf.b.512", 64),
    "avx2": VectorISA("avx2", 32, "llvm.x86.avx2.pshuf.b", 32),
    # 32 rows = two q registers per plane and lookup: 64 rows would leave too few of the 32
    # registers for the accumulators.
    "neon": VectorISA("neon", 32, "llvm.aarch64.neon.tbl1", 16),
}


def table_entry(t_lo: tirx.PrimExpr, t_hi: tirx.PrimExpr) -> tirx.PrimExpr:
    """int16 table entry from its two int8 planes (low byte read unsigned)."""
    return T.Cast("int16", t_hi) * T.int16(256) + T.Cast("int16", T.Cast("uint8", t_lo))


def lookup_term(p: tirx.PrimExpr, t_lo: tirx.PrimExpr, t_hi: tirx.PrimExpr, e: tirx.PrimExpr) -> tirx.PrimExpr:
    """One-hot form of ``L[p & 15] - L[p >> 4]``: summed over e in [0, 16) it is the group's dot product."""
    entry = table_entry(t_lo, t_hi)
    pos = T.Cast("int32", T.bitwise_and(p, T.uint8(15)))
    neg = T.Cast("int32", T.shift_right(p, T.uint8(4)))
    return T.Select(pos == e, entry, T.int16(0)) - T.Select(neg == e, entry, T.int16(0))


def _unpack_indices(rows: int, high: bool) -> list[int]:
    """shufflevector indices of vpunpck{l,h}bw(a, b): per 16-byte lane, interleave 8 bytes of a and b."""
    base = 8 if high else 0
    out: list[int] = []
    for lane in range(rows // 16):
        for i in range(8):
            out += [lane * 16 + base + i, rows + lane * 16 + base + i]
    return out


def _lookup(isa: VectorISA, plane: tirx.PrimExpr, idx: tirx.PrimExpr) -> tirx.PrimExpr:
    """``plane[idx]`` for all rows of a block: the shuffle on each register-wide slice of idx."""
    if isa.width == isa.rows:
        return T.call_llvm_pure_intrin(f"int8x{isa.rows}", isa.shuffle, plane, idx)
    slices = [
        T.call_llvm_pure_intrin(f"int8x{isa.width}", isa.shuffle, plane, T.Shuffle([idx], list(range(s, s + isa.width))))
        for s in range(0, isa.rows, isa.width)
    ]
    return T.Shuffle(slices, list(range(isa.rows)))


def _lookup_intrin(isa: VectorISA) -> tuple[PrimFunc, PrimFunc]:
    rows, lanes = isa.rows, isa.rows // 16
    half = rows // 2
    u8v, i8v, i16v = f"uint8x{rows}", f"int8x{rows}", f"int16x{half}"
    replicate = list(range(16)) * (isa.width // 16)
    unpack_lo, unpack_hi = _unpack_indices(rows, False), _unpack_indices(rows, True)

    @T.prim_func(s_tir=True)
    def desc(
        P: T.Buffer((lanes, 2, 8), "uint8", offset_factor=1),
        Tb: T.Buffer((2, 16), "int8", offset_factor=1),
        C: T.Buffer((2, lanes, 8), "int16", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:2, 0:lanes, 0:8], P[0:lanes, 0:2, 0:8], Tb[0:2, 0:16])
            T.writes(C[0:2, 0:lanes, 0:8])
            for h, l, i, e in T.grid(2, lanes, 8, 16):
                with T.sblock("update"):
                    vh, vl, vi, ve = T.axis.remap("SSSR", [h, l, i, e])
                    C[vh, vl, vi] = C[vh, vl, vi] + lookup_term(P[vl, vh, vi], Tb[0, ve], Tb[1, ve], ve)

    @T.prim_func(s_tir=True)
    def impl(
        P: T.Buffer((lanes, 2, 8), "uint8", offset_factor=1),
        Tb: T.Buffer((2, 16), "int8", offset_factor=1),
        C: T.Buffer((2, lanes, 8), "int16", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:2, 0:lanes, 0:8], P[0:lanes, 0:2, 0:8], Tb[0:2, 0:16])
            T.writes(C[0:2, 0:lanes, 0:8])
            p = T.meta_var(P.vload([0, 0, 0], u8v))
            pos = T.meta_var(T.reinterpret(i8v, T.bitwise_and(p, T.broadcast(T.uint8(15), rows))))
            neg = T.meta_var(T.reinterpret(i8v, T.shift_right(p, T.broadcast(T.uint8(4), rows))))
            lo_plane = T.meta_var(T.Shuffle([Tb.vload([0, 0], "int8x16")] * (isa.width // 16), replicate))
            hi_plane = T.meta_var(T.Shuffle([Tb.vload([1, 0], "int8x16")] * (isa.width // 16), replicate))
            pos_lo = T.meta_var(_lookup(isa, lo_plane, pos))
            pos_hi = T.meta_var(_lookup(isa, hi_plane, pos))
            neg_lo = T.meta_var(_lookup(isa, lo_plane, neg))
            neg_hi = T.meta_var(_lookup(isa, hi_plane, neg))
            # vpunpck{l,h}bw (zip1/zip2) rebuild the int16 entries L[pos] and L[neg] of rows 0..half, half..rows
            first = T.meta_var(
                T.reinterpret(i16v, T.Shuffle([pos_lo, pos_hi], unpack_lo)) - T.reinterpret(i16v, T.Shuffle([neg_lo, neg_hi], unpack_lo))
            )
            second = T.meta_var(
                T.reinterpret(i16v, T.Shuffle([pos_lo, pos_hi], unpack_hi)) - T.reinterpret(i16v, T.Shuffle([neg_lo, neg_hi], unpack_hi))
            )
            C.vstore([0, 0, 0], C.vload([0, 0, 0], i16v) + first)
            C.vstore([1, 0, 0], C.vload([1, 0, 0], i16v) + second)
            T.evaluate(
                T.call_llvm_intrin("void", "llvm.prefetch.p0", P.access_ptr("r", offset=PREFETCH_BYTES), T.int32(0), T.int32(3), T.int32(1))
            )

    return desc, impl


for _isa in VECTOR_ISAS.values():
    declare(_isa.intrin_name, functools.partial(_lookup_intrin, _isa))
