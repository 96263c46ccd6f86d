"""Dequantization: float32 y[m, n] = acc[m, n] * (weight_scale / act_scale[m]).

Reads the matmul's padded int32 output and writes only the N real columns.
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
    weight_scale = te.placeholder((1,), "float32", name="weight_scale")
    factor = te.compute((tokens,), lambda m: weight_scale[0] / act_scale[m], name="factor")
    out = te.compute((tokens, n), lambda m, c: acc[m, c].astype("float32") * factor[m], name="out")
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
