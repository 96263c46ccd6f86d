"""Rotary embedding of decoding tokens' q and k, and the KV-cache append, in one pass.

Row r is one sequence's token: the q|k|v row the fused qkv BitLinear wrote ([rows, (heads +
2 kv_heads) * head_dim]), at position pos[r] of the sequence whose cache is slot slots[r].
Rotates q and k (rotate-half pairing: out[i] = x[i] cos[i] - x[i + d/2] sin[i] for the
first half, x[i] cos[i] + x[i - d/2] sin[i] for the second), writes the rotated q to its own
buffer [rows, heads, head_dim] and the rotated k and the plain v into row pos[r] of slot
slots[r] of the head-major caches [slots, kv_heads, context, head_dim], in place: the decode
step copies nothing. One row is ``run``'s token (its sequence's cache as a one-slot pool);
many are the server's batched decode, each row computed exactly as if it were alone.

Written as a TIR loop nest rather than TE: positions and slots are read from tensors at run
time (one compiled program serves every position) and the caches are updated in place,
neither of which a TE compute expresses. Float32 in numpy's order (``reference.rotate``),
but LLVM fuses each multiply-add into one rounding: within ``ULPS`` units in the last place
of the inputs' magnitude (v is copied exactly).
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
    def rotary_append(qkv_h: T.handle, cos_h: T.handle, sin_h: T.handle, slots_h: T.handle, pos_h: T.handle, kc_h: T.handle,
                      vc_h: T.handle, q_h: T.handle):  # fmt: skip
        T.func_attr({"tir.noalias": True})
        rows, ctx, pool = T.int64(), T.int64(), T.int64()
        qkv = T.match_buffer(qkv_h, (rows, width), "float32")
        cos = T.match_buffer(cos_h, (ctx, d), "float32")
        sin = T.match_buffer(sin_h, (ctx, d), "float32")
        slots = T.match_buffer(slots_h, (rows,), "int32")
        pos = T.match_buffer(pos_h, (rows,), "int32")
        kc = T.match_buffer(kc_h, (pool, kv_heads, ctx, d), "float32")
        vc = T.match_buffer(vc_h, (pool, kv_heads, ctx, d), "float32")
        q = T.match_buffer(q_h, (rows, heads, d), "float32")
        for r in range(rows):
            p, s = pos[r], slots[r]
            for h in range(heads):
                for i in T.vectorized(half):
                    q[r, h, i] = qkv[r, h * d + i] * cos[p, i] - qkv[r, h * d + i + half] * sin[p, i]
                    q[r, h, i + half] = qkv[r, h * d + i + half] * cos[p, i + half] + qkv[r, h * d + i] * sin[p, i + half]
            for g in range(kv_heads):
                for i in T.vectorized(half):
                    kc[s, g, p, i] = qkv[r, kv_base + g * d + i] * cos[p, i] - qkv[r, kv_base + g * d + i + half] * sin[p, i]
                    kc[s, g, p, i + half] = (
                        qkv[r, kv_base + g * d + i + half] * cos[p, i + half] + qkv[r, kv_base + g * d + i] * sin[p, i + half]
                    )
                for i in T.vectorized(d):
                    vc[s, g, p, i] = qkv[r, kv_base + kv_heads * d + g * d + i]

    return rotary_append.with_attr("global_symbol", name)


# ----------------------------------------------------------------------------- the operator

CASE_ROWS, CASE_SLOTS, CASE_CONTEXT = 3, 4, 37


def make_case(shape: dict, knobs: dict, rng: np.random.Generator, tokens: int) -> Case:
    """CASE_ROWS q|k|v rows, in distinct slots of a CASE_SLOTS-slot pool already holding other
    rows, each at its own random position: the kernel must write exactly those cache rows
    and the rotated q."""
    heads, kv_heads, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    qkv = aligned_copy(rng.standard_normal((CASE_ROWS, (heads + 2 * kv_heads) * d)).astype(np.float32))
    angles = rng.uniform(-4, 4, (CASE_CONTEXT, d // 2)).astype(np.float32)
    cos, sin = (aligned_copy(np.concatenate((f(angles), f(angles)), axis=1)) for f in (np.cos, np.sin))
    slots = aligned_copy(rng.permutation(CASE_SLOTS)[:CASE_ROWS].astype(np.int32))
    pos = aligned_copy(rng.integers(0, CASE_CONTEXT, CASE_ROWS).astype(np.int32))
    kc, vc = (aligned_copy(rng.standard_normal((CASE_SLOTS, kv_heads, CASE_CONTEXT, d)).astype(np.float32)) for _ in range(2))
    q = aligned_zeros((CASE_ROWS, heads, d), np.float32)
    want = reference(qkv, cos, sin, slots, pos, kc.copy(), vc.copy(), heads)
    got = lambda: np.concatenate((q.ravel(), kc.ravel(), vc.ravel()))  # noqa: E731
    bound = ULPS * np.finfo(np.float32).eps * float(np.abs(qkv).max())
    return Case(
        (qkv, cos, sin, slots, pos, kc, vc, q), 0, q, within(got, np.concatenate([w.ravel() for w in want]), bound, "rotary_append")
    )


def build(name: str, shape: dict, knobs: dict, target: TargetSpec) -> tvm.tirx.PrimFunc:
    return build_primfunc(name, shape["heads"], shape["kv_heads"], shape["head_dim"])


OPERATORS = (Operator("rotary_append", "rotary_append-2", None, CPU_ISAS, FIXED, unplanned("rotary_append"), make_case, build, reference),)
