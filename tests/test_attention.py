"""The decode attention kernel against numpy: grouped-query heads, odd head sizes, caches of
one position up to hundreds, and against the model's own numpy attention."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import compile_module

from bitnet_compile.ops import attention
from bitnet_runtime import reference
from bitnet_runtime.memory import aligned_copy, aligned_zeros

SHAPES = [(6, 2, 16), (3, 1, 8), (16, 16, 96), (20, 5, 128), (4, 4, 7)]  # heads, kv_heads, head_dim
LENGTHS = [1, 2, 37, 300]


@pytest.fixture(scope="module")
def module():
    funcs = {f"attn_{h}_{g}_{d}": attention.build_primfunc(f"attn_{h}_{g}_{d}", h, g, d) for h, g, d in SHAPES}
    return compile_module(funcs, "avx2")


@pytest.mark.parametrize("heads,kv_heads,d", SHAPES)
def test_decode_attention_matches_the_reference(module, heads, kv_heads, d):
    rng = np.random.default_rng(heads * 100 + d)
    for length in LENGTHS:
        q = aligned_copy((3 * rng.standard_normal((heads, d))).astype(np.float32))
        k, v = (aligned_copy(rng.standard_normal((length, kv_heads, d)).astype(np.float32)) for _ in range(2))
        out = aligned_zeros((heads, d), np.float32)
        module[f"attn_{heads}_{kv_heads}_{d}"](q, k, v, out)
        assert reference.attention_mismatch(out, reference.attention_decode(q, k, v)) is None, length


def test_the_reference_is_the_models_attention():
    """reference.attention_decode computes what model.KVCache.attend does for one token."""
    from bitnet_runtime.model import KVCache

    rng = np.random.default_rng(0)
    heads, kv_heads, d, length = 6, 2, 16, 11
    cache = KVCache(kv_heads, d, 64)
    k, v = (rng.standard_normal((length, kv_heads, d)).astype(np.float32) for _ in range(2))
    cache.store(k, v, 0)
    q = rng.standard_normal((1, heads, d)).astype(np.float32)
    np.testing.assert_allclose(cache.attend(q, length - 1)[0], reference.attention_decode(q[0], k, v).reshape(-1), rtol=1e-5, atol=1e-6)


def test_a_wrong_attention_is_caught():
    want = reference.attention_decode(*(np.ones(s, np.float32) for s in ((2, 4), (3, 1, 4), (3, 1, 4))))
    assert reference.attention_mismatch(want * 1.001, want) is not None
