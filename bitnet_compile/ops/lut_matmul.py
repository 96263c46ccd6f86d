"""LUT ternary matmul: int32 out[M, N] = tables(a)[M, K] (x) packed ternary W[N, K].

Kept whole in one place: the knob space, the compute definition (TE), the schedule for a
vector ISA, and the numpy reference. GEMV (one token, decode) and GEMM (a prompt, any number
of tokens) share the compute and differ only in the loop order of the schedule.

Exactness: table entries are int16 (|L| <= 512 for int8 activations), and each group adds at
most 4 * 128 = 512 to a row, so a block of ``kblock <= 63`` groups sums in int16 without
overflow (63 * 512 < 32768); blocks are then summed in int32, exact for any K this code can
address. The int16 partial sums stay in vector registers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import tvm
from tvm import te

from bitnet_runtime import layout
from bitnet_runtime import reference as _reference
from bitnet_runtime.layout import GROUP
from bitnet_runtime.memory import aligned_copy

from ..errors import UserError
from ..intrinsics import registered
from ..intrinsics.lut_shuffle import VECTOR_ISAS, VectorISA, lookup_term
from .case import Case, exact, exact_product
from .operator import CPU_ISAS, GEMM_TOKENS, Operator, knobs_of
from .space import Constraint, SearchSpace, require_positive

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..target import TargetSpec

reference = _reference.ternary_matmul
MAX_KBLOCK = 63  # int16 partial sums: 63 groups * 512 < 32768


@dataclass(frozen=True)
class LutKnobs:
    """Schedule knobs of the LUT matmul.

    kblock: groups (of 4 weights) summed in int16 before widening; larger amortizes the
        widening, smaller pads K less.
    row_blocks_per_task: consecutive row blocks one parallel task handles; larger keeps a
        thread's weight stream contiguous, smaller balances the threads.
    """

    kblock: int
    row_blocks_per_task: int

    def check(self) -> None:
        if not 1 <= self.kblock <= MAX_KBLOCK:
            raise UserError(f"knob kblock={self.kblock} out of range 1..{MAX_KBLOCK} (int16 partial sums would overflow)")
        require_positive(self, "row_blocks_per_task")


# What the tuner explores (GEMV and GEMM alike); ``rows`` is the ISA's rows per block. A kblock
# beyond K's groups is clamped (kernel_shape), so such points build the same kernel and the
# tuner measures them once. The GEMM of an artifact takes its GEMV's kblock (it fixes the
# packed weights both read).
SPACE = SearchSpace(
    knobs={"kblock": (8, 16, 24, 32, 48, 63), "row_blocks_per_task": (1, 2, 4, 8)},
    constraints=(Constraint("row_blocks_per_task == 1 or row_blocks_per_task * rows * threads <= n", "every thread gets a task"),),
)


def kernel_shape(n: int, k: int, knobs: dict, target: TargetSpec) -> tuple[dict, dict]:
    """The manifest shape of an (n, k) layer under ``knobs``, and the knobs as built (kblock
    clamped to K)."""
    rows = VECTOR_ISAS[target.isa].rows
    kblock = layout.effective_kblock(k, knobs["kblock"])
    n_p, k_p = layout.padded_shape(n, k, rows, kblock)
    return {"n": n, "k": k, "n_padded": n_p, "k_padded": k_p, "rows": rows}, knobs | {"kblock": kblock}


def make_case(shape: dict, knobs: dict, rng: np.random.Generator, tokens: int) -> Case:
    """Random ternary weights packed for ``knobs`` and ``tokens`` rows of activation tables."""
    n, k, n_p, k_p, rows = (shape[key] for key in ("n", "k", "n_padded", "k_padded", "rows"))
    w = rng.integers(-1, 2, (n, k), dtype=np.int8)
    call = layout.bind({}, shape, tokens)
    call.q[:, :k] = rng.integers(-128, 128, (tokens, k), dtype=np.int8)
    _reference.write_lut_tables(call.q, call.tables)
    packed = aligned_copy(layout.pack_ternary(w, rows, knobs["kblock"]))
    return Case(call.args(packed), 1, call.out, exact(lambda: call.out[:, :n], exact_product(call.q[:, :k], w)))


def compute(tokens, n: int, k: int, isa: VectorISA, kblock: int) -> tuple[te.Tensor, te.Tensor, te.Tensor]:
    """TE definition over padded shapes: n a multiple of the ISA's rows, k of 4 * kblock."""
    rows, lanes = isa.rows, isa.rows // 16
    groups = k // GROUP
    if n % rows or groups % kblock:
        raise ValueError(f"unpadded shape n={n} k={k} for rows={rows} kblock={kblock}")
    tables = te.placeholder((tokens, groups, 2, 16), "int8", name="tables")
    packed = te.placeholder((n // rows, groups, lanes, 2, 8), "uint8", name="packed")
    jj = te.reduce_axis((0, kblock), "jj")
    e = te.reduce_axis((0, 16), "e")

    def partial(m, kb, nb, h, l, i):
        g = kb * kblock + jj
        return te.sum(lookup_term(packed[nb, g, l, h, i], tables[m, g, 0, e], tables[m, g, 1, e], e), axis=[jj, e])

    part = te.compute((tokens, groups // kblock, n // rows, 2, lanes, 8), partial, name="partial")
    kb = te.reduce_axis((0, groups // kblock), "kb")
    out = te.compute(
        (tokens, n // rows, 2, lanes, 8),
        lambda m, nb, h, l, i: te.sum(part[m, kb, nb, h, l, i].astype("int32"), axis=kb),
        name="out",
    )
    return tables, packed, out


def schedule(func: tvm.tirx.PrimFunc, isa: VectorISA, knobs: LutKnobs, gemv: bool) -> tvm.s_tir.Schedule:
    """Row blocks in parallel; per block the k-blocks; per k-block (GEMM: per token) the
    tensorized lookups of ``kblock`` groups into int16 registers, then one widening add."""
    sch = tvm.s_tir.Schedule(func)
    out, part = sch.get_sblock("out"), sch.get_sblock("partial")
    m, nb, h, l, i, kb = sch.get_loops(out)
    task, nb_inner = sch.split(nb, [None, knobs.row_blocks_per_task])
    inner = (m, kb) if gemv else (kb, m)
    sch.reorder(task, nb_inner, *inner, h, l, i)
    sch.parallel(task)
    sch.compute_at(part, inner[1], preserve_unit_loops=True)
    sch.set_scope(part, 0, "local")
    ph, pl, pi, pjj, pe = sch.get_loops(part)[-5:]
    sch.reorder(pjj, ph, pl, pi, pe)
    sch.decompose_reduction(part, pjj)
    sch.tensorize(ph, registered(isa.intrin_name))
    widen = sch.fuse(*sch.get_loops(out)[-3:])
    sch.vectorize(widen)
    if gemv:
        sch.decompose_reduction(out, kb)
    return sch


def build_primfunc(name: str, n: int, k: int, isa_name: str, knobs: LutKnobs, gemv: bool) -> tvm.tirx.PrimFunc:
    """A scheduled, named PrimFunc ready to be put in the artifact's module."""
    knobs.check()
    isa = VECTOR_ISAS[isa_name]
    tokens = 1 if gemv else tvm.tirx.Var("tokens", "int64")
    func = te.create_prim_func(list(compute(tokens, n, k, isa, knobs.kblock)))
    sch = schedule(func, isa, knobs, gemv)
    return sch.mod["main"].with_attr("global_symbol", name)


def build(name: str, shape: dict, knobs: dict, target: TargetSpec, gemv: bool) -> tvm.tirx.PrimFunc:
    return build_primfunc(name, shape["n_padded"], shape["k_padded"], target.isa, knobs_of(LutKnobs, knobs), gemv)


def _rows(target: TargetSpec) -> dict:
    return {"rows": VECTOR_ISAS[target.isa].rows}


OPERATORS = tuple(
    Operator(
        op, version, layout.VERSION, CPU_ISAS, SPACE, kernel_shape, make_case, partial(build, gemv=gemv), reference,
        tokens=1 if gemv else GEMM_TOKENS, context=_rows, case_knobs=("kblock",),
    )
    for op, version, gemv in (("lut_gemv", "lut_gemv-1", True), ("lut_gemm", "lut_gemm-2", False))
)  # fmt: skip
