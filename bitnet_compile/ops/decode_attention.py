"""Attention of decoding tokens over their KV caches, grouped-query: out = softmax(q K^T / sqrt(d)) V.

Row r is one sequence's token, at position pos[r] of the cache in slot slots[r] of the pool
[slots, kv_heads, context, head_dim]; it attends to positions 0..pos[r], read at run time:
one kernel serves every position, and one call every decoding sequence (the server's
batched decode; ``run``'s single token is one row). Each (row, kv head) is one parallel task
that serves its whole group of query heads, so every K and V row is read once per group (the
2B-4T shape: 5 kv heads for 20 query heads) and a task's arithmetic does not depend on the
other rows: a row's output is bit for bit what it would be alone.

Per task, three passes, each written so that LLVM keeps its arithmetic in registers (a
kernel-local array inside a parallel loop lives in heap memory that LLVM cannot promote, so
every partial sum is an expression, and memory is touched once per block):
1. scores and their maximum, one K row at a time for the whole group: each dot product a
   tree of vector products, its lanes summed by halves; the V row of the same position is
   prefetched meanwhile, so pass 3 finds it in cache (every layer's cache comes from memory in a
   decode step);
2. exponentials and their sum, ``EXP_LANES`` scores at a time, with a polynomial e^x
   (``_exp``: libm's expf is a scalar call per score, which cost more than the rest);
3. the weighted sum of V rows, ``BLOCK`` rows per accumulator update.
The cache is head-major, so a task streams its K and V rows contiguously: at a few hundred
positions and more, the kernel runs at the memory's speed. Scores go to a caller-owned
scratch [rows, kv_heads, group, context] (allocated once), not to a per-call workspace.
Float32 in another summation order than numpy's matmul: within ``TOLERANCE`` of
``reference.attend``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import tvm
from tvm.script import tirx as T

from bitnet_runtime import reference as _reference
from bitnet_runtime.memory import aligned_copy, aligned_zeros

from .case import Case
from .operator import CPU_ISAS, FIXED, Operator, unplanned

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..target import TargetSpec

reference = _reference.decode_attention

LANES = 16  # float32 lanes of a zmm (LLVM splits them on narrower vectors)
EXP_LANES = 16  # scores per step of the exponentials
BLOCK = 8  # V rows per accumulator update
TOLERANCE = _reference.ATTENTION_TOLERANCE  # max |kernel - reference| relative to max |V|


def lanes_for(head_dim: int) -> int:
    """The widest vector piece up to LANES that divides head_dim."""
    return max(w for w in (16, 8, 4, 2, 1) if w <= LANES and head_dim % w == 0)


def _tree_sum(values: list):
    """Sum of expressions as a balanced tree (independent additions, short dependency chains)."""
    while len(values) > 1:
        values = [values[i] + values[i + 1] if i + 1 < len(values) else values[i] for i in range(0, len(values), 2)]
    return values[0]


def _lanes_sum(vector, lanes: int):
    """The lanes of a float32 vector added as a tree of halves (shuffles), down to one value."""
    while lanes > 1:
        lanes //= 2
        vector = T.Shuffle([vector], list(range(lanes))) + T.Shuffle([vector], list(range(lanes, 2 * lanes)))
    return vector


def _dot(q, kc, r, head, s, g, t, lanes: int, pieces: int):
    """q[r, head] . kc[s, g, t] as one expression: vector products summed as a tree, then the
    lanes; nothing goes through memory, so LLVM keeps it all in registers."""
    vec = f"float32x{lanes}" if lanes > 1 else "float32"
    products = [q.vload([r, head, j * lanes], vec) * kc.vload([s, g, t, j * lanes], vec) for j in range(pieces)]
    return _lanes_sum(_tree_sum(products), lanes)


def _weighted_rows(scores, vc, r, g, h, s, t0, j, lanes: int, count: int):
    """sum over t0 <= t < t0 + count of scores[r, g, h, t] * vc[s, g, t, j-th piece], as one
    expression: the accumulator is read and written once per ``count`` rows."""
    vec = f"float32x{lanes}" if lanes > 1 else "float32"
    weights = [scores[r, g, h, t0 + u] for u in range(count)]
    terms = [(T.Broadcast(w, lanes) if lanes > 1 else w) * vc.vload([s, g, t0 + u, j * lanes], vec) for u, w in enumerate(weights)]
    return _tree_sum(terms)


_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def _const(value: float, lanes: int, dtype: str = "float32"):
    """A constant as an expression of ``lanes`` lanes."""
    c = T.float32(value) if dtype == "float32" else T.int32(int(value))
    return T.Broadcast(c, lanes) if lanes > 1 else c


def _exp(x, lanes: int):
    """e^x for x <= 0 (a softmax's shifted scores), as one expression over ``lanes`` lanes:
    x = n ln2 + f with |f| <= ln2 / 2, e^f by a polynomial (Cephes' expf coefficients,
    within a few ulp), 2^n through the exponent bits. Below -87 (e^x < 2^-125,
    nothing beside the maximum's 1) x is clamped so 2^n stays a normal float; a NaN passes
    through the comparison and the polynomial."""
    f32, i32 = (f"float32x{lanes}", f"int32x{lanes}") if lanes > 1 else ("float32", "int32")
    x = T.Select(x < _const(-87.0, lanes), _const(-87.0, lanes), x)
    n = T.floor(x * _const(1.4426950408889634, lanes) + _const(0.5, lanes))
    f = x - n * _const(0.693359375, lanes) - n * _const(-2.12194440e-4, lanes)
    p = _const(_EXP_POLY[0], lanes)
    for c in _EXP_POLY[1:]:
        p = p * f + _const(c, lanes)
    p = p * f * f + f + _const(1.0, lanes)
    two_n = T.reinterpret(f32, T.shift_left(T.Cast(i32, n) + _const(127, lanes, "int32"), _const(23, lanes, "int32")))
    return p * two_n


def build_primfunc(name: str, heads: int, kv_heads: int, head_dim: int) -> tvm.tirx.PrimFunc:
    group, d = heads // kv_heads, head_dim
    lanes = lanes_for(d)
    pieces, scale = d // lanes, float(d) ** -0.5
    cache_lines = (d * 4 + 63) // 64  # of a K or V row
    vec = f"float32x{lanes}" if lanes > 1 else "float32"

    @T.prim_func
    def decode_attention(q_h: T.handle, kc_h: T.handle, vc_h: T.handle, slots_h: T.handle, pos_h: T.handle, scores_h: T.handle,
                         out_h: T.handle):  # fmt: skip
        T.func_attr({"tir.noalias": True})
        rows, ctx, pool = T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (rows, heads, d), "float32")
        kc = T.match_buffer(kc_h, (pool, kv_heads, ctx, d), "float32")
        vc = T.match_buffer(vc_h, (pool, kv_heads, ctx, d), "float32")
        slots = T.match_buffer(slots_h, (rows,), "int32")
        pos = T.match_buffer(pos_h, (rows,), "int32")
        scores = T.match_buffer(scores_h, (rows, kv_heads, group, ctx), "float32")
        out = T.match_buffer(out_h, (rows, heads * d), "float32")
        for task in T.parallel(rows * kv_heads):
            r, g = T.meta_var(task // kv_heads), T.meta_var(task % kv_heads)  # expressions: a let would live in memory
            s, length = T.meta_var(slots[r]), T.meta_var(pos[r] + 1)
            weighted = T.decl_buffer((d,), "float32", scope="local")
            top = T.decl_buffer((group,), "float32", scope="local")
            total = T.decl_buffer((group,), "float32", scope="local")
            sums = T.decl_buffer((EXP_LANES,), "float32", scope="local")
            for h in range(group):
                top[h] = T.float32(-3.4e38)
            for t in range(length):  # scores and their maximum: each K row once for the whole group
                for line in T.unroll(cache_lines):  # V row t into the cache now, for pass 3
                    T.evaluate(
                        T.call_llvm_intrin(
                            "void", "llvm.prefetch.p0", T.address_of(vc[s, g, t, line * 16]), T.int32(0), T.int32(3), T.int32(1)
                        )
                    )
                for h in T.unroll(group):
                    scores[r, g, h, t] = _dot(q, kc, r, g * group + h, s, g, t, lanes, pieces) * T.float32(scale)
                    top[h] = T.max(top[h], scores[r, g, h, t])
            for h in range(group):  # exponentials and their sum, EXP_LANES at a time
                for lane in T.vectorized(EXP_LANES):
                    sums[lane] = T.float32(0)
                for b in range(length // EXP_LANES):
                    scores.vstore(
                        [r, g, h, b * EXP_LANES],
                        _exp(scores.vload([r, g, h, b * EXP_LANES], f"float32x{EXP_LANES}") - T.Broadcast(top[h], EXP_LANES), EXP_LANES),
                    )
                    sums.vstore(
                        [0], sums.vload([0], f"float32x{EXP_LANES}") + scores.vload([r, g, h, b * EXP_LANES], f"float32x{EXP_LANES}")
                    )
                total[h] = _lanes_sum(sums.vload([0], f"float32x{EXP_LANES}"), EXP_LANES)
                for t in range(length // EXP_LANES * EXP_LANES, length):
                    scores[r, g, h, t] = _exp(scores[r, g, h, t] - top[h], 1)
                    total[h] = total[h] + scores[r, g, h, t]
            for h in range(group):  # the weighted sum of V rows, one head at a time, BLOCK rows per update
                for j in T.unroll(pieces):
                    for lane in T.vectorized(lanes):
                        weighted[j * lanes + lane] = T.float32(0)
                for b in range(length // BLOCK):
                    for j in T.unroll(pieces):
                        weighted.vstore(
                            [j * lanes],
                            weighted.vload([j * lanes], vec) + _weighted_rows(scores, vc, r, g, h, s, b * BLOCK, j, lanes, BLOCK),
                        )
                for t in range(length // BLOCK * BLOCK, length):
                    for j in T.unroll(pieces):
                        for lane in T.vectorized(lanes):
                            weighted[j * lanes + lane] = weighted[j * lanes + lane] + scores[r, g, h, t] * vc[s, g, t, j * lanes + lane]
                for j in T.unroll(pieces):
                    for lane in T.vectorized(lanes):
                        out[r, (g * group + h) * d + j * lanes + lane] = weighted[j * lanes + lane] / total[h]

    return decode_attention.with_attr("global_symbol", name)


# ----------------------------------------------------------------------------- the operator

CASE_ROWS, CASE_SLOTS, CASE_CONTEXT = 3, 4, 41


def check_close(got: np.ndarray, want: np.ndarray, v: np.ndarray) -> str | None:
    bound = TOLERANCE * max(float(np.abs(v).max()), 1e-30)
    worst = float(np.abs(got - want).max())
    return None if worst <= bound else f"attention output off by {worst:.3g} (allowed {bound:.3g})"


def make_case(shape: dict, knobs: dict, rng: np.random.Generator, tokens: int) -> Case:
    """CASE_ROWS query rows over distinct slots of a CASE_SLOTS-slot pool of CASE_CONTEXT
    positions, each attending at its own length, with scores large enough that the softmax
    is far from uniform."""
    heads, kv_heads, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    q = aligned_copy((3 * rng.standard_normal((CASE_ROWS, heads, d))).astype(np.float32))
    kc, vc = (aligned_copy(rng.standard_normal((CASE_SLOTS, kv_heads, CASE_CONTEXT, d)).astype(np.float32)) for _ in range(2))
    slots = aligned_copy(rng.permutation(CASE_SLOTS)[:CASE_ROWS].astype(np.int32))
    # lengths below one BLOCK, across whole blocks of BLOCK and EXP_LANES plus tails, and the whole cache
    pos = aligned_copy(np.array([rng.integers(0, BLOCK - 1), rng.integers(EXP_LANES, CASE_CONTEXT - 1), CASE_CONTEXT - 1], np.int32))
    scores = aligned_zeros((CASE_ROWS, kv_heads, heads // kv_heads, CASE_CONTEXT), np.float32)
    out = aligned_zeros((CASE_ROWS, heads * d), np.float32)
    want = reference(q, kc, vc, slots, pos)
    return Case((q, kc, vc, slots, pos, scores, out), 1, out, lambda: check_close(out, want, vc))


def build(name: str, shape: dict, knobs: dict, target: TargetSpec) -> tvm.tirx.PrimFunc:
    return build_primfunc(name, shape["heads"], shape["kv_heads"], shape["head_dim"])


OPERATORS = (
    Operator("decode_attention", "decode_attention-2", None, CPU_ISAS, FIXED, unplanned("decode_attention"), make_case, build, reference),
)
