"""Float16-weight GEMM for the output layer of several tokens at once: the server's batched
decode (``bitnet_runtime.batch_step``), where each decoding sequence needs its logits.

Per-token GEMV calls would stream the 656 MB output matrix (2B-4T) once per sequence, more
than all the ternary layers together; this reads each tile of it once per step for every
token. Same layout as f16_gemv (f16-tiles-v1) and the same arithmetic per token: each of a
tile's 64 outputs sums float32(w) * x[k] in k order from zero, as f16_gemv does, so a row of
this kernel's output equals f16_gemv's for that row bit for bit (the batched decode changes
no result). Tokens come in blocks of TOKEN_BLOCK (the runtime pads with zero rows): per tile
and block, at each k the 64 weights are widened once and multiply-added into the block's
4 x 64 accumulators (16 zmm), so the tile streams from memory once and from cache per block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import tvm
from tvm import te, tirx

from bitnet_runtime import layout_f16
from bitnet_runtime import reference as _reference
from bitnet_runtime.layout_f16 import ROWS, TOKEN_BLOCK
from bitnet_runtime.memory import aligned_zeros

from .case import Case
from .operator import CPU_ISAS, FIXED, Operator

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..target import TargetSpec

reference = _reference.f16_gemm
CASE_TOKENS = 6  # a case's tokens: one whole block and one padded


def compute(blocks, tiles: int, k: int) -> tuple[te.Tensor, te.Tensor, te.Tensor]:
    """Tokens as [blocks, TOKEN_BLOCK] (so the block count binds from the arguments' shapes)."""
    x = te.placeholder((blocks, TOKEN_BLOCK, k), "float32", name="x")
    packed = te.placeholder((tiles, k, ROWS), "float16", name="packed")
    r = te.reduce_axis((0, k), "r")
    out = te.compute(
        (blocks, TOKEN_BLOCK, tiles, ROWS), lambda b, m, t, l: te.sum(packed[t, r, l].astype("float32") * x[b, m, r], axis=r), name="out"
    )
    return x, packed, out


def schedule(func: tvm.tirx.PrimFunc) -> tvm.s_tir.Schedule:
    """Tiles in parallel; per tile, token blocks; per block the k loop, then the block's tokens
    (unrolled) and the 64 lanes (vectorized) inside, accumulators in registers."""
    sch = tvm.s_tir.Schedule(func)
    out = sch.get_sblock("out")
    block, token, t, lane, r = sch.get_loops(out)
    sch.reorder(t, block, r, token, lane)
    sch.parallel(t)
    acc = sch.cache_write(out, 0, "local")
    sch.reverse_compute_at(acc, block)
    sch.vectorize(lane)
    sch.decompose_reduction(out, r)
    sch.unroll(token)
    sch.vectorize(sch.get_loops(sch.get_sblock("out_init"))[-1])
    sch.vectorize(sch.get_loops(acc)[-1])
    return sch


def build_primfunc(name: str, n_padded: int, k: int) -> tvm.tirx.PrimFunc:
    """Arguments (x float32 [blocks, TOKEN_BLOCK, k], packed float16 [n_padded/64, k, 64], out
    float32 [blocks, TOKEN_BLOCK, n_padded/64, 64])."""
    if n_padded % ROWS or n_padded < ROWS:
        raise ValueError(f"n_padded={n_padded} is not a positive multiple of {ROWS}: pad with layout_f16.padded_rows")
    blocks = tirx.Var("blocks", "int64")
    sch = schedule(te.create_prim_func(list(compute(blocks, n_padded // ROWS, k))))
    return sch.mod["main"].with_attr("global_symbol", name)


def kernel_shape(n: int, k: int, knobs: dict, target: TargetSpec) -> tuple[dict, dict]:
    return {"n": n, "k": k, "n_padded": layout_f16.padded_rows(n), "k_padded": k}, knobs


def make_case(shape: dict, knobs: dict, rng: np.random.Generator, tokens: int) -> Case:
    """Random tiles and CASE_TOKENS random hidden states (padded to a whole block with zero
    rows); each row within f16_gemv's tolerance of the exact product, padding rows 0.
    (That a row equals f16_gemv's bit for bit is a test of the pair: tests/test_output_layer_kernels.py.)"""
    tiles, k = shape["n_padded"] // ROWS, shape["k"]
    packed = aligned_zeros((tiles, k, ROWS), np.float16)
    packed[...] = rng.standard_normal(packed.shape, dtype=np.float32)
    call = layout_f16.bind_batch({}, shape, CASE_TOKENS)
    call.x[:CASE_TOKENS] = rng.standard_normal((CASE_TOKENS, k), dtype=np.float32)

    def check() -> str | None:
        if not _reference.f16_gemm_close(call.out, call.x, packed):
            return "logits outside the float16 GEMV tolerance"
        return None

    return Case(call.args(packed), 1, call.out, check)


def build(name: str, shape: dict, knobs: dict, target: TargetSpec) -> tvm.tirx.PrimFunc:
    return build_primfunc(name, shape["n_padded"], shape["k"])


OPERATORS = (Operator("f16_gemm", "f16_gemm-1", layout_f16.VERSION, CPU_ISAS, FIXED, kernel_shape, make_case, build, reference),)
