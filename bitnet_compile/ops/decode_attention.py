"""Attention of one query token over the KV cache, grouped-query: out = softmax(q K^T / sqrt(d)) V.

Each kv head is one parallel task that serves its whole group of query heads, so every K and
V row is read once per group (the 2B-4T shape: 5 kv heads for 20 query heads). The cache is
head-major [kv_heads, context, head_dim], so a head's rows stream contiguously; the length
is ``pos + 1``, read at run time: one kernel serves every position of the context.

Per kv head: the dot products in vector-wide partial sums (``LANES``), the softmax in float32
(max, exp, sum), then the weighted sum of V rows in vector-wide accumulators. Scores go to a
caller-owned scratch [kv_heads, group, context] (allocated once with the cache), not to a
per-call workspace. Float32 with another summation order than numpy's matmul: within
``TOLERANCE`` of ``model.KVCache.attend``.
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
TOLERANCE = _reference.ATTENTION_TOLERANCE  # max |kernel - reference| relative to max |V|


def lanes_for(head_dim: int) -> int:
    """The widest vector piece up to LANES that divides head_dim."""
    return max(w for w in (16, 8, 4, 2, 1) if w <= LANES and head_dim % w == 0)


def build_primfunc(name: str, heads: int, kv_heads: int, head_dim: int) -> tvm.tirx.PrimFunc:
    group, d = heads // kv_heads, head_dim
    lanes = lanes_for(d)
    pieces, scale = d // lanes, float(d) ** -0.5

    @T.prim_func
    def decode_attention(
        q: T.Buffer((heads, d), "float32"),
        kc_h: T.handle,
        vc_h: T.handle,
        pos: T.Buffer((1,), "int32"),
        scores_h: T.handle,
        out: T.Buffer((1, heads * d), "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        ctx = T.int64()
        kc = T.match_buffer(kc_h, (kv_heads, ctx, d), "float32")
        vc = T.match_buffer(vc_h, (kv_heads, ctx, d), "float32")
        scores = T.match_buffer(scores_h, (kv_heads, group, ctx), "float32")
        for g in T.parallel(kv_heads):
            acc = T.decl_buffer((lanes,), "float32", scope="local")
            weighted = T.decl_buffer((group * d,), "float32", scope="local")
            top = T.decl_buffer((group,), "float32", scope="local")
            total = T.decl_buffer((group,), "float32", scope="local")
            for t in range(pos[0] + 1):
                for h in range(group):
                    for lane in T.vectorized(lanes):
                        acc[lane] = T.float32(0)
                    for j in range(pieces):
                        for lane in T.vectorized(lanes):
                            acc[lane] = acc[lane] + q[g * group + h, j * lanes + lane] * kc[g, t, j * lanes + lane]
                    scores[g, h, t] = T.float32(0)
                    for lane in range(lanes):
                        scores[g, h, t] = scores[g, h, t] + acc[lane]
                    scores[g, h, t] = scores[g, h, t] * T.float32(scale)
            for h in range(group):
                top[h] = scores[g, h, 0]
                for t in range(pos[0] + 1):
                    top[h] = T.max(top[h], scores[g, h, t])
                total[h] = T.float32(0)
                for t in range(pos[0] + 1):
                    scores[g, h, t] = T.exp(scores[g, h, t] - top[h])
                    total[h] = total[h] + scores[g, h, t]
                for j in range(pieces):
                    for lane in T.vectorized(lanes):
                        weighted[h * d + j * lanes + lane] = T.float32(0)
            for t in range(pos[0] + 1):
                for h in range(group):
                    for j in range(pieces):
                        for lane in T.vectorized(lanes):
                            weighted[h * d + j * lanes + lane] = (
                                weighted[h * d + j * lanes + lane] + scores[g, h, t] * vc[g, t, j * lanes + lane]
                            )
            for h in range(group):
                for j in range(pieces):
                    for lane in T.vectorized(lanes):
                        out[0, (g * group + h) * d + j * lanes + lane] = weighted[h * d + j * lanes + lane] / total[h]

    return decode_attention.with_attr("global_symbol", name)


# ----------------------------------------------------------------------------- the operator


def check_close(got: np.ndarray, want: np.ndarray, v: np.ndarray) -> str | None:
    bound = TOLERANCE * max(float(np.abs(v).max()), 1e-30)
    worst = float(np.abs(got - want).max())
    return None if worst <= bound else f"attention output off by {worst:.3g} (allowed {bound:.3g})"


def make_case(shape: dict, knobs: dict, rng: np.random.Generator, tokens: int) -> Case:
    """A cache of 41 positions, attended at a random length, with scores large enough that the
    softmax is far from uniform."""
    heads, kv_heads, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    context = 41
    q = aligned_copy((3 * rng.standard_normal((heads, d))).astype(np.float32))
    kc, vc = (aligned_copy(rng.standard_normal((kv_heads, context, d)).astype(np.float32)) for _ in range(2))
    pos = aligned_copy(np.array([rng.integers(0, context)], np.int32))
    scores = aligned_zeros((kv_heads, heads // kv_heads, context), np.float32)
    out = aligned_zeros((1, heads * d), np.float32)
    want = reference(q, kc, vc, int(pos[0]))
    return Case((q, kc, vc, pos, scores, out), 1, out, lambda: check_close(out, want, vc))


def build(name: str, shape: dict, knobs: dict, target: TargetSpec) -> tvm.tirx.PrimFunc:
    return build_primfunc(name, shape["heads"], shape["kv_heads"], shape["head_dim"])


OPERATORS = (
    Operator("decode_attention", "decode_attention-1", None, CPU_ISAS, FIXED, unplanned("decode_attention"), make_case, build, reference),
)
