"""The dot2 (2-bit, VNNI) matmul against the numpy reference, exactly, over many shapes."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HOST, compile_module

from bitnet_compile.errors import UserError
from bitnet_compile.ops import dot2_matmul
from bitnet_runtime import layout_dot2, reference
from bitnet_runtime.memory import aligned_copy

pytestmark = pytest.mark.skipif(not {"avx512bw", "avx512_vnni"} <= HOST, reason="host lacks AVX-512 VNNI")

SHAPES = [(1, 1), (3, 5), (31, 7), (65, 131), (100, 36), (256, 512), (96, 16384), (640, 2560)]
GEMV = dot2_matmul.Dot2GemvKnobs(row_blocks=4, k_unroll=2)
GEMM = dot2_matmul.Dot2GemmKnobs(row_blocks=2, token_tile=8)


@pytest.fixture(scope="module")
def module():
    funcs = {}
    for n, k in SHAPES:
        n_p, k_p = layout_dot2.padded_shape(n, k, 4, 2)
        funcs[f"gemv_{n}_{k}"] = dot2_matmul.build_primfunc(f"gemv_{n}_{k}", n_p, k_p, GEMV)
        funcs[f"gemm_{n}_{k}"] = dot2_matmul.build_primfunc(f"gemm_{n}_{k}", n_p, k_p, GEMM)
    return compile_module(funcs, "avx512", preset="x86-avx512-vnni")


def _run(mod, name: str, w: np.ndarray, q: np.ndarray) -> np.ndarray:
    n, k = w.shape
    n_p, k_p = layout_dot2.padded_shape(n, k, 4, 2)
    call = layout_dot2.bind({name.split("_")[0]: mod[name]}, {"n_padded": n_p, "k_padded": k_p, "token_tile": GEMM.token_tile}, q.shape[0])
    call.q[:, :k] = q
    return call.run(aligned_copy(layout_dot2.pack_ternary(w, n_p, k_p)))[:, :n]


@pytest.mark.parametrize("n,k", SHAPES)
def test_dot2_exact_random(module, n, k):
    rng = np.random.default_rng(n * 7919 + k)
    w = rng.integers(-1, 2, (n, k), dtype=np.int8)
    for tokens in (1, 3, 8, 21):
        q = rng.integers(-128, 128, (tokens, k), dtype=np.int8)
        kind = "gemv" if tokens == 1 else "gemm"
        np.testing.assert_array_equal(_run(module, f"{kind}_{n}_{k}", w, q), reference.ternary_matmul(q, w))


@pytest.mark.parametrize("value", [-128, 127])
def test_dot2_exact_at_the_extremes(module, value):
    n, k = 96, 16384
    w = np.resize(np.array([1, -1, 0], np.int8), n)[:, None] * np.ones((1, k), np.int8)
    for kind, tokens in (("gemv", 1), ("gemm", 9)):
        q = np.full((tokens, k), value, np.int8)
        np.testing.assert_array_equal(_run(module, f"{kind}_{n}_{k}", w, q), reference.ternary_matmul(q, w))


def test_gemm_register_budget_is_enforced():
    with pytest.raises(UserError, match="accumulator registers"):
        dot2_matmul.Dot2GemmKnobs(row_blocks=4, token_tile=8).check()
