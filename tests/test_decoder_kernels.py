"""The decode step's kernels between the linears (rmsnorm, rotary_append, decode_attention,
residual_dequantize, gated_act) against their numpy references, over the shapes of the
supported models and odd ones; and the checks themselves fail on a wrong result."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HOST, compile_module

from bitnet_compile.ops import registry
from bitnet_runtime.memory import aligned_copy

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


def test_attention_reads_exactly_its_slot_up_to_its_position():
    """Cache rows past a row's position (its future), and other slots, must not change its
    result; the row at its position must."""
    module, cases = _cases("decode_attention")
    name, _, case = cases[0]
    q, kc, vc, slots, pos, scores, out = case.args
    module[name](*case.args)
    first = out.copy()
    s, p = int(slots[0]), int(pos[0])
    others = np.setdiff1d(np.arange(len(kc)), slots)
    kc[s, :, p + 1 :], vc[s, :, p + 1 :], kc[others], vc[others] = 1e6, 1e6, 1e6, 1e6
    module[name](*case.args)
    np.testing.assert_array_equal(out[0], first[0])
    vc[s, :, p] += 1.0
    module[name](*case.args)
    assert not np.array_equal(out[0], first[0])


def test_a_nan_in_a_query_reaches_that_rows_output_only():
    """NaN must reach the logits (where generation stops with an error), not be lost in the
    softmax's maximum or its polynomial exponential; other heads and rows are untouched by it."""
    module, cases = _cases("decode_attention")
    name, _, case = cases[0]
    q, kc, vc, slots, pos, scores, out = case.args
    q[1, 0, 0] = np.nan
    module[name](*case.args)
    d = q.shape[2]
    assert np.isnan(out[1, :d]).all()  # the head it is in
    assert np.isfinite(out[1, d:]).all() and np.isfinite(out[[0, 2]]).all()


def test_rotary_append_writes_only_row_pos_of_each_rows_slot():
    module, cases = _cases("rotary_append")
    name, _, case = cases[2]
    qkv, cos, sin, slots, pos, kc, vc, q = case.args
    before_k, before_v = kc.copy(), vc.copy()
    module[name](*case.args)
    written = np.zeros(kc.shape[0:1] + kc.shape[2:3], bool)  # [slot, position]
    written[slots, pos] = True
    untouched = np.broadcast_to(~written[:, None, :], kc.shape[:3])
    np.testing.assert_array_equal(kc[untouched], before_k[untouched])
    np.testing.assert_array_equal(vc[untouched], before_v[untouched])
    assert all(not np.array_equal(vc[s, :, p], before_v[s, :, p]) for s, p in zip(slots, pos))


@pytest.mark.parametrize("op", ["rotary_append", "decode_attention"])
def test_a_row_computes_the_same_bits_alone_as_beside_others(op):
    """What the server's batched decode relies on: row r of a call over several sequences
    equals, bit for bit, a call with that row alone (``run``'s decode step)."""
    module, cases = _cases(op)
    for name, shape, case in cases:
        args = [aligned_copy(a) for a in case.args]
        module[name](*case.args)
        per_row = {0, 3, 4, 7} if op == "rotary_append" else {0, 3, 4, 5, 6}  # the arguments with a row per token
        for r in range(len(case.args[-1])):
            alone = [aligned_copy(a[r : r + 1] if i in per_row else a) for i, a in enumerate(args)]  # the kernels load aligned
            module[name](*alone)
            np.testing.assert_array_equal(alone[-1][0], case.args[-1][r], err_msg=f"{shape} row {r}")
            if op == "rotary_append":  # and the cache rows it wrote
                s, p = int(case.args[3][r]), int(case.args[4][r])
                np.testing.assert_array_equal(alone[5][s, :, p], case.args[5][s, :, p])
                np.testing.assert_array_equal(alone[6][s, :, p], case.args[6][s, :, p])


def test_decoder_kernels_are_planned_by_the_program_not_per_linear():
    from bitnet_compile.errors import UserError

    with pytest.raises(UserError, match="decode step"):
        registry.get("decode_attention").kernel_shape(64, 64, {}, None)
