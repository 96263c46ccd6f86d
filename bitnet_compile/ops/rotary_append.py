"""Rotary embedding of one token's q and k, and the KV-cache append, in one pass.

Reads the q|k|v row the fused qkv BitLinear wrote ([1, (heads + 2 kv_heads) * head_dim]),
rotates q and k at position ``pos`` (rotate-half pairing: out[i] = x[i] cos[i] - x[i + d/2]
sin[i] for the first half, x[i] cos[i] + x[i - d/2] sin[i] for the second), writes the
rotated q to its own buffer and the rotated k and the plain v into row ``pos`` of the
head-major caches [kv_heads, context, head_dim]: the cache is written in place, so the
decode step copies nothing.

Written as a TIR loop nest rather than TE: ``pos`` is read from a tensor at run time (one
compiled program serves every position) and the caches are updated in place, neither of
which a TE compute expresses. Float32 in numpy's order (``reference.rotate``), but LLVM fuses
each multiply-add into one rounding: within ``ULPS`` units in the last place of the inputs'
magnitude (v is copied exactly).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import tvm
from tvm.script import tirx as T

from bitnet_runtime import reference as _reference
from bitnet_runtime.memory import aligned_copy, aligned_zeros

from .case import Case, within
from .operator import CPU_ISAS, FIXED, Operator, unplanned

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..target import TargetSpec

reference = _reference.rotary_append
ULPS = _reference.ROTARY_ULPS


def build_primfunc(name: str, heads: int, kv_heads: int, head_dim: int) -> tvm.tirx.PrimFunc:
    half, d, kv_base = head_dim // 2, head_dim, heads * head_dim
    width = (heads + 2 * kv_heads) * head_dim

    @T.prim_func
    def rotary_append(
        qkv: T.Buffer((1, width), "float32"),
        cos_h: T.handle,
        sin_h: T.handle,
        pos: T.Buffer((1,), "int32"),
        kc_h: T.handle,
        vc_h: T.handle,
        q: T.Buffer((heads, d), "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        ctx = T.int64()
        cos = T.match_buffer(cos_h, (ctx, d), "float32")
        sin = T.match_buffer(sin_h, (ctx, d), "float32")
        kc = T.match_buffer(kc_h, (kv_heads, ctx, d), "float32")
        vc = T.match_buffer(vc_h, (kv_heads, ctx, d), "float32")
        p = pos[0]
        for h in range(heads):
            for i in T.vectorized(half):
                q[h, i] = qkv[0, h * d + i] * cos[p, i] - qkv[0, h * d + i + half] * sin[p, i]
                q[h, i + half] = qkv[0, h * d + i + half] * cos[p, i + half] + qkv[0, h * d + i] * sin[p, i + half]
        for g in range(kv_heads):
            for i in T.vectorized(half):
                kc[g, p, i] = qkv[0, kv_base + g * d + i] * cos[p, i] - qkv[0, kv_base + g * d + i + half] * sin[p, i]
                kc[g, p, i + half] = qkv[0, kv_base + g * d + i + half] * cos[p, i + half] + qkv[0, kv_base + g * d + i] * sin[p, i + half]
            for i in T.vectorized(d):
                vc[g, p, i] = qkv[0, kv_base + kv_heads * d + g * d + i]

    return rotary_append.with_attr("global_symbol", name)


# ----------------------------------------------------------------------------- the operator


def make_case(shape: dict, knobs: dict, rng: np.random.Generator, tokens: int) -> Case:
    """A random q|k|v row at a random position of a 37-position cache already holding other
    rows: the kernel must write exactly row ``pos`` and the rotated q."""
    heads, kv_heads, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    context = 37
    qkv = aligned_copy(rng.standard_normal((1, (heads + 2 * kv_heads) * d)).astype(np.float32))
    angles = rng.uniform(-4, 4, (context, d // 2)).astype(np.float32)
    cos, sin = (aligned_copy(np.concatenate((f(angles), f(angles)), axis=1)) for f in (np.cos, np.sin))
    pos = aligned_copy(np.array([rng.integers(0, context)], np.int32))
    kc, vc = (aligned_copy(rng.standard_normal((kv_heads, context, d)).astype(np.float32)) for _ in range(2))
    q = aligned_zeros((heads, d), np.float32)
    want = reference(qkv, cos, sin, int(pos[0]), kc.copy(), vc.copy(), heads)
    got = lambda: np.concatenate((q.ravel(), kc.ravel(), vc.ravel()))  # noqa: E731
    bound = ULPS * np.finfo(np.float32).eps * float(np.abs(qkv).max())
    return Case((qkv, cos, sin, pos, kc, vc, q), 0, q, within(got, np.concatenate([w.ravel() for w in want]), bound, "rotary_append"))


def build(name: str, shape: dict, knobs: dict, target: TargetSpec) -> tvm.tirx.PrimFunc:
    return build_primfunc(name, shape["heads"], shape["kv_heads"], shape["head_dim"])


OPERATORS = (Operator("rotary_append", "rotary_append-1", None, CPU_ISAS, FIXED, unplanned("rotary_append"), make_case, build, reference),)
