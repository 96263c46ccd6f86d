"""2-bit ternary matmul with VNNI or sdot: int32 out[M, N] = q[M, K] @ W[N, K]^T, weights in layout dot2-v1.

The second kernel family, the default where AVX-512 VNNI exists and opt-in on NEON (sdot): no
table, no per-token preprocessing beyond int8 quantization, and one vpdpbusd (four sdot) per
16 rows x 4 weights. For GEMM the decoded weights of a k-chunk stay in registers across a tile
of tokens, which the LUT family cannot do (its lookups are per token). The GEMV masks fields
in place on AVX-512 (``compute_gemv``); sdot cannot take a masked field (up to 192 as a signed
byte), so on NEON the GEMV decodes them like the GEMM (``compute_gemv_decoded``).

Exactness: products are u8 {0, 1, 2} (times 4^f in the masked GEMV form) by s8, summed in
int32; |acc| <= 192 * 128 * K / 4, exact for K up to about 350 000. The +1 of the storage is
removed by subtracting sum(q) per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import tvm
from tvm import te, tirx

from bitnet_runtime import layout_dot2
from bitnet_runtime import reference as _reference
from bitnet_runtime.layout_dot2 import CHUNK
from bitnet_runtime.memory import aligned_copy

from ..errors import UserError
from ..intrinsics import registered
from ..intrinsics.dot2_products import DECODED_INTRINS, FIELDS_INTRIN, ROWS, decoded_field_term, masked_field_term
from .case import Case, exact, exact_product
from .operator import GEMM_TOKENS, Operator, knobs_of
from .space import Constraint, SearchSpace, require_positive

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..target import TargetSpec

reference = _reference.ternary_matmul


@dataclass(frozen=True)
class Dot2GemvKnobs:
    """Schedule knobs of the dot2 GEMV.

    row_blocks: blocks of 16 rows one task computes side by side (independent accumulators
        hide vpdpbusd latency; the weights of a k-chunk are read once per block).
    k_unroll: k-chunks (16 weights) unrolled in the loop.
    """

    row_blocks: int
    k_unroll: int

    def check(self) -> None:
        require_positive(self, "row_blocks", "k_unroll")


@dataclass(frozen=True)
class Dot2GemmKnobs:
    """Schedule knobs of the dot2 GEMM.

    row_blocks: as for the GEMV.
    token_tile: tokens sharing one decode of the weights (row_blocks * token_tile int32
        accumulators must fit the 32 zmm registers).
    """

    row_blocks: int
    token_tile: int

    def check(self) -> None:
        require_positive(self, "row_blocks", "token_tile")
        if self.row_blocks * self.token_tile > 24:
            raise UserError(f"knobs row_blocks * token_tile = {self.row_blocks * self.token_tile} exceed the 24 accumulator registers")


_EVERY_THREAD = Constraint("row_blocks == 1 or 16 * row_blocks * threads <= n", "every thread gets a task")
GEMV_SPACE = SearchSpace(
    knobs={"row_blocks": (1, 2, 3, 4, 6, 8), "k_unroll": (1, 2, 4, 8)},
    constraints=(_EVERY_THREAD, Constraint("k_unroll == 1 or 16 * k_unroll <= k", "an unrolled step longer than K only pads K")),
)
GEMM_SPACE = SearchSpace(
    knobs={"row_blocks": (1, 2, 3, 4, 6), "token_tile": (1, 2, 3, 4, 6, 8, 12)},
    constraints=(_EVERY_THREAD, Constraint("row_blocks * token_tile <= 24", "the int32 accumulators must fit the 32 zmm registers")),
)


def kernel_shape(n: int, k: int, knobs: dict, target: TargetSpec, gemv: bool) -> tuple[dict, dict]:
    """The manifest shape of an (n, k) layer padded for these knobs alone (N to whole tasks of
    row blocks, K to whole unrolled steps for the GEMV), and the knobs."""
    n_p, k_p = layout_dot2.padded_shape(n, k, knobs["row_blocks"], knobs["k_unroll"] if gemv else 1)
    return {"n": n, "k": k, "n_padded": n_p, "k_padded": k_p}, knobs


def make_case(shape: dict, knobs: dict, rng: np.random.Generator, tokens: int) -> Case:
    """Random ternary weights in dot2-v1 and ``tokens`` int8 activation rows (the GEMM's padded
    to whole token tiles, as the runtime pads a prompt)."""
    n, k, n_p, k_p = (shape[key] for key in ("n", "k", "n_padded", "k_padded"))
    w = rng.integers(-1, 2, (n, k), dtype=np.int8)
    call = layout_dot2.bind({}, shape | knobs, tokens)
    call.q[:, :k] = rng.integers(-128, 128, (tokens, k), dtype=np.int8)
    packed = aligned_copy(layout_dot2.pack_ternary(w, n_p, k_p))
    return Case(call.args(packed), 1, call.out, exact(lambda: call.out[:, :n], exact_product(call.q[:, :k], w)))


def _activation_sum(acts: te.Tensor, lead: tuple) -> te.Tensor:
    c, f, j = (te.reduce_axis((0, acts.shape[len(lead) + d]), name) for d, name in enumerate("cfj"))
    return te.compute(lead, lambda *t: te.sum(acts[(*t, c, f, j)].astype("int32"), axis=[c, f, j]), name="asum")


def compute_gemv(n: int, k: int) -> tuple[te.Tensor, te.Tensor, te.Tensor]:
    """One token; the four masked fields accumulate apart and are scaled down (exactly) at the end."""
    acts = te.placeholder((1, k // CHUNK, 4, 4), "int8", name="acts")
    packed = te.placeholder((n // ROWS, k // CHUNK, ROWS, 4), "uint8", name="packed")
    c, j = te.reduce_axis((0, k // CHUNK), "c"), te.reduce_axis((0, 4), "j")
    part = te.compute(
        (1, n // ROWS, 4, ROWS),
        lambda t, nb, f, i: te.sum(masked_field_term(packed[nb, c, i, j], acts[t, c, f, j], f), axis=[c, j]),
        name="partial",
    )
    asum = _activation_sum(acts, (1,))
    out = te.compute(
        (1, n // ROWS, ROWS),
        lambda t, nb, i: part[t, nb, 0, i] + (part[t, nb, 1, i] >> 2) + (part[t, nb, 2, i] >> 4) + (part[t, nb, 3, i] >> 6) - asum[t],
        name="out",
    )
    return acts, packed, out


def compute_gemv_decoded(n: int, k: int) -> tuple[te.Tensor, te.Tensor, te.Tensor]:
    """One token, fields decoded to {0, 1, 2} (the NEON GEMV); same arguments as ``compute_gemv``."""
    acts = te.placeholder((1, k // CHUNK, 4, 4), "int8", name="acts")
    packed = te.placeholder((n // ROWS, k // CHUNK, ROWS, 4), "uint8", name="packed")
    c, f, j = (te.reduce_axis((0, ext), name) for ext, name in ((k // CHUNK, "c"), (4, "f"), (4, "j")))
    part = te.compute(
        (1, n // ROWS, ROWS),
        lambda t, nb, i: te.sum(decoded_field_term(packed[nb, c, i, j], acts[t, c, f, j], f), axis=[c, f, j]),
        name="partial",
    )
    asum = _activation_sum(acts, (1,))
    out = te.compute((1, n // ROWS, ROWS), lambda t, nb, i: part[t, nb, i] - asum[t], name="out")
    return acts, packed, out


def compute_gemm(tiles, token_tile: int, n: int, k: int) -> tuple[te.Tensor, te.Tensor, te.Tensor]:
    """Tokens as [tiles, token_tile] (the runtime pads the count), fields decoded to {0, 1, 2}."""
    acts = te.placeholder((tiles, token_tile, k // CHUNK, 4, 4), "int8", name="acts")
    packed = te.placeholder((n // ROWS, k // CHUNK, ROWS, 4), "uint8", name="packed")
    c, f, j = (te.reduce_axis((0, ext), name) for ext, name in ((k // CHUNK, "c"), (4, "f"), (4, "j")))
    part = te.compute(
        (tiles, token_tile, n // ROWS, ROWS),
        lambda g, t, nb, i: te.sum(decoded_field_term(packed[nb, c, i, j], acts[g, t, c, f, j], f), axis=[c, f, j]),
        name="partial",
    )
    asum = _activation_sum(acts, (tiles, token_tile))
    out = te.compute((tiles, token_tile, n // ROWS, ROWS), lambda g, t, nb, i: part[g, t, nb, i] - asum[g, t], name="out")
    return acts, packed, out


def schedule_gemv(func: tvm.tirx.PrimFunc, knobs: Dot2GemvKnobs, isa: str = "avx512") -> tvm.s_tir.Schedule:
    """Tasks of ``row_blocks`` row blocks; per task the k-chunks (unrolled by ``k_unroll``)
    feed the accumulators, one tensorized step per block and chunk: on AVX-512 a vpdpbusd
    quartet on the masked fields (4 * row_blocks accumulators, ``compute_gemv``), on NEON the
    decoded intrinsic (row_blocks accumulators, ``compute_gemv_decoded``)."""
    sch = tvm.s_tir.Schedule(func)
    out, part = sch.get_sblock("out"), sch.get_sblock("partial")
    _, nb, _ = sch.get_loops(out)
    task, _ = sch.split(nb, [None, knobs.row_blocks])
    sch.parallel(task)
    sch.compute_at(part, task, preserve_unit_loops=True)
    sch.set_scope(part, 0, "local")
    if isa == "avx512":
        pnb, pf, pi, pc, pj = sch.get_loops(part)[-5:]
        inner, at, intrin = (pnb, pf, pi, pj), pf, FIELDS_INTRIN
    else:
        pnb, pi, pc, pf, pj = sch.get_loops(part)[-5:]
        inner, at, intrin = (pnb, pi, pf, pj), pi, DECODED_INTRINS[isa]
    chunk, unrolled = sch.split(pc, [None, knobs.k_unroll])
    sch.reorder(chunk, unrolled, *inner)
    sch.decompose_reduction(part, chunk)
    sch.tensorize(at, registered(intrin))
    sch.unroll(unrolled)
    sch.unroll(pnb)
    sch.vectorize(sch.get_loops(out)[-1])
    return sch


def schedule_gemm(func: tvm.tirx.PrimFunc, knobs: Dot2GemmKnobs, isa: str = "avx512") -> tvm.s_tir.Schedule:
    """Tasks of ``row_blocks`` row blocks; per token tile and k-chunk the decoded weights are
    reused by ``token_tile`` tokens: row_blocks * token_tile accumulators in registers."""
    sch = tvm.s_tir.Schedule(func)
    out, part = sch.get_sblock("out"), sch.get_sblock("partial")
    tile, t, nb, i = sch.get_loops(out)
    task, nb_inner = sch.split(nb, [None, knobs.row_blocks])
    sch.reorder(task, tile, t, nb_inner, i)
    sch.parallel(task)
    sch.compute_at(part, tile, preserve_unit_loops=True)
    sch.set_scope(part, 0, "local")
    pt, pnb, pi, pc, pf, pj = sch.get_loops(part)[-6:]
    sch.reorder(pc, pnb, pt, pi, pf, pj)
    sch.decompose_reduction(part, pc)
    sch.tensorize(pi, registered(DECODED_INTRINS[isa]))
    sch.unroll(pnb)
    sch.unroll(pt)
    sch.vectorize(sch.get_loops(out)[-1])
    return sch


def build_primfunc(name: str, n: int, k: int, knobs: Dot2GemvKnobs | Dot2GemmKnobs, isa: str = "avx512") -> tvm.tirx.PrimFunc:
    """Scheduled PrimFunc over padded shapes (n a multiple of 16 * row_blocks, k of 16 * k_unroll);
    the knobs' class says which kernel: GEMV or GEMM."""
    knobs.check()
    gemv = isinstance(knobs, Dot2GemvKnobs)
    if isa not in DECODED_INTRINS:
        raise UserError(f"the dot2 kernels have no {isa} variant (they have {', '.join(DECODED_INTRINS)})")
    if n % (ROWS * knobs.row_blocks) or k % (CHUNK * (knobs.k_unroll if gemv else 1)):
        raise ValueError(f"unpadded shape n={n} k={k} for {knobs}")
    if gemv:
        compute = compute_gemv if isa == "avx512" else compute_gemv_decoded
        sch = schedule_gemv(te.create_prim_func(list(compute(n, k))), knobs, isa)
    else:
        tiles = tirx.Var("tiles", "int64")
        sch = schedule_gemm(te.create_prim_func(list(compute_gemm(tiles, knobs.token_tile, n, k))), knobs, isa)
    return sch.mod["main"].with_attr("global_symbol", name)


def build(name: str, shape: dict, knobs: dict, target: TargetSpec, gemv: bool) -> tvm.tirx.PrimFunc:
    typed = knobs_of(Dot2GemvKnobs if gemv else Dot2GemmKnobs, knobs)
    return build_primfunc(name, shape["n_padded"], shape["k_padded"], typed, target.isa)


OPERATORS = (
    Operator(
        "dot2_gemv", "dot2_gemv-1", layout_dot2.VERSION, frozenset(DECODED_INTRINS), GEMV_SPACE, partial(kernel_shape, gemv=True),
        make_case, partial(build, gemv=True), reference,
    ),
    Operator(
        "dot2_gemm", "dot2_gemm-2", layout_dot2.VERSION, frozenset(DECODED_INTRINS), GEMM_SPACE, partial(kernel_shape, gemv=False),
        make_case, partial(build, gemv=False), reference, tokens=GEMM_TOKENS, case_knobs=("token_tile",),
    ),
)  # fmt: skip
