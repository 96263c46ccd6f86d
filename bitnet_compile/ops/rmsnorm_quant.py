"""RMSNorm fused with the int8 absmax quantization of a BitLinear input, one pass per token:
h = w * (x * 1 / sqrt(mean(x^2) + eps)), then q = clamp(round(h * 127 / max|h|)), zero-padded
to the matmul's K. Every normalized BitLinear input (q|k|v after the input norm, gate|up after
the post-attention norm, o and down after the sub-norms) goes through it, so the decoder never
materializes the normalized activations: one launch and no numpy work where there were a
numpy RMSNorm, a copy and a quantize launch.

``eps`` is an argument (float32 [1]): one kernel serves every model of a shape.

Precision: the sum of squares runs as VECTOR-wide partial sums, numpy's mean pairwise, so the
two differ in the last bits of the variance; where h * scale lands that close to a rounding
boundary, q may differ from the reference by one step
(``reference.rmsnorm_quantize_mismatch``, which verify applies too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import tvm
from tvm import te, tirx

from bitnet_runtime import reference as _reference
from bitnet_runtime.memory import aligned_copy, aligned_zeros

from . import act_quant, rmsnorm
from .case import Case
from .operator import CPU_ISAS, FIXED, Operator

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..target import TargetSpec

reference = _reference.rmsnorm_quantize
VECTOR = act_quant.VECTOR


def compute(tokens, k: int, k_padded: int) -> tuple[te.Tensor, ...]:
    """x, weight, eps -> (q, scale)."""
    x, weight, eps, normed = rmsnorm.compute(tokens, k)
    q, scale = act_quant.quantize_of(normed, k, k_padded)
    return x, weight, eps, q, scale


def schedule(func: tvm.tirx.PrimFunc, k: int) -> tvm.s_tir.Schedule:
    """Tokens in parallel; per token the sum of squares as vector partial sums, then the
    quantization of act_quant's schedule, the normalized values recomputed where they are read
    (two multiplies) instead of stored."""
    sch = tvm.s_tir.Schedule(func)
    sch.compute_inline(sch.get_sblock("normed"))
    sumsq, inverse = sch.get_sblock("sumsq"), sch.get_sblock("inverse")
    lanes = act_quant.lanes_dividing(k)
    _, r_inner = sch.split(sch.get_loops(sumsq)[1], [None, lanes])
    partial = sch.rfactor(r_inner, 0)

    token = act_quant.schedule_quantize(sch, k, first=(inverse,))
    sch.compute_at(sumsq, token)
    sch.compute_at(partial, token)
    act_quant.vectorize_partial(sch, partial, lanes)
    return sch


def build_primfunc(name: str, k: int, k_padded: int) -> tvm.tirx.PrimFunc:
    tokens = tirx.Var("tokens", "int64")
    sch = schedule(te.create_prim_func(list(compute(tokens, k, k_padded))), k)
    return sch.mod["main"].with_attr("global_symbol", name)


# ----------------------------------------------------------------------------- the operator


def kernel_shape(n: int, k: int, knobs: dict, target: TargetSpec) -> tuple[dict, dict]:
    """Unpadded: the planner hands it the padded K of the matmul it feeds."""
    return {"n": n, "k": k, "n_padded": n, "k_padded": k}, knobs


def make_case(shape: dict, knobs: dict, rng: np.random.Generator, tokens: int) -> Case:
    """Activations at a random magnitude, norm weights around 1, a model's eps; one step off
    the reference is allowed (``reference.rmsnorm_quantize_mismatch``)."""
    k, k_p = shape["k"], shape["k_padded"]
    x = aligned_copy((rng.standard_normal((tokens, k)) * rng.uniform(0.01, 100)).astype(np.float32))
    weight = aligned_copy((1 + 0.2 * rng.standard_normal(k)).astype(np.float32))
    eps = aligned_copy(np.array([1e-5], np.float32))
    q, scale = aligned_zeros((tokens, k_p), np.int8), aligned_zeros((tokens,), np.float32)
    want_q, want_scale = reference(x, weight, float(eps[0]), k_p)
    return Case((x, weight, eps, q, scale), 0, q, lambda: _reference.rmsnorm_quantize_mismatch(q, scale, want_q, want_scale))


def build(name: str, shape: dict, knobs: dict, target: TargetSpec) -> tvm.tirx.PrimFunc:
    return build_primfunc(name, shape["k"], shape["k_padded"])


OPERATORS = (Operator("rmsnorm_quantize", "rmsnorm_quantize-1", None, CPU_ISAS, FIXED, kernel_shape, make_case, build, reference),)
