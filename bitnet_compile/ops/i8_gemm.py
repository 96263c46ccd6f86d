"""int8 GEMM for the output layer of several tokens at once: the server's batched decode with
``--output-layer i8`` (``bitnet_runtime.batch_step``).

Per-token GEMV calls would stream the 328 MB int8 matrix (2B-4T) once per sequence; this
reads each tile once per step for a block of TOKEN_BLOCK tokens (the runtime pads with zero
rows). Same layout (i8-tiles-v1), variants and tensor intrinsics as ``i8_gemv``: per tile,
block and chunk of 4 weights, each token's activation dword meets the tile's four 16-row
weight registers, so the weights are loaded once per block and the block's 4 x 64 int32
accumulators stay in registers (16 zmm with VNNI). Integer sums are exact, so each row of
the result equals i8_gemv's for that token bit for bit: batching changes no logit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import tvm
from tvm import te, tirx

from bitnet_runtime import layout_i8
from bitnet_runtime import reference as _reference
from bitnet_runtime.layout_i8 import CHUNK, ROWS, TOKEN_BLOCK
from bitnet_runtime.memory import aligned_zeros

from ..errors import UserError
from ..intrinsics import registered
from .case import Case, exact
from .i8_gemv import GROUP, VARIANTS, kernel_shape, shifted_term
from .i8_gemv import intrinsic as gemv_intrinsic
from .operator import CPU_ISAS, FIXED, Operator

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..target import TargetSpec

reference = _reference.i8_gemm
CASE_TOKENS = 6  # a case's tokens: one whole block and one padded


def compute(blocks, tiles: int, chunks: int, variant: str) -> tuple[te.Tensor, ...]:
    """Tokens as [blocks, TOKEN_BLOCK]; the variant's sum as ``i8_gemv`` computes it per token
    (shifted activations minus the correction; sdot the plain product; the pair-sum
    variants two partial sums per row)."""
    q = te.placeholder((blocks, TOKEN_BLOCK, chunks, CHUNK), "int8", name="q")
    packed = te.placeholder((tiles, chunks, ROWS, CHUNK), "int8", name="packed")
    corr = te.placeholder((tiles, ROWS), "int32", name="correction")
    _, pairs = gemv_intrinsic(variant)
    c = te.reduce_axis((0, chunks), "c")
    if pairs:
        j = te.reduce_axis((0, 2), "j")
        part = te.compute(
            (blocks, TOKEN_BLOCK, tiles, ROWS, 2),
            lambda b, m, t, i, h: te.sum(shifted_term(packed[t, c, i, h * 2 + j], q[b, m, c, h * 2 + j]), axis=[c, j]),
            name="partial",
        )
        out = te.compute(
            (blocks, TOKEN_BLOCK, tiles, ROWS), lambda b, m, t, i: part[b, m, t, i, 0] + part[b, m, t, i, 1] - corr[t, i], name="out"
        )
        return q, packed, corr, out
    j = te.reduce_axis((0, CHUNK), "j")
    if variant == "neon-dotprod":  # sdot multiplies signed by signed: no shift, no correction
        term = lambda b, m, t, i: packed[t, c, i, j].astype("int32") * q[b, m, c, j].astype("int32")  # noqa: E731
        part = te.compute((blocks, TOKEN_BLOCK, tiles, ROWS), lambda b, m, t, i: te.sum(term(b, m, t, i), axis=[c, j]), name="partial")
        return q, packed, corr, te.compute((blocks, TOKEN_BLOCK, tiles, ROWS), lambda b, m, t, i: part[b, m, t, i], name="out")
    part = te.compute(
        (blocks, TOKEN_BLOCK, tiles, ROWS),
        lambda b, m, t, i: te.sum(shifted_term(packed[t, c, i, j], q[b, m, c, j]), axis=[c, j]),
        name="partial",
    )
    return q, packed, corr, te.compute((blocks, TOKEN_BLOCK, tiles, ROWS), lambda b, m, t, i: part[b, m, t, i] - corr[t, i], name="out")


def schedule(func: tvm.tirx.PrimFunc, variant: str) -> tvm.s_tir.Schedule:
    """Tiles in parallel; per tile the token blocks; per block and chunk every token and
    16-row group (unrolled) one tensorized step, accumulators in registers; then the
    correction and the store."""
    sch = tvm.s_tir.Schedule(func)
    out, part = sch.get_sblock("out"), sch.get_sblock("partial")
    block, token, t, i = sch.get_loops(out)
    sch.reorder(t, block, token, i)
    sch.parallel(t)
    sch.compute_at(part, block, preserve_unit_loops=True)
    sch.set_scope(part, 0, "local")
    intrin, pairs = gemv_intrinsic(variant, gemm=True)
    if pairs:  # under the block: the unit block loop, the tokens, the unit tile loop, the rows, ...
        _, m, _, pi, h, c, j = sch.get_loops(part)[-7:]
    else:
        _, m, _, pi, c, j = sch.get_loops(part)[-6:]
    g, ii = sch.split(pi, [None, GROUP])
    sch.reorder(c, m, g, ii, *((h, j) if pairs else (j,)))
    sch.decompose_reduction(part, c)
    sch.tensorize(ii, registered(intrin))
    sch.unroll(m)
    sch.unroll(g)
    _, lane = sch.split(sch.get_loops(out)[-1], [None, 16])
    sch.vectorize(lane)
    return sch


def build_primfunc(name: str, n_padded: int, k_padded: int, variant: str) -> tvm.tirx.PrimFunc:
    """Arguments (q int8 [blocks, TOKEN_BLOCK, k_padded/4, 4], packed int8 [n_padded/64,
    k_padded/4, 64, 4], correction int32 [n_padded/64, 64], out int32 [blocks, TOKEN_BLOCK,
    n_padded/64, 64]); see layout_i8.bind_batch."""
    if variant not in VARIANTS:
        raise UserError(f"unknown int8 GEMM variant {variant!r}; choose {', '.join(VARIANTS)}")
    if n_padded % ROWS or n_padded < ROWS or k_padded % CHUNK or k_padded < CHUNK:
        raise ValueError(f"unpadded shape n_padded={n_padded} k_padded={k_padded}: pad with layout_i8.padded_shape")
    blocks = tirx.Var("blocks", "int64")
    sch = schedule(te.create_prim_func(list(compute(blocks, n_padded // ROWS, k_padded // CHUNK, variant))), variant)
    return sch.mod["main"].with_attr("global_symbol", name)


def make_case(shape: dict, knobs: dict, rng: np.random.Generator, tokens: int) -> Case:
    """Random int8 tiles and CASE_TOKENS token rows (padded to whole blocks with zero rows);
    exact, padding rows 0."""
    n_p, k_p = shape["n_padded"], shape["k_padded"]
    packed = aligned_zeros(layout_i8.packed_shape(n_p, k_p), np.int8)
    for start in range(0, packed.shape[0], 256):
        block = packed[start : start + 256]
        block[...] = rng.integers(-127, 128, block.shape, dtype=np.int8)
    call = layout_i8.bind_batch({}, shape, CASE_TOKENS)
    call.q[:CASE_TOKENS] = rng.integers(-128, 128, (CASE_TOKENS, k_p), dtype=np.int8)
    correction = layout_i8.correction(packed).reshape(-1, ROWS)
    return Case(call.args(packed, correction), 1, call.out, exact(lambda: call.out, reference(call.q, packed)))


def build(name: str, shape: dict, knobs: dict, target: TargetSpec) -> tvm.tirx.PrimFunc:
    return build_primfunc(name, shape["n_padded"], shape["k_padded"], shape["variant"])


OPERATORS = (Operator("i8_gemm", "i8_gemm-1", layout_i8.VERSION, CPU_ISAS, FIXED, kernel_shape, make_case, build, reference),)
