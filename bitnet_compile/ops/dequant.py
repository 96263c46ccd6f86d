"""Dequantization: float32 y[m, n] = (acc[m, n] * weight_scale[n]) * (1 / act_scale[m]).

The weight scale is per output row because fused layers (q|k|v, gate|up) concatenate
matrices that each carry their own scale. Reads the matmul's padded int32 output and writes
only the N real columns; the reciprocal is taken once per token, not per element.
"""

from __future__ import annotations

import tvm
from tvm import te, tirx

from bitnet_runtime import reference as _reference

reference = _reference.dequantize
VECTOR = 16


def compute(tokens, n: int, n_padded: int) -> tuple[te.Tensor, ...]:
    acc = te.placeholder((tokens, n_padded), "int32", name="acc")
    act_scale = te.placeholder((tokens,), "float32", name="act_scale")
    weight_scale = te.placeholder((n,), "float32", name="weight_scale")
    inverse = te.compute((tokens,), lambda m: tirx.const(1.0, "float32") / act_scale[m], name="inverse")
    out = te.compute((tokens, n), lambda m, c: (acc[m, c].astype("float32") * weight_scale[c]) * inverse[m], name="out")
    return acc, act_scale, weight_scale, out


def schedule(func: tvm.tirx.PrimFunc) -> tvm.s_tir.Schedule:
    sch = tvm.s_tir.Schedule(func)
    m, c = sch.get_loops(sch.get_sblock("out"))
    sch.parallel(m)
    _, inner = sch.split(c, [None, VECTOR])
    sch.vectorize(inner)
    return sch


def build_primfunc(name: str, n: int, n_padded: int) -> tvm.tirx.PrimFunc:
    tokens = tirx.Var("tokens", "int64")
    sch = schedule(te.create_prim_func(list(compute(tokens, n, n_padded))))
    return sch.mod["main"].with_attr("global_symbol", name)
