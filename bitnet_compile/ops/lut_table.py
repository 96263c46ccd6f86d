"""Table construction: for each group of 4 int8 activations, the 16 sums L[e] of the subsets e,
stored as two int8 byte planes of the int16 entry (layout lut4-v1, see bitnet_runtime.layout).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import tvm
from tvm import te, tirx

from bitnet_runtime import layout
from bitnet_runtime import reference as _reference
from bitnet_runtime.layout import GROUP
from bitnet_runtime.memory import aligned_copy, aligned_zeros

from .case import Case, exact
from .operator import CPU_ISAS, FIXED, Operator

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..target import TargetSpec

reference = _reference.lut_tables


def compute(tokens, k: int) -> tuple[te.Tensor, te.Tensor]:
    q = te.placeholder((tokens, k), "int8", name="q")

    def entry(m, g, e):
        terms = [tirx.Select(((e >> t) & 1) == 1, q[m, g * GROUP + t].astype("int16"), tirx.const(0, "int16")) for t in range(GROUP)]
        return terms[0] + terms[1] + terms[2] + terms[3]

    sums = te.compute((tokens, k // GROUP, 16), entry, name="sums")
    tables = te.compute(
        (tokens, k // GROUP, 2, 16),
        lambda m, g, p, e: tirx.Select(
            p == 0, (sums[m, g, e] & tirx.const(255, "int16")).astype("int8"), (sums[m, g, e] >> tirx.const(8, "int16")).astype("int8")
        ),
        name="tables",
    )
    return q, tables


def schedule(func: tvm.tirx.PrimFunc) -> tvm.s_tir.Schedule:
    """Tokens in parallel; each group's two 16-byte planes as one 32-lane vector."""
    sch = tvm.s_tir.Schedule(func)
    sch.compute_inline(sch.get_sblock("sums"))
    m, g, p, e = sch.get_loops(sch.get_sblock("tables"))
    sch.parallel(m)
    sch.vectorize(sch.fuse(p, e))
    return sch


def build_primfunc(name: str, k: int) -> tvm.tirx.PrimFunc:
    tokens = tirx.Var("tokens", "int64")
    sch = schedule(te.create_prim_func(list(compute(tokens, k))))
    return sch.mod["main"].with_attr("global_symbol", name)


# ----------------------------------------------------------------------------- the operator


def kernel_shape(n: int, k: int, knobs: dict, target: TargetSpec) -> tuple[dict, dict]:
    """K to whole groups of 4; the planner hands the table the padded K of its matmul."""
    return {"n": n, "k": k, "n_padded": n, "k_padded": layout.round_up(k, GROUP)}, knobs


def make_case(shape: dict, knobs: dict, rng: np.random.Generator, tokens: int) -> Case:
    """Full-range int8 activations, the first token all -128 (the int16 entries' extremes); exact."""
    q = rng.integers(-128, 128, (tokens, shape["k_padded"]), dtype=np.int8)
    q[0] = -128
    tables = aligned_zeros(layout.table_shape(tokens, shape["k_padded"]), np.int8)
    return Case((aligned_copy(q), tables), 0, tables, exact(lambda: tables, reference(q)))


def build(name: str, shape: dict, knobs: dict, target: TargetSpec) -> tvm.tirx.PrimFunc:
    return build_primfunc(name, shape["k_padded"])


OPERATORS = (Operator("lut_table", "lut_table-1", None, CPU_ISAS, FIXED, kernel_shape, make_case, build, reference),)
