"""Dequantization fused with the residual add: y[m, n] = x[m, n] + (acc[m, n] * weight_scale[n])
* (1 / act_scale[m]).

Where a BitLinear's output goes straight into the residual stream (o_proj, down_proj), the
float32 product never exists: one pass over the int32 accumulators instead of a dequantize
kernel and a numpy add. The float32 operations of ``dequantize`` then ``+``, the last
multiply and the add fused by LLVM (one rounding instead of two): within ``ULPS`` units in the
last place of |x| + |product|.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import tvm
from tvm import te, tirx

from bitnet_runtime import reference as _reference
from bitnet_runtime.memory import aligned_copy, aligned_zeros

from . import dequant
from .case import Case, within
from .operator import CPU_ISAS, FIXED, Operator, unplanned

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..target import TargetSpec

reference = _reference.residual_dequantize
ULPS = _reference.RESIDUAL_ULPS


def compute(tokens, n: int, n_padded: int) -> tuple[te.Tensor, ...]:
    acc, act_scale, weight_scale, product = dequant.compute(tokens, n, n_padded)
    x = te.placeholder((tokens, n), "float32", name="x")
    out = te.compute((tokens, n), lambda m, c: x[m, c] + product[m, c], name="residual")
    return acc, act_scale, weight_scale, x, out


def schedule(func: tvm.tirx.PrimFunc) -> tvm.s_tir.Schedule:
    """Tokens in parallel, columns in vectors; the product inlined into the add."""
    sch = tvm.s_tir.Schedule(func)
    sch.compute_inline(sch.get_sblock("out"))
    return dequant.parallel_rows(sch, "residual")


def build_primfunc(name: str, n: int, n_padded: int) -> tvm.tirx.PrimFunc:
    func = te.create_prim_func(list(compute(tirx.Var("tokens", "int64"), n, n_padded)))
    return schedule(func).mod["main"].with_attr("global_symbol", name)


# ----------------------------------------------------------------------------- the operator


def make_case(shape: dict, knobs: dict, rng: np.random.Generator, tokens: int) -> Case:
    """dequant's case plus a residual row of similar magnitude."""
    n, n_p = shape["n"], shape["n_padded"]
    acc = aligned_copy(rng.integers(-(2**24), 2**24, (tokens, n_p), dtype=np.int32))
    act_scale = aligned_copy(rng.uniform(0.1, 1000, tokens).astype(np.float32))
    weight_scale = aligned_copy(rng.uniform(0.01, 2, n).astype(np.float32))
    x = aligned_copy((rng.standard_normal((tokens, n)) * 1000).astype(np.float32))
    out = aligned_zeros((tokens, n), np.float32)
    want = reference(acc[:, :n], act_scale, weight_scale, x)
    bound = ULPS * np.finfo(np.float32).eps * (np.abs(x) + np.abs(want - x))
    return Case((acc, act_scale, weight_scale, x, out), 0, out, within(lambda: out, want, bound, "residual_dequantize"))


def build(name: str, shape: dict, knobs: dict, target: TargetSpec) -> tvm.tirx.PrimFunc:
    return build_primfunc(name, shape["n"], shape["n_padded"])


OPERATORS = (
    Operator(
        "residual_dequantize", "residual_dequantize-1", None, CPU_ISAS, FIXED, unplanned("residual_dequantize"), make_case, build, reference
    ),
)
