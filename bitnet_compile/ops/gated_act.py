"""The gated MLP's activation: h = act(gate) * up, from the fused gate|up BitLinear's row
[tokens, 2 * ffn] (gate first). ``act`` is relu2 (max(g, 0)^2, BitNet b1.58 2B-4T) or silu
(g / (1 + exp(-g)), the Llama-style checkpoints).

relu2 is exact against ``model.relu2``; silu's exp is LLVM's, not numpy's: within
``TOLERANCE`` (relative).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import tvm
from tvm import te, tirx

from bitnet_runtime import reference as _reference
from bitnet_runtime.memory import aligned_copy, aligned_zeros

from .case import Case, exact
from .operator import CPU_ISAS, FIXED, Operator, unplanned

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..target import TargetSpec

reference = _reference.gated_act
VECTOR = 16
TOLERANCE = _reference.SILU_RTOL


def _relu2(g):
    positive = te.max(g, tirx.const(0.0, "float32"))
    return positive * positive


def _silu(g):
    return g / (tirx.const(1.0, "float32") + te.exp(-g))


ACTIVATIONS = {"relu2": _relu2, "silu": _silu}


def compute(tokens, ffn: int, act: str) -> tuple[te.Tensor, te.Tensor]:
    gate_up = te.placeholder((tokens, 2 * ffn), "float32", name="gate_up")
    out = te.compute((tokens, ffn), lambda m, c: ACTIVATIONS[act](gate_up[m, c]) * gate_up[m, ffn + c], name="out")
    return gate_up, out


def build_primfunc(name: str, ffn: int, act: str) -> tvm.tirx.PrimFunc:
    tokens = tirx.Var("tokens", "int64")
    sch = tvm.s_tir.Schedule(te.create_prim_func(list(compute(tokens, ffn, act))))
    m, c = sch.get_loops(sch.get_sblock("out"))
    sch.parallel(m)
    _, inner = sch.split(c, [None, VECTOR])
    sch.vectorize(inner)
    return sch.mod["main"].with_attr("global_symbol", name)


# ----------------------------------------------------------------------------- the operator


def make_case(shape: dict, knobs: dict, rng: np.random.Generator, tokens: int) -> Case:
    ffn, act = shape["n"], shape["act"]
    gate_up = aligned_copy((rng.standard_normal((tokens, 2 * ffn)) * 4).astype(np.float32))
    out = aligned_zeros((tokens, ffn), np.float32)
    want = reference(gate_up, act)
    if act == "relu2":
        return Case((gate_up, out), 0, out, exact(lambda: out, want))

    def close() -> str | None:
        worst = float(np.max(np.abs(out - want) / np.maximum(np.abs(want), 1e-30)))
        return None if worst <= TOLERANCE else f"{act} off by {worst:.3g} relative (allowed {TOLERANCE:g})"

    return Case((gate_up, out), 0, out, close)


def build(name: str, shape: dict, knobs: dict, target: TargetSpec) -> tvm.tirx.PrimFunc:
    return build_primfunc(name, shape["n"], shape["act"])


OPERATORS = (Operator("gated_act", "gated_act-1", None, CPU_ISAS, FIXED, unplanned("gated_act"), make_case, build, reference),)
