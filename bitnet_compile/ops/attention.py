"""Decode attention: one token's queries over the KV cache of the positions so far.

out[h, :] = softmax_j(q[h] . k[j, g(h)] / sqrt(d)) @ v[:, g(h)], with grouped-query heads
(g(h) = h // (heads / kv_heads)). The cache is position-major, [context, kv_heads, d], so the
positions so far are a contiguous prefix: the kernel takes that prefix as k and v of dynamic
``length``. Heads run in parallel; per head the scores, their maximum, the exponentials and
their sum stay in a per-head row, the weighted sum of v runs with d in vector lanes.

Precision: float32 throughout; the reference (numpy) normalizes the probabilities before the
product with v and sums in another order, so results agree to about 1e-6 relative
(``reference.ATTENTION_RTOL``), not bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import tvm
from tvm import te, tirx

from bitnet_runtime import reference as _reference
from bitnet_runtime.memory import aligned_copy, aligned_zeros

from .case import Case
from .operator import CPU_ISAS, FIXED, Operator

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..target import TargetSpec

reference = _reference.attention_decode


def compute(length, heads: int, kv_heads: int, d: int) -> tuple[te.Tensor, ...]:
    q = te.placeholder((heads, d), "float32", name="q")
    k = te.placeholder((length, kv_heads, d), "float32", name="k")
    v = te.placeholder((length, kv_heads, d), "float32", name="v")
    group = heads // kv_heads
    r = te.reduce_axis((0, d), "r")
    scale = tirx.const(float(np.float32(d**-0.5)), "float32")
    dots = te.compute((heads, length), lambda h, j: te.sum(q[h, r] * k[j, h // group, r], axis=r), name="dots")
    scores = te.compute((heads, length), lambda h, j: dots[h, j] * scale, name="scores")
    j1 = te.reduce_axis((0, length), "j1")
    top = te.compute((heads,), lambda h: te.max(scores[h, j1], axis=j1), name="top")
    exps = te.compute((heads, length), lambda h, j: te.exp(scores[h, j] - top[h]), name="exps")
    j2 = te.reduce_axis((0, length), "j2")
    total = te.compute((heads,), lambda h: te.sum(exps[h, j2], axis=j2), name="total")
    j3 = te.reduce_axis((0, length), "j3")
    acc = te.compute((heads, d), lambda h, c: te.sum(exps[h, j3] * v[j3, h // group, c], axis=j3), name="acc")
    out = te.compute((heads, d), lambda h, c: acc[h, c] / total[h], name="out")
    return q, k, v, out


def schedule(func: tvm.tirx.PrimFunc) -> tvm.s_tir.Schedule:
    """Heads in parallel; everything of one head under its iteration."""
    sch = tvm.s_tir.Schedule(func)
    h, _ = sch.get_loops(sch.get_sblock("out"))
    sch.parallel(h)
    sch.compute_inline(sch.get_sblock("scores"))
    for name in ("acc", "total", "exps", "top", "dots"):
        sch.compute_at(sch.get_sblock(name), h)
    acc = sch.get_sblock("acc")
    c, j = sch.get_loops(acc)[-2:]
    sch.reorder(j, c)
    sch.vectorize(c)
    sch.decompose_reduction(acc, j)
    return sch


def build_primfunc(name: str, heads: int, kv_heads: int, d: int) -> tvm.tirx.PrimFunc:
    if heads % kv_heads:
        raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}")
    length = tirx.Var("length", "int64")
    sch = schedule(te.create_prim_func(list(compute(length, heads, kv_heads, d))))
    return sch.mod["main"].with_attr("global_symbol", name)


# ----------------------------------------------------------------------------- the operator
# The shape of an attention kernel is (heads, kv_heads, head_dim): in the manifest's terms
# n = heads, k = head_dim, and the extra key kv_heads.


def kernel_shape(n: int, k: int, knobs: dict, target: TargetSpec) -> tuple[dict, dict]:
    """Not padded. As an [n, k] layer shape says nothing of grouping, it is one KV head per
    head here; the planner of a model sets the model's kv_heads."""
    return {"n": n, "k": k, "n_padded": n, "k_padded": k, "kv_heads": n}, knobs


def make_case(shape: dict, knobs: dict, rng: np.random.Generator, tokens: int) -> Case:
    """Random queries over a cache of 37 positions (``tokens`` is not used: one query token)."""
    heads, kv_heads, d, length = shape["n"], shape["kv_heads"], shape["k"], 37
    q = aligned_copy(rng.standard_normal((heads, d)).astype(np.float32))
    k, v = (aligned_copy(rng.standard_normal((length, kv_heads, d)).astype(np.float32)) for _ in range(2))
    out = aligned_zeros((heads, d), np.float32)
    want = reference(q, k, v)
    return Case((q, k, v, out), 1, out, lambda: _reference.attention_mismatch(out, want))


def build(name: str, shape: dict, knobs: dict, target: TargetSpec) -> tvm.tirx.PrimFunc:
    return build_primfunc(name, shape["n"], shape["kv_heads"], shape["k"])


OPERATORS = (Operator("attention_decode", "attention_decode-1", None, CPU_ISAS, FIXED, kernel_shape, make_case, build, reference),)
