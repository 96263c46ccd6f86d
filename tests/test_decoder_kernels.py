"""The decode step's kernels between the linears (rmsnorm, rotary_append, decode_attention,
residual_dequantize, gated_act) against their numpy references, over the shapes of the
supported models and odd ones; and the checks themselves fail on a wrong result."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HOST, compile_module

from bitnet_compile.ops import registry

ATTENTION = [
    {"heads": 20, "kv_heads": 5, "head_dim": 128},  # 2B-4T: groups of 4
    {"heads": 16, "kv_heads": 16, "head_dim": 96},  # large: no grouping
    {"heads": 6, "kv_heads": 2, "head_dim": 64},  # groups of 3
    {"heads": 3, "kv_heads": 3, "head_dim": 10},  # a head size no vector width divides
    {"heads": 4, "kv_heads": 1, "head_dim": 6},
]
SHAPES = {
    "rotary_append": ATTENTION,
    "decode_attention": ATTENTION,
    "residual_dequantize": [{"n": 2560, "n_padded": 2560}, {"n": 451, "n_padded": 464}, {"n": 7, "n_padded": 16}],
    "gated_act": [{"n": 6912, "act": "relu2"}, {"n": 67, "act": "relu2"}, {"n": 4096, "act": "silu"}, {"n": 13, "act": "silu"}],
    "rmsnorm": [{"k": 2560}, {"k": 451}, {"k": 7}],
}
TOKEN_PARALLEL = {"residual_dequantize", "gated_act", "rmsnorm"}  # also run on a prompt's tokens
ISA = "avx512" if {"avx512f", "avx512bw"} <= HOST else "avx2"


def _cases(op: str):
    operator = registry.get(op)
    rng = np.random.default_rng(7)
    funcs, cases = {}, []
    for i, shape in enumerate(SHAPES[op]):
        name = f"{op}_{i}"
        funcs[name] = operator.build(name, shape, {}, None)
        for tokens in (1, 3) if op in TOKEN_PARALLEL else (1,):
            cases.append((name, shape, operator.make_case(shape, {}, rng, tokens)))
    return compile_module(funcs, ISA), cases


@pytest.mark.parametrize("op", SHAPES)
def test_decoder_kernel_matches_its_reference(op):
    module, cases = _cases(op)
    for name, shape, case in cases:
        case.poison()
        module[name](*case.args)
        assert case.check() is None, (shape, case.check())


@pytest.mark.parametrize("op", SHAPES)
def test_a_kernel_that_writes_nothing_fails_the_check(op):
    _, cases = _cases(op)
    for _, shape, case in cases:
        case.poison()
        assert case.check() is not None, shape


def test_attention_reads_exactly_the_positions_up_to_pos():
    """Rows past ``pos`` (the future) must not change the result; row ``pos`` must."""
    module, cases = _cases("decode_attention")
    name, _, case = cases[0]
    q, kc, vc, pos, scores, out = case.args
    p = int(pos[0])
    module[name](*case.args)
    first = out.copy()
    kc[:, p + 1 :], vc[:, p + 1 :] = 1e6, 1e6
    module[name](*case.args)
    np.testing.assert_array_equal(out, first)
    vc[:, p] += 1.0
    module[name](*case.args)
    assert not np.array_equal(out, first)


def test_rotary_append_writes_only_row_pos_of_the_caches():
    module, cases = _cases("rotary_append")
    name, _, case = cases[2]
    qkv, cos, sin, pos, kc, vc, q = case.args
    p = int(pos[0])
    before_k, before_v = kc.copy(), vc.copy()
    module[name](*case.args)
    others = np.ones(kc.shape[1], bool)
    others[p] = False
    np.testing.assert_array_equal(kc[:, others], before_k[:, others])
    np.testing.assert_array_equal(vc[:, others], before_v[:, others])
    assert not np.array_equal(vc[:, p], before_v[:, p])


def test_decoder_kernels_are_planned_by_the_program_not_per_linear():
    from bitnet_compile.errors import UserError

    with pytest.raises(UserError, match="decode step"):
        registry.get("decode_attention").kernel_shape(64, 64, {}, None)
