"""Every kernel against its numpy reference, exactly, over many shapes (odd ones included),
for the AVX2 (ymm) and AVX-512 (zmm) variants."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, compile_module, isa_params

from bitnet_compile.errors import UserError
from bitnet_compile.intrinsics.lut_shuffle import VECTOR_ISAS
from bitnet_compile.ops import act_quant, dequant, lut_matmul, lut_table
from bitnet_runtime import layout, reference
from bitnet_runtime.memory import aligned_copy, aligned_zeros

# (N, K): tiny, odd in both dimensions, not multiples of 4 or of a row block, and K = 16384
# where int16 accumulation would overflow if a k-block were not widened in time.
MATMUL_SHAPES = [(1, 1), (3, 5), (31, 7), (64, 4), (65, 131), (100, 36), (129, 260), (256, 512), (96, 16384), (640, 2560)]
TOKEN_COUNTS = [1, 2, 5]


def _matmul_funcs(isa: str, kblock: int = 32, shapes=MATMUL_SHAPES) -> dict:
    rows = VECTOR_ISAS[isa].rows
    funcs = {}
    for n, k in shapes:
        kb = layout.effective_kblock(k, kblock)
        n_p, k_p = layout.padded_shape(n, k, rows, kb)
        for gemv in (True, False):
            name = f"{'gemv' if gemv else 'gemm'}_{n}_{k}"
            funcs[name] = lut_matmul.build_primfunc(name, n_p, k_p, isa, lut_matmul.LutKnobs(kblock=kb, row_blocks_per_task=1), gemv)
    return funcs


@pytest.fixture(scope="module", params=isa_params())
def matmul_module(request):
    return request.param, compile_module(_matmul_funcs(request.param), request.param)


def _run_matmul(mod, isa: str, name: str, weights: np.ndarray, q: np.ndarray, kblock: int = 32) -> np.ndarray:
    rows = VECTOR_ISAS[isa].rows
    n, k = weights.shape
    kb = layout.effective_kblock(k, kblock)
    n_p, k_p = layout.padded_shape(n, k, rows, kb)
    kernels = {"lut_table": reference.write_lut_tables, name.split("_")[0]: mod[name]}
    call = layout.bind(kernels, {"n_padded": n_p, "k_padded": k_p, "rows": rows}, q.shape[0])
    call.q[:, :k] = q
    return call.run(aligned_copy(layout.pack_ternary(weights, rows, kb)))[:, :n]


@pytest.mark.parametrize("n,k", MATMUL_SHAPES)
def test_lut_matmul_exact_random(matmul_module, n, k):
    isa, mod = matmul_module
    rng = np.random.default_rng(n * 100003 + k)
    w = rng.integers(-1, 2, (n, k), dtype=np.int8)
    for tokens in TOKEN_COUNTS:
        q = rng.integers(-128, 128, (tokens, k), dtype=np.int8)
        kind = "gemv" if tokens == 1 else "gemm"
        got = _run_matmul(mod, isa, f"{kind}_{n}_{k}", w, q)
        np.testing.assert_array_equal(got, reference.ternary_matmul(q, w))


@pytest.mark.parametrize("n,k", [(96, 16384), (640, 2560)])
def test_lut_matmul_exact_at_the_extremes(matmul_module, n, k):
    """-128 everywhere against rows of all +1 / all -1: the largest sums int16 blocks must carry."""
    isa, mod = matmul_module
    w = np.resize(np.array([1, -1, 0], np.int8), n)[:, None] * np.ones((1, k), np.int8)
    for value in (-128, 127):
        q = np.full((1, k), value, np.int8)
        got = _run_matmul(mod, isa, f"gemv_{n}_{k}", w, q)
        np.testing.assert_array_equal(got, reference.ternary_matmul(q, w))
        assert abs(int(got.min())) == 128 * k or value == 127


@pytest.mark.parametrize("isa", isa_params())
def test_largest_kblock_is_exact(isa):
    n, k = 64, 63 * 4 * 3
    mod = compile_module(_matmul_funcs(isa, kblock=lut_matmul.MAX_KBLOCK, shapes=[(n, k)]), isa)
    w = -np.ones((n, k), np.int8)
    q = np.full((1, k), -128, np.int8)
    got = _run_matmul(mod, isa, f"gemv_{n}_{k}", w, q, kblock=lut_matmul.MAX_KBLOCK)
    np.testing.assert_array_equal(got, reference.ternary_matmul(q, w))


def test_kblock_beyond_int16_range_is_refused():
    with pytest.raises(UserError, match="overflow"):
        lut_matmul.LutKnobs(kblock=lut_matmul.MAX_KBLOCK + 1, row_blocks_per_task=1).check()


ELEMENTWISE_K = [(1, 4), (5, 8), (15, 16), (37, 40), (2560, 2560), (6911, 6912)]


@pytest.fixture(scope="module", params=isa_params())
def elementwise_module(request):
    funcs = {}
    for k, k_p in ELEMENTWISE_K:
        funcs[f"quantize_{k}"] = act_quant.build_primfunc(f"quantize_{k}", k, k_p)
        funcs[f"table_{k_p}"] = lut_table.build_primfunc(f"table_{k_p}", k_p)
        funcs[f"dequant_{k}"] = dequant.build_primfunc(f"dequant_{k}", k, k_p)
    return compile_module(funcs, request.param)


@pytest.mark.parametrize("k,k_padded", ELEMENTWISE_K)
def test_quantize_exact(elementwise_module, k, k_padded):
    rng = np.random.default_rng(k)
    for tokens in TOKEN_COUNTS:
        x = (rng.standard_normal((tokens, k)) * rng.uniform(1e-3, 1e3)).astype(np.float32)
        x[0, 0] = 0.0
        q = aligned_zeros((tokens, k_padded), np.int8)
        q[:] = 99  # padding must be overwritten with zeros
        scale = aligned_zeros((tokens,), np.float32)
        elementwise_module[f"quantize_{k}"](aligned_copy(x), q, scale)
        want_q, want_scale = reference.quantize_activations(x, k_padded)
        np.testing.assert_array_equal(q, want_q)
        np.testing.assert_array_equal(scale, want_scale)


def test_quantize_rounds_half_to_even_and_floors_the_scale(elementwise_module):
    """absmax 127 makes scale exactly 1, so x.5 values are exact ties; all-zero hits the floor."""
    x = np.zeros((2, 37), np.float32)
    x[0, :6] = [127.0, 2.5, -2.5, 3.5, 0.5, -1.5]
    q = aligned_zeros((2, 40), np.int8)
    scale = aligned_zeros((2,), np.float32)
    elementwise_module["quantize_37"](aligned_copy(x), q, scale)
    assert q[0, :6].tolist() == [127, 2, -2, 4, 0, -2]
    assert q[1].tolist() == [0] * 40
    assert scale[1] == np.float32(127.0) / np.float32(1e-5)


@pytest.mark.parametrize("k,k_padded", ELEMENTWISE_K)
def test_quantize_agrees_with_the_reference_on_nan_and_inf(elementwise_module, k, k_padded):
    """A float max drops NaN: the kernel must not turn a NaN row into plausible int8 values.
    Row 0 finite, row 1 one NaN, row 2 one +Inf, row 3 one -Inf and a NaN."""
    rng = np.random.default_rng(k)
    x = rng.standard_normal((4, k)).astype(np.float32)
    x[1, rng.integers(k)] = np.nan
    x[2, rng.integers(k)] = np.inf
    x[3, rng.integers(k)], x[3, rng.integers(k)] = -np.inf, np.nan
    q, scale = aligned_zeros((4, k_padded), np.int8), aligned_zeros((4,), np.float32)
    elementwise_module[f"quantize_{k}"](aligned_copy(x), q, scale)
    want_q, want_scale = reference.quantize_activations(x, k_padded)
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(scale, want_scale)  # NaN equals NaN here
    assert np.isnan(scale[1]) and np.isnan(scale[3]) and scale[2] == 0 and np.isfinite(scale[0])


@pytest.mark.parametrize("k,k_padded", ELEMENTWISE_K)
def test_tables_exact(elementwise_module, k, k_padded):
    rng = np.random.default_rng(k)
    for tokens in TOKEN_COUNTS:
        q = rng.integers(-128, 128, (tokens, k_padded), dtype=np.int8)
        q[0, :4] = -128
        tables = aligned_zeros(layout.table_shape(tokens, k_padded), np.int8)
        elementwise_module[f"table_{k_padded}"](aligned_copy(q), tables)
        np.testing.assert_array_equal(tables, reference.lut_tables(q))


@pytest.mark.parametrize("k,k_padded", ELEMENTWISE_K)
def test_dequantize_exact(elementwise_module, k, k_padded):
    n, n_p = k, k_padded
    rng = np.random.default_rng(k)
    for tokens in TOKEN_COUNTS:
        acc = rng.integers(-(2**24), 2**24, (tokens, n_p), dtype=np.int32)
        act_scale = rng.uniform(0.01, 1e4, tokens).astype(np.float32)
        weight_scale = rng.uniform(0.01, 4, n).astype(np.float32)
        out = aligned_zeros((tokens, n), np.float32)
        elementwise_module[f"dequant_{k}"](aligned_copy(acc), aligned_copy(act_scale), aligned_copy(weight_scale), out)
        np.testing.assert_array_equal(out, reference.dequantize(acc[:, :n], act_scale, weight_scale))


_LAZY_INTRINSICS = """
from tvm.s_tir import TensorIntrin
import bitnet_compile.ops.registry  # imports every kernel module
from bitnet_compile.intrinsics import _BUILDERS
from bitnet_compile.intrinsics.lut_shuffle import VECTOR_ISAS
from bitnet_compile.ops import lut_matmul
known = lambda: [n for n in _BUILDERS if TensorIntrin.get(n, allow_missing=True)]
assert len(_BUILDERS) >= 9 and known() == [], known()
lut_matmul.build_primfunc("g", 64, 128, "avx2", lut_matmul.LutKnobs(kblock=32, row_blocks_per_task=1), True)
assert known() == [VECTOR_ISAS["avx2"].intrin_name], known()
"""


def test_intrinsics_are_parsed_only_when_a_schedule_needs_them():
    """Parsing every TVMScript intrinsic at import made each compile and tuning worker start
    seconds slower; a fresh process must parse none until it tensorizes, then just that one."""
    done = subprocess.run([sys.executable, "-c", _LAZY_INTRINSICS], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr


def _zero_knob_cases():
    from bitnet_compile.ops import dot2_matmul, f16_gemv, gpu_matmul, i8_gemv

    return [
        (lambda: lut_matmul.LutKnobs(kblock=32, row_blocks_per_task=0).check(), "row_blocks_per_task"),
        (lambda: dot2_matmul.Dot2GemvKnobs(row_blocks=4, k_unroll=0).check(), "k_unroll"),
        (lambda: dot2_matmul.Dot2GemmKnobs(row_blocks=2, token_tile=0).check(), "token_tile"),
        (lambda: gpu_matmul.GpuGemvKnobs(rows_per_block=16, k_split=0).check(), "k_split"),
        (lambda: i8_gemv.I8Knobs(k_unroll=0, groups_per_pass=4).check(), "k_unroll"),
        (lambda: f16_gemv.F16Knobs(k_unroll=0, prefetch=True).check(), "k_unroll"),
    ]


@pytest.mark.parametrize("check,name", _zero_knob_cases())
def test_a_zero_count_knob_is_a_one_line_error_naming_it(check, name):
    with pytest.raises(UserError, match=f"^knob {name}=0 must be >= 1$"):
        check()
