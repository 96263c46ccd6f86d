"""The kernel registry: every operator the compiler can generate, by manifest name.

Adding an operator is one module in ops/ (with its ``OPERATORS``) and one line in ``MODULES``;
a researcher's experimental kernel is one ``register`` call in a module passed to
``bitnet-compile tune --plugin``.
"""

from __future__ import annotations

from ..errors import UserError
from . import (
    act_quant,
    decode_attention,
    dequant,
    dot2_matmul,
    f16_gemm,
    f16_gemv,
    gated_act,
    gpu_matmul,
    i8_gemm,
    i8_gemv,
    lut_matmul,
    lut_table,
    residual_dequant,
    rmsnorm,
    rmsnorm_quant,
    rotary_append,
)
from .operator import Operator

MODULES = (act_quant, rmsnorm_quant, lut_table, dequant, lut_matmul, dot2_matmul, gpu_matmul, f16_gemv, f16_gemm, i8_gemv, i8_gemm)
# the compiled decode step's kernels between the linears (plan.plan_decoder)
DECODER_MODULES = (rmsnorm, rotary_append, decode_attention, residual_dequant, gated_act)

OPERATORS: dict[str, Operator] = {}


def register(operator: Operator) -> Operator:
    OPERATORS[operator.op] = operator
    return operator


def get(op: str) -> Operator:
    try:
        return OPERATORS[op]
    except KeyError:
        raise UserError(f"no kernel {op!r}; kernels: {', '.join(OPERATORS)}") from None


def tunable() -> dict[str, Operator]:
    """The operators with schedule knobs, which the tuner may search."""
    return {name: op for name, op in OPERATORS.items() if op.tunable}


def get_tunable(op: str) -> Operator:
    operator = OPERATORS.get(op)
    if operator is None or not operator.tunable:
        raise UserError(f"no tunable kernel {op!r}; tunable: {', '.join(tunable())}")
    return operator


for _module in MODULES + DECODER_MODULES:
    for _operator in _module.OPERATORS:
        register(_operator)
