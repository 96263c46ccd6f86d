"""The output-layer GEMVs (logits = h @ E^T): float16 weights within tolerance (and the
float16 GEMM of several tokens equal to the GEMV row by row, bit for bit), int8 weights
bit-exact, for AVX2, AVX-512 and AVX-512 VNNI, over odd shapes; their layouts' packing
(chunked, from a memory-mapped bfloat16 source), the embedding lookup, and verify's checkers."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from conftest import HOST, compile_module, isa_params

from bitnet_compile import schedule_db
from bitnet_compile.ops import f16_gemm, f16_gemv, i8_gemm, i8_gemv
from bitnet_runtime import layout_f16, layout_i8, reference, verify
from bitnet_runtime.artifact import Kernel
from bitnet_runtime.errors import UserError
from bitnet_runtime.memory import is_aligned

# every N and K the brief names, each at least once, plus a K that is not a multiple of 4
I8_DEFAULT = i8_gemv.I8Knobs(**schedule_db.default_knobs("i8_gemv", "avx512"))
F16_DEFAULT = f16_gemv.F16Knobs(**schedule_db.default_knobs("f16_gemv", "avx512"))
SHAPES = [(1, 4), (1, 2560), (63, 100), (63, 7), (65, 1536), (65, 4), (1000, 2560), (1000, 100), (32002, 100)]
VNNI = pytest.mark.skipif(not {"avx512bw", "avx512_vnni"} <= HOST, reason="host lacks AVX-512 VNNI")
VARIANT_TARGETS = {"avx2": ("avx2", None), "avx512": ("avx512", None), "avx512-vnni": ("avx512", "x86-avx512-vnni")}
VARIANTS = [
    pytest.param("avx2", marks=pytest.mark.skipif("avx2" not in HOST, reason="host lacks avx2")),
    pytest.param("avx512", marks=pytest.mark.skipif(not {"avx512f", "avx512bw"} <= HOST, reason="host lacks avx512")),
    pytest.param("avx512-vnni", marks=VNNI),
]


def _bf16_bits(w: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (truncation: exactly representable values stay exact)."""
    return (np.ascontiguousarray(w, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _weights(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2)).astype(np.float32)
    w[0, : min(k, 3)] = [1e-7, -65000.0, 3.0][: min(k, 3)]  # a float16 subnormal and a near-maximum
    return w


@pytest.fixture(scope="module", params=VARIANTS)
def i8_module(request):
    """The int8 GEMV and GEMM of one variant for every shape."""
    isa, preset = VARIANT_TARGETS[request.param]
    funcs = {}
    for n, k in SHAPES:
        n_p, k_p = layout_i8.padded_shape(n, k)
        funcs[f"i8_{n}_{k}"] = i8_gemv.build_primfunc(f"i8_{n}_{k}", n_p, k_p, request.param, I8_DEFAULT)
        funcs[f"i8_gemm_{n}_{k}"] = i8_gemm.build_primfunc(f"i8_gemm_{n}_{k}", n_p, k_p, request.param)
    return request.param, compile_module(funcs, isa, preset)


@pytest.fixture(scope="module", params=isa_params())
def f16_module(request):
    """The float16 GEMV for one vector ISA for every shape."""
    funcs = {f"f16_{n}_{k}": f16_gemv.build_primfunc(f"f16_{n}_{k}", layout_f16.padded_rows(n), k, F16_DEFAULT) for n, k in SHAPES}
    funcs |= {f"f16_gemm_{n}_{k}": f16_gemm.build_primfunc(f"f16_gemm_{n}_{k}", layout_f16.padded_rows(n), k) for n, k in SHAPES}
    return request.param, compile_module(funcs, request.param)


def _run_f16(gemv, n: int, k: int, packed: np.ndarray, x: np.ndarray) -> np.ndarray:
    call = layout_f16.bind({"gemv": gemv}, {"n": n, "k": k})
    call.x[0] = x
    call.out[...] = np.nan
    return call.run(packed)


def _run_i8(gemv, n: int, k: int, q: np.ndarray, packed: np.ndarray, corr: np.ndarray) -> np.ndarray:
    n_p, k_p = layout_i8.padded_shape(n, k)
    call = layout_i8.bind({"gemv": gemv}, {"n_padded": n_p, "k_padded": k_p})
    call.q[0, :k] = q
    call.out[...] = -1
    return call.run(packed, corr.reshape(-1, layout_i8.ROWS))


@pytest.mark.parametrize("n,k", SHAPES)
def test_f16_gemv_within_tolerance(f16_module, n, k):
    _, mod = f16_module
    rng = np.random.default_rng(n * 31 + k)
    w = _weights(rng, n, k)
    packed = layout_f16.pack_rows(w)
    x = (rng.standard_normal(k) * 3).astype(np.float32)
    got = _run_f16(mod[f"f16_{n}_{k}"], n, k, packed, x)
    assert reference.f16_gemv_close(got, x, packed)
    assert not got[0, n:].any()  # padded rows are exactly 0
    # against the product computed from the caller's matrix, not from the packed copy
    exact = w.astype(np.float16).astype(np.float64) @ x.astype(np.float64)
    bound = np.abs(w.astype(np.float16).astype(np.float64)) @ np.abs(x.astype(np.float64))
    assert np.all(np.abs(got[0, :n] - exact) <= reference.F16_GEMV_RTOL * bound + 1e-30)


@pytest.mark.parametrize("n,k", SHAPES)
def test_f16_gemm_rows_equal_the_gemv_bit_for_bit(f16_module, n, k):
    """The server's batched decode reads its logits from the GEMM, a lone sequence's from the
    GEMV: they must agree exactly, at every token count (padding rows come out 0)."""
    _, mod = f16_module
    rng = np.random.default_rng(n * 7 + k)
    packed = layout_f16.pack_rows(_weights(rng, n, k))
    for tokens in (1, 3, 4, 9):
        call = layout_f16.bind_batch({"gemm": mod[f"f16_gemm_{n}_{k}"]}, {"n": n, "k": k}, tokens)
        call.x[:tokens] = rng.standard_normal((tokens, k)) * 3
        call.out[...] = np.nan
        got = call.run(packed)
        for row in range(tokens):
            np.testing.assert_array_equal(got[row], _run_f16(mod[f"f16_{n}_{k}"], n, k, packed, call.x[row])[0])
        assert not call.out[tokens:].any()


@pytest.mark.parametrize("n,k", SHAPES)
def test_i8_gemv_exact(i8_module, n, k):
    _, mod = i8_module
    rng = np.random.default_rng(n * 17 + k)
    w = _weights(rng, n, k)
    w[-1] = 0.0  # an all-zero row: scale 0, weights 0
    packed, scale, corr = layout_i8.quantize_rows(w)
    rows = layout_i8.unpack_rows(packed, n, k).astype(np.int64)
    for q in (rng.integers(-128, 128, k, dtype=np.int8), np.full(k, -128, np.int8), np.full(k, 127, np.int8)):
        got = _run_i8(mod[f"i8_{n}_{k}"], n, k, q, packed, corr)
        want = reference.i8_gemv(np.pad(q, (0, packed.shape[1] * 4 - k)), packed)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got[0, :n], rows @ q.astype(np.int64))  # independent of the reference
        assert not got[0, n:].any()


@pytest.mark.parametrize("n,k", SHAPES)
def test_i8_gemm_rows_equal_the_gemv_exactly(i8_module, n, k):
    """What the server's batched decode relies on with --output-layer i8: each token's row of
    the GEMM is the GEMV's for it, for token counts within a block, whole blocks and beyond."""
    _, mod = i8_module
    rng = np.random.default_rng(n * 31 + k)
    packed, _, corr = layout_i8.quantize_rows(_weights(rng, n, k))
    n_p, k_p = layout_i8.padded_shape(n, k)
    for tokens in (2, 4, 5, 9):
        call = layout_i8.bind_batch({"gemm": mod[f"i8_gemm_{n}_{k}"]}, {"n_padded": n_p, "k_padded": k_p}, tokens)
        call.q[:tokens, :k] = rng.integers(-128, 128, (tokens, k), dtype=np.int8)
        call.q[0, :k] = -128  # the extreme the shift meets
        call.out[...] = -1
        got = call.run(packed, corr.reshape(-1, layout_i8.ROWS))
        for row in range(tokens):
            np.testing.assert_array_equal(got[row : row + 1], _run_i8(mod[f"i8_{n}_{k}"], n, k, call.q[row, :k], packed, corr))
        assert not call.out[tokens:].any()  # zero padding rows come out zero


@pytest.mark.parametrize("value", [-128, 127])
def test_i8_gemv_exact_at_the_extremes(i8_module, value):
    """Rows of all +127 / all -127 against activations all at one extreme, K = 2560."""
    _, mod = i8_module
    n, k = 1000, 2560
    w = np.resize(np.array([1.0, -1.0, 0.5], np.float32), n)[:, None] * np.ones((1, k), np.float32)
    packed, scale, corr = layout_i8.quantize_rows(w)
    q = np.full(k, value, np.int8)
    got = _run_i8(mod[f"i8_{n}_{k}"], n, k, q, packed, corr)
    np.testing.assert_array_equal(got, reference.i8_gemv(q, packed))
    assert got[0, 0] == 127 * value * k and got[0, 1] == -127 * value * k


@pytest.mark.parametrize("variant", VARIANTS)
def test_knob_variants_agree(variant):
    """Other unrolls, row-group passes and no prefetch compute the same numbers."""
    isa, preset = VARIANT_TARGETS[variant]
    n, k = 130, 100
    n_p, k_p = layout_i8.padded_shape(n, k)
    i8_knobs = [i8_gemv.I8Knobs(1, 1), i8_gemv.I8Knobs(4, 2), i8_gemv.I8Knobs(3, 4)]
    funcs = {f"i8_{i}": i8_gemv.build_primfunc(f"i8_{i}", n_p, k_p, variant, kn) for i, kn in enumerate(i8_knobs)}
    f16_knobs = [] if variant == "avx512-vnni" else [f16_gemv.F16Knobs(1, False), f16_gemv.F16Knobs(4, False), f16_gemv.F16Knobs(3, True)]
    funcs |= {f"f16_{i}": f16_gemv.build_primfunc(f"f16_{i}", n_p, k, kn) for i, kn in enumerate(f16_knobs)}
    mod = compile_module(funcs, isa, preset)
    rng = np.random.default_rng(11)
    w = _weights(rng, n, k)
    packed, _, corr = layout_i8.quantize_rows(w)
    q = rng.integers(-128, 128, k, dtype=np.int8)
    want = reference.i8_gemv(np.pad(q, (0, k_p - k)), packed)
    tiles, x = layout_f16.pack_rows(w), rng.standard_normal(k).astype(np.float32)
    for i in range(len(i8_knobs)):
        np.testing.assert_array_equal(_run_i8(mod[f"i8_{i}"], n, k, q, packed, corr), want)
    for i in range(len(f16_knobs)):
        assert reference.f16_gemv_close(_run_f16(mod[f"f16_{i}"], n, k, tiles, x), x, tiles)


def _kernel(mod, name: str, op: str, n: int, k: int) -> Kernel:
    n_p, k_p = layout_i8.padded_shape(n, k) if op.startswith("i8") else (layout_f16.padded_rows(n), k)
    return Kernel(name, op, {"n": n, "k": k, "n_padded": n_p, "k_padded": k_p}, {}, mod[name])


@pytest.mark.parametrize("n,k", [(63, 7), (1000, 2560)])
def test_verify_checks_i8(i8_module, n, k):
    _, mod = i8_module
    assert verify.check_i8_gemv(_kernel(mod, f"i8_{n}_{k}", "i8_gemv", n, k), np.random.default_rng(0))

    def off_by_one(*args):
        mod[f"i8_{n}_{k}"](*args)
        args[-1][(n - 1) // 64, (n - 1) % 64] += 1

    bad = Kernel("bad", "i8_gemv", _kernel(mod, f"i8_{n}_{k}", "i8_gemv", n, k).shape, {}, off_by_one)
    assert not verify.check_i8_gemv(bad, np.random.default_rng(1))


@pytest.mark.parametrize("n,k", [(63, 7), (1000, 2560)])
def test_verify_checks_i8_gemm(i8_module, n, k):
    _, mod = i8_module
    kernel = _kernel(mod, f"i8_gemm_{n}_{k}", "i8_gemm", n, k)
    assert verify.check_i8_gemm(kernel, np.random.default_rng(0))

    def last_token_off(*args):
        mod[f"i8_gemm_{n}_{k}"](*args)
        args[-1][1, 0, 0, 0] += 1  # block 1, token 0: the fifth token

    bad = Kernel("bad", "i8_gemm", kernel.shape, {}, last_token_off)
    assert not verify.check_i8_gemm(bad, np.random.default_rng(1))


@pytest.mark.parametrize("n,k", [(63, 7), (1000, 2560)])
def test_verify_checks_f16(f16_module, n, k):
    _, mod = f16_module
    assert verify.check_f16_gemv(_kernel(mod, f"f16_{n}_{k}", "f16_gemv", n, k), np.random.default_rng(0))

    def too_far(*args):
        mod[f"f16_{n}_{k}"](*args)
        args[-1][0, 0] *= 1.001

    def pad_not_zero(*args):
        mod[f"f16_{n}_{k}"](*args)
        args[-1][-1, -1] = 1.0

    for wrong in (too_far, pad_not_zero):
        bad = Kernel("bad", "f16_gemv", _kernel(mod, f"f16_{n}_{k}", "f16_gemv", n, k).shape, {}, wrong)
        assert not verify.check_f16_gemv(bad, np.random.default_rng(1))


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("n,k", [(1, 1), (63, 7), (65, 100), (200, 64)])
def test_f16_pack_round_trip(n, k):
    w = _weights(np.random.default_rng(n + k), n, k)
    packed = layout_f16.pack_rows(w)
    assert packed.shape == (layout_f16.padded_rows(n) // 64, k, 64) and packed.dtype == np.float16 and is_aligned(packed)
    np.testing.assert_array_equal(layout_f16.unpack_rows(packed, n), w.astype(np.float16))
    assert not layout_f16.unpack_rows(packed)[n:].any()
    for chunk_rows in (64, 128, 100):  # chunking does not change the result
        np.testing.assert_array_equal(layout_f16.pack_rows(w, chunk_rows=chunk_rows), packed)


def test_f16_pack_rejects_bad_input():
    for bad in (1e6, np.nan, -np.inf):
        with pytest.raises(UserError, match="float16 range"):
            layout_f16.pack_rows(np.full((2, 2), bad, np.float32))
        if not np.isfinite(bad):
            with pytest.raises(UserError, match="not finite"):
                layout_i8.quantize_rows(np.full((2, 2), bad, np.float32))
    with pytest.raises(UserError, match="uint16"):
        layout_f16.pack_rows(np.zeros((2, 2), np.float32), bf16=True)
    with pytest.raises(UserError, match="float"):
        layout_f16.pack_rows(np.zeros((2, 2), np.int8))
    with pytest.raises(UserError, match="2-D"):
        layout_f16.pack_rows(np.zeros(4, np.float32))


@pytest.mark.parametrize("n,k", [(1, 1), (63, 7), (65, 100), (130, 2560)])
def test_i8_quantize_round_trip(n, k):
    w = _weights(np.random.default_rng(n * k), n, k)
    w[n // 2] = 0.0
    packed, scale, corr = layout_i8.quantize_rows(w)
    n_p, k_p = layout_i8.padded_shape(n, k)
    assert packed.shape == (n_p // 64, k_p // 4, 64, 4) and packed.dtype == np.int8 and is_aligned(packed)
    assert scale.shape == (n,) and scale.dtype == np.float32 and is_aligned(scale)
    assert corr.shape == (n_p,) and corr.dtype == np.int32 and is_aligned(corr)
    absmax = np.abs(w).max(axis=1)
    np.testing.assert_array_equal(scale, (absmax / np.float32(127)).astype(np.float32))
    inverse = np.divide(np.float32(127), np.maximum(absmax, np.float32(1e-30)), out=np.zeros_like(absmax), where=absmax > 0)
    want = np.clip(np.rint(w * inverse[:, None]), -127, 127).astype(np.int8)
    rows = layout_i8.unpack_rows(packed)
    np.testing.assert_array_equal(rows[:n, :k], want)
    assert not rows[n:].any() and not rows[:, k:].any()
    assert np.abs(rows[:n].astype(np.int64)).max(axis=1).tolist() == [127 if a > 0 else 0 for a in absmax]
    np.testing.assert_array_equal(corr, 128 * rows.astype(np.int64).sum(axis=1))
    # dequantized rows approximate the original within half a step
    assert np.all(np.abs(want * scale[:, None] - w) <= scale[:, None] * 0.5 + 1e-6 * absmax[:, None])
    packed2, scale2, corr2 = layout_i8.quantize_rows(w, chunk_rows=64)
    np.testing.assert_array_equal(packed2, packed), np.testing.assert_array_equal(scale2, scale), np.testing.assert_array_equal(corr2, corr)
    got_packed, got_scale, (got_corr,) = layout_i8.kernel_arrays((packed, scale, corr), {"n_padded": n_p, "k_padded": k_p})
    assert got_packed is packed and got_scale is scale and got_corr.shape == (n_p // 64, 64)
    with pytest.raises(UserError):
        layout_i8.kernel_arrays((packed, scale, corr), {"n_padded": n_p + 64, "k_padded": k_p})


def test_chunked_packing_from_memmap_bf16(tmp_path):
    """A memory-mapped bfloat16 checkpoint matrix (uint16 bit patterns) packs chunk by chunk to
    the same result as its float32 values in memory, without a float32 copy of the whole matrix."""
    n, k = 4000, 512
    w = _bf16_bits(np.random.default_rng(3).standard_normal((n, k)).astype(np.float32) * 0.05)
    path = tmp_path / "embed.bf16"
    w.tofile(path)
    mm = np.memmap(path, np.uint16, "r", shape=(n, k))
    as_f32 = (w.astype(np.uint32) << 16).view(np.float32)

    tracemalloc.start()
    packed = layout_f16.pack_rows(mm, bf16=True, chunk_rows=256)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < packed.nbytes + as_f32.nbytes // 4  # the output plus a few chunks, never all of float32
    np.testing.assert_array_equal(packed, layout_f16.pack_rows(as_f32))

    tracemalloc.start()
    packed8, scale, corr = layout_i8.quantize_rows(mm, bf16=True, chunk_rows=256)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < packed8.nbytes + as_f32.nbytes // 2
    want = layout_i8.quantize_rows(as_f32)
    for got, expected in zip((packed8, scale, corr), want):
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(layout_f16.unpack_rows(packed)[[7, 3999]], as_f32[[7, 3999]].astype(np.float16))


# ----------------------------------------------------------------------------- builders


def test_variant_for_and_bad_arguments():
    assert i8_gemv.variant_for("avx512", {"avx512f", "avx512bw", "avx512vnni"}) == "avx512-vnni"
    assert i8_gemv.variant_for("avx512", {"avx512f", "avx512bw"}) == "avx512"
    assert i8_gemv.variant_for("avx2", {"avx2", "avxvnni"}) == "avx2"
    assert i8_gemv.variant_for("neon", {"neon", "dotprod"}) == "neon-dotprod"
    with pytest.raises(UserError):
        i8_gemv.variant_for("sve", set())
    with pytest.raises(UserError):
        i8_gemv.build_primfunc("x", 64, 4, "sse2", I8_DEFAULT)
    with pytest.raises(UserError):
        i8_gemv.I8Knobs(k_unroll=2, groups_per_pass=3).check()
    with pytest.raises(ValueError):
        i8_gemv.build_primfunc("x", 65, 4, "avx2", I8_DEFAULT)
    with pytest.raises(ValueError):
        f16_gemv.build_primfunc("x", 100, 4, F16_DEFAULT)
    with pytest.raises(UserError):
        f16_gemv.build_primfunc("x", 64, 4, f16_gemv.F16Knobs(k_unroll=0, prefetch=True))
