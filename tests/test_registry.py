"""The kernel registry: every operator, through the one interface the compiler and the tuner
use (kernel_shape, build, make_case), exact against its numpy reference on odd shapes; and
the registry itself (names, knob defaults that are complete and inside the search spaces)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import HOST, ISA_HOST_FLAGS, ISA_PRESETS

from bitnet_compile import schedule_db
from bitnet_compile.errors import UserError
from bitnet_compile.ops import registry
from bitnet_compile.ops.operator import knobs_of
from bitnet_runtime.layout import round_up

SHAPES = [(1, 4), (31, 7), (65, 131), (200, 300), (640, 2560)]
CASE_TOKENS = 5  # an odd prompt: GEMMs pad it to whole token tiles
VNNI = {"avx512_vnni"} <= HOST
CPU_ISAS = [isa for isa in ISA_PRESETS if ISA_HOST_FLAGS[isa] <= HOST]


def _target(isa: str):
    from bitnet_compile.target import parse_target

    return parse_target("x86-avx512-vnni" if isa == "avx512" and VNNI else ISA_PRESETS[isa])


def _shape(operator, n: int, k: int, knobs: dict, target) -> tuple[dict, dict]:
    """The operator's own padded shape; quantize, tables and dequantize take the padding of the
    matmul they serve, here a generous one (64) that no kernel_shape would choose."""
    shape, built = operator.kernel_shape(n, k, knobs, target)
    if not operator.tunable:
        shape = shape | {"n_padded": round_up(n, 64), "k_padded": round_up(k, 64)}
    return shape, built


def _cases(isa: str) -> list[tuple[str, object]]:
    """(kernel name, Case) for every operator with this ISA variant, at every shape."""
    target = _target(isa)
    funcs, cases = {}, []
    rng = np.random.default_rng(0)
    decoder_ops = {op.op for module in registry.DECODER_MODULES for op in module.OPERATORS}  # test_decoder_kernels.py
    for operator in registry.OPERATORS.values():
        if isa not in operator.isas or (operator.op.startswith("dot2") and not VNNI) or operator.op in decoder_ops:
            continue
        knobs = schedule_db.default_knobs(operator.op, isa) if operator.tunable else {}
        for n, k in SHAPES:
            shape, built = _shape(operator, n, k, knobs, target)
            name = f"{operator.op}_{n}_{k}"
            funcs[name] = operator.build(name, shape, built, target)
            cases.append((name, operator.make_case(shape, built, rng, 1 if operator.tokens == 1 else CASE_TOKENS)))
    return funcs, cases


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_every_registered_cpu_operator_matches_its_reference(isa):
    from conftest import compile_module

    funcs, cases = _cases(isa)
    ops = {name.rsplit("_", 2)[0] for name in funcs}
    assert {"quantize", "lut_table", "dequantize", "lut_gemv", "lut_gemm", "f16_gemv", "i8_gemv"} <= ops
    mod = compile_module(funcs, isa, preset=_target(isa).name)
    for name, case in cases:
        case.poison()
        mod[name](*case.args)
        assert case.check() is None, (name, case.check())


def test_a_wrong_result_is_caught_by_the_case():
    """The cases' checks can fail: a kernel that writes nothing leaves the poison."""
    operator = registry.get("dequantize")
    case = operator.make_case({"n": 5, "k": 3, "n_padded": 64, "k_padded": 64}, {}, np.random.default_rng(0), 3)
    case.poison()
    assert case.check() is not None


def test_every_tunable_default_is_complete_and_inside_its_space():
    for operator in registry.tunable().values():
        for isa in sorted(operator.isas):
            knobs = schedule_db.default_knobs(operator.op, isa)
            assert not operator.space.outside_domains(knobs), (operator.op, isa, knobs)
            assert set(knobs) == set(operator.space.knobs), (operator.op, isa)


def test_knob_classes_have_no_defaults_of_their_own():
    """schedules/defaults.json is the one source of default knobs."""
    from bitnet_compile.ops import dot2_matmul, f16_gemv, gpu_matmul, i8_gemv, lut_matmul

    classes = [lut_matmul.LutKnobs, dot2_matmul.Dot2GemvKnobs, dot2_matmul.Dot2GemmKnobs, f16_gemv.F16Knobs, i8_gemv.I8Knobs,
               gpu_matmul.GpuGemvKnobs, gpu_matmul.GpuGemmKnobs]  # fmt: skip
    for cls in classes:
        assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(cls)), cls


def test_knobs_must_name_every_field_and_nothing_else():
    from bitnet_compile.ops.lut_matmul import LutKnobs

    with pytest.raises(UserError, match="missing row_blocks_per_task"):
        knobs_of(LutKnobs, {"kblock": 32})
    with pytest.raises(UserError, match="unknown token_tile"):
        knobs_of(LutKnobs, {"kblock": 32, "row_blocks_per_task": 1, "token_tile": 4})


def test_the_registry_knows_every_manifest_operator_and_refuses_others():
    from bitnet_runtime.manifest import KERNEL_OPS
    from bitnet_runtime.verify import CHECKS

    assert set(KERNEL_OPS) == set(registry.OPERATORS) == set(CHECKS)  # every kernel an artifact holds, verify checks
    with pytest.raises(UserError, match="no kernel 'nope'"):
        registry.get("nope")
    with pytest.raises(UserError, match="no tunable kernel 'quantize'"):
        registry.get_tunable("quantize")
