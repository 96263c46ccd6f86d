"""RMSNorm in float32, out = w * (x * 1 / sqrt(mean(x^2) + eps)): the final norm before the
output layer (every other norm is fused into its BitLinear's quantization, rmsnorm_quant).

The sum of squares runs as vector-wide partial sums, numpy's mean pairwise: within
``TOLERANCE`` (relative to max |out|).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import tvm
from tvm import te, tirx

from bitnet_runtime import reference as _reference
from bitnet_runtime.memory import aligned_copy, aligned_zeros

from . import act_quant
from .case import Case
from .operator import CPU_ISAS, FIXED, Operator, unplanned

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..target import TargetSpec

reference = _reference.rms_norm
TOLERANCE = _reference.RMSNORM_RTOL


def compute(tokens, k: int) -> tuple[te.Tensor, ...]:
    """x, weight, eps -> the normalized rows (block "normed"; sumsq and inverse per token)."""
    x = te.placeholder((tokens, k), "float32", name="x")
    weight = te.placeholder((k,), "float32", name="weight")
    eps = te.placeholder((1,), "float32", name="eps")
    r = te.reduce_axis((0, k), "r")
    sumsq = te.compute((tokens,), lambda m: te.sum(x[m, r] * x[m, r], axis=r), name="sumsq")
    one = tirx.const(1.0, "float32")
    inverse = te.compute((tokens,), lambda m: one / te.sqrt(sumsq[m] / tirx.const(float(k), "float32") + eps[0]), name="inverse")
    normed = te.compute((tokens, k), lambda m, c: weight[c] * (x[m, c] * inverse[m]), name="normed")
    return x, weight, eps, normed


def build_primfunc(name: str, k: int) -> tvm.tirx.PrimFunc:
    """Tokens in parallel; per token the vector partial sums, the inverse, the scaled row."""
    tokens = tirx.Var("tokens", "int64")
    sch = tvm.s_tir.Schedule(te.create_prim_func(list(compute(tokens, k))))
    sumsq, inverse, out = (sch.get_sblock(b) for b in ("sumsq", "inverse", "normed"))
    lanes = act_quant.lanes_dividing(k)
    _, r_inner = sch.split(sch.get_loops(sumsq)[1], [None, lanes])
    partial = sch.rfactor(r_inner, 0)
    token, c = sch.get_loops(out)
    sch.parallel(token)
    for block in (inverse, sumsq, partial):
        sch.compute_at(block, token)
    act_quant.vectorize_partial(sch, partial, lanes)
    _, inner = sch.split(c, [None, act_quant.lanes_dividing(k)])
    sch.vectorize(inner)
    return sch.mod["main"].with_attr("global_symbol", name)


# ----------------------------------------------------------------------------- the operator


def make_case(shape: dict, knobs: dict, rng: np.random.Generator, tokens: int) -> Case:
    k = shape["k"]
    x = aligned_copy((rng.standard_normal((tokens, k)) * rng.uniform(0.01, 100)).astype(np.float32))
    weight = aligned_copy((1 + 0.2 * rng.standard_normal(k)).astype(np.float32))
    eps = aligned_copy(np.array([1e-5], np.float32))
    out = aligned_zeros((tokens, k), np.float32)
    want = reference(x, weight, float(eps[0]))

    def close() -> str | None:
        worst = float(np.max(np.abs(out - want))) / max(float(np.abs(want).max()), 1e-30)
        return None if worst <= TOLERANCE else f"rmsnorm off by {worst:.3g} relative (allowed {TOLERANCE:g})"

    return Case((x, weight, eps, out), 0, out, close)


def build(name: str, shape: dict, knobs: dict, target: TargetSpec) -> tvm.tirx.PrimFunc:
    return build_primfunc(name, shape["k"])


OPERATORS = (Operator("rmsnorm", "rmsnorm-1", None, CPU_ISAS, FIXED, unplanned("rmsnorm"), make_case, build, reference),)
