"""``bitnet-runtime verify DIR``: run every kernel of an artifact against its numpy
reference on random full-range inputs, on the device the artifact was copied to.

Integer kernels must match exactly; so must the float ones, which repeat the reference's
float32 operations in the same order, except the float16 output-layer GEMV, whose float32
sums may use fused multiply-adds: it must be within a stated tolerance (TOLERANT_OPS).
Inputs include the extremes (-128 everywhere against all-(+1) and all-(-1) rows) that would
expose an int16 overflow.
"""

from __future__ import annotations

import time

import numpy as np

from . import layout, layout_dot2, layout_f16, layout_i8, reference
from .artifact import Artifact, Kernel
from .memory import aligned_copy, aligned_empty, aligned_zeros

TOKENS = 3  # GEMM and the token-parallel kernels run on this many tokens (the decode kernels on this many rows)
SLOTS = 4  # the KV pool of the decode kernels' checks: rows in distinct slots


def _activations(rng: np.random.Generator, tokens: int, k: int) -> np.ndarray:
    """Full-range int8 activations, with the first token pinned at -128 to hit the extremes."""
    q = rng.integers(-128, 128, (tokens, k), dtype=np.int8)
    q[0] = -128
    return q


def _ternary(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    w = rng.integers(-1, 2, (n, k), dtype=np.int8)
    w[0], w[-1] = 1, -1
    return w


def check_quantize(kernel: Kernel, rng: np.random.Generator) -> bool:
    s = kernel.shape
    x = (rng.standard_normal((TOKENS, s["k"])) * rng.uniform(0.01, 100)).astype(np.float32)
    x[1] = 0.0  # an all-zero token must hit the scale floor, not divide by zero
    q, scale = aligned_zeros((TOKENS, s["k_padded"]), np.int8), aligned_zeros((TOKENS,), np.float32)
    kernel(aligned_copy(x), q, scale)
    want_q, want_scale = reference.quantize_activations(x, s["k_padded"])
    return np.array_equal(q, want_q) and np.array_equal(scale, want_scale)


def check_rmsnorm_quantize(kernel: Kernel, rng: np.random.Generator) -> bool:
    """Within one quantization step of the reference (reference.rmsnorm_quantize_mismatch),
    on random norm weights, an all-zero token included."""
    s = kernel.shape
    x = (rng.standard_normal((TOKENS, s["k"])) * rng.uniform(0.01, 100)).astype(np.float32)
    x[1] = 0.0
    weight = (1 + 0.2 * rng.standard_normal(s["k"])).astype(np.float32)
    eps = np.array([1e-5], np.float32)
    q, scale = aligned_zeros((TOKENS, s["k_padded"]), np.int8), aligned_zeros((TOKENS,), np.float32)
    kernel(aligned_copy(x), aligned_copy(weight), aligned_copy(eps), q, scale)
    want_q, want_scale = reference.rmsnorm_quantize(x, weight, float(eps[0]), s["k_padded"])
    return reference.rmsnorm_quantize_mismatch(q, scale, want_q, want_scale) is None


def check_table(kernel: Kernel, rng: np.random.Generator) -> bool:
    q = _activations(rng, TOKENS, kernel.shape["k_padded"])
    tables = aligned_zeros(layout.table_shape(TOKENS, q.shape[1]), np.int8)
    kernel(aligned_copy(q), tables)
    return np.array_equal(tables, reference.lut_tables(q))


def _role(kernel: Kernel) -> str:
    """The kernel's key in a linear's kernels: what a layout's ``bind`` calls it."""
    return "gemv" if kernel.op.endswith("_gemv") else "gemm"


def _matmul_case(rng: np.random.Generator, shape: dict, call: layout.LutCall | layout_dot2.Dot2Call) -> tuple[np.ndarray, np.ndarray]:
    """Ternary weights, full-range activations in the call's q (zero past K), and the answer;
    the output starts at -1, so a row the kernel leaves alone cannot pass."""
    w = _ternary(rng, shape["n"], shape["k"])
    call.q[:, : shape["k"]] = _activations(rng, call.q.shape[0], shape["k"])
    call.out[...] = -1
    return w, reference.ternary_matmul(call.q[:, : shape["k"]], w)


def check_lut_matmul(kernel: Kernel, rng: np.random.Generator) -> bool:
    s = kernel.shape
    tokens = 1 if kernel.op == "lut_gemv" else TOKENS
    # the tables from the reference, not the lut_table kernel: each kernel is checked on its own
    call = layout.bind({"lut_table": reference.write_lut_tables, _role(kernel): kernel}, kernel.params, tokens)
    w, want = _matmul_case(rng, s, call)
    packed = aligned_copy(layout.pack_ternary(w, s["rows"], kernel.knobs["kblock"]))
    return np.array_equal(call.run(packed)[:, : s["n"]], want)


def _check_two_bit(kernel: Kernel, rng: np.random.Generator, words: bool) -> bool:
    """A dot2-v1 kernel: GEMV on one token; GEMM on two token tiles, the second one partly
    zero padding."""
    s = kernel.shape
    tokens = 1 if kernel.op.endswith("_gemv") else kernel.knobs["token_tile"] + TOKENS
    call = layout_dot2.bind({_role(kernel): kernel}, kernel.params, tokens, words)
    w, want = _matmul_case(rng, s, call)
    packed = aligned_copy(layout_dot2.pack_ternary(w, s["n_padded"], s["k_padded"]))
    return np.array_equal(call.run(packed)[:, : s["n"]], want)


def check_dot2_matmul(kernel: Kernel, rng: np.random.Generator) -> bool:
    return _check_two_bit(kernel, rng, words=False)


def check_gpu2_matmul(kernel: Kernel, rng: np.random.Generator) -> bool:
    """The GPU kernels take the same bytes as uint32 words and the activations as dwords."""
    return _check_two_bit(kernel, rng, words=True)


def check_dequantize(kernel: Kernel, rng: np.random.Generator) -> bool:
    s = kernel.shape
    acc = rng.integers(-(2**24), 2**24, (TOKENS, s["n_padded"]), dtype=np.int32)
    act_scale = rng.uniform(0.1, 1000, TOKENS).astype(np.float32)
    weight_scale = rng.uniform(0.01, 2, s["n"]).astype(np.float32)
    out = aligned_zeros((TOKENS, s["n"]), np.float32)
    kernel(aligned_copy(acc), aligned_copy(act_scale), aligned_copy(weight_scale), out)
    return np.array_equal(out, reference.dequantize(acc[:, : s["n"]], act_scale, weight_scale))


_OUTPUT_TILES_PER_STEP = 64  # tiles of random weights generated at a time (a vocabulary is 2000+ tiles)


def _random_bits(rng: np.random.Generator, like: np.ndarray) -> np.ndarray:
    """Uniformly random bits shaped and typed like ``like`` (whose size is a multiple of 8 bytes)."""
    words = rng.integers(0, 2**64 - 1, like.nbytes // 8, dtype=np.uint64, endpoint=True)
    return words.view(like.dtype).reshape(like.shape)


def _f16_tiles(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Random float16 tiles [N_padded/64, K, 64], padded rows zero: every finite magnitude
    below 2 (subnormals included, log-uniform-like), either sign, drawn as bit patterns
    (random bits with exponent bit 4 cleared)."""
    packed = aligned_empty(layout_f16.packed_shape(n, k), np.float16)
    bits = packed.view(np.uint16)
    for start in range(0, packed.shape[0], _OUTPUT_TILES_PER_STEP):
        chunk = bits[start : start + _OUTPUT_TILES_PER_STEP]
        np.bitwise_and(_random_bits(rng, chunk), np.uint16(0xBFFF), out=chunk)
    if n % layout_f16.ROWS:
        packed[-1, :, n % layout_f16.ROWS :] = 0
    return packed


def check_f16_gemv(kernel: Kernel, rng: np.random.Generator) -> bool:
    """Shape keys: n, k (k_padded == k). Not bit-exact: within reference.F16_GEMV_RTOL of
    sum_k |x[k] w[n, k]|, since LLVM may fuse multiply-adds. Padded rows must come out 0."""
    s = kernel.shape
    packed = _f16_tiles(rng, s["n"], s["k"])
    call = layout_f16.bind({"gemv": kernel}, kernel.params)
    call.x[...] = rng.standard_normal((1, s["k"])) * rng.uniform(0.1, 10)
    call.out[...] = np.nan
    out = call.run(packed)
    return reference.f16_gemv_close(out, call.x, packed) and not out[0, s["n"] :].any()


def check_f16_gemm(kernel: Kernel, rng: np.random.Generator) -> bool:
    """As f16_gemv, for two tokens (one block, half padding: its rows must come out 0)."""
    s = kernel.shape
    packed = _f16_tiles(rng, s["n"], s["k"])
    call = layout_f16.bind_batch({"gemm": kernel}, kernel.params, 2)
    call.x[:2] = rng.standard_normal((2, s["k"])) * rng.uniform(0.1, 10)
    call.out[...] = np.nan
    out = call.run(packed)
    return reference.f16_gemm_close(out, call.x[:2], packed) and not out[:, s["n"] :].any() and not call.out[2:].any()


def _i8_tiles(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Random int8 weight tiles in [-127, 127] with zero padding; row 0 all +127, row n-1 all
    -127 (the largest sums against activations of -128)."""
    packed = aligned_empty(layout_i8.packed_shape(n, k), np.int8)
    for start in range(0, packed.shape[0], _OUTPUT_TILES_PER_STEP):
        chunk = packed[start : start + _OUTPUT_TILES_PER_STEP]
        np.maximum(_random_bits(rng, chunk), np.int8(-127), out=chunk)
    packed[0, :, 0, :] = 127
    last_t, last_i = divmod(n - 1, layout_i8.ROWS)
    packed[last_t, :, last_i, :] = -127
    if n % layout_i8.ROWS:
        packed[-1, :, n % layout_i8.ROWS :, :] = 0
    if k % layout_i8.CHUNK:  # columns k.. of the last chunk
        packed[:, -1, :, k % layout_i8.CHUNK :] = 0
    return packed


def check_i8_gemv(kernel: Kernel, rng: np.random.Generator) -> bool:
    """Shape keys: n, k, n_padded, k_padded (layout_i8.padded_shape). Bit-exact, on
    activations of -128 everywhere and on full-range random ones (zero past k)."""
    s = kernel.shape
    packed = _i8_tiles(rng, s["n"], s["k"])
    correction = layout_i8.correction(packed).reshape(-1, layout_i8.ROWS)
    call = layout_i8.bind({"gemv": kernel}, kernel.params)
    for q in (np.full((1, s["k"]), -128, np.int8), rng.integers(-128, 128, (1, s["k"]), dtype=np.int8)):
        call.q[:, : s["k"]] = q
        call.out[...] = -1
        if not np.array_equal(call.run(packed, correction), reference.i8_gemv(call.q, packed)):
            return False
    return True


def check_i8_gemm(kernel: Kernel, rng: np.random.Generator) -> bool:
    """As i8_gemv, for five tokens (one whole block and one padded: its rows must come out 0)."""
    s = kernel.shape
    packed = _i8_tiles(rng, s["n"], s["k"])
    correction = layout_i8.correction(packed).reshape(-1, layout_i8.ROWS)
    call = layout_i8.bind_batch({"gemm": kernel}, kernel.params, 5)
    call.q[:5, : s["k"]] = np.concatenate((np.full((1, s["k"]), -128, np.int8), rng.integers(-128, 128, (4, s["k"]), dtype=np.int8)))
    call.out[...] = -1
    out = call.run(packed, correction)
    return bool(np.array_equal(out, reference.i8_gemm(call.q[:5], packed)) and not call.out[5:].any())


def _floats(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return aligned_copy((rng.standard_normal(shape) * scale).astype(np.float32))


def _rope_tables(rng: np.random.Generator, context: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    angles = rng.uniform(-4, 4, (context, d // 2)).astype(np.float32)
    return tuple(aligned_copy(np.concatenate((f(angles), f(angles)), axis=1)) for f in (np.cos, np.sin))


def check_rmsnorm(kernel: Kernel, rng: np.random.Generator) -> bool:
    """Shape key: k. Within reference.RMSNORM_RTOL of max |out|, on TOKENS tokens."""
    k = kernel.shape["k"]
    x, weight, eps = (
        _floats(rng, (TOKENS, k), rng.uniform(0.01, 100)),
        aligned_copy(_floats(rng, (k,)) + 1),
        aligned_copy(np.array([1e-5], np.float32)),
    )
    out = aligned_zeros((TOKENS, k), np.float32)
    kernel(x, weight, eps, out)
    want = reference.rms_norm(x, weight, 1e-5)
    return bool(np.abs(out - want).max() <= reference.RMSNORM_RTOL * np.abs(want).max())


def _rows_in_slots(rng: np.random.Generator, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct slots and random positions, one per row."""
    return aligned_copy(rng.permutation(SLOTS)[:TOKENS].astype(np.int32)), aligned_copy(rng.integers(0, context, TOKENS).astype(np.int32))


def check_rotary_append(kernel: Kernel, rng: np.random.Generator) -> bool:
    """Shape keys: heads, kv_heads, head_dim. Rotated q and each row's cache row (its slot, its
    position) within reference.ROTARY_ULPS; every other cache row untouched."""
    heads, kv_heads, d = (kernel.shape[key] for key in ("heads", "kv_heads", "head_dim"))
    context = 37
    qkv = _floats(rng, (TOKENS, (heads + 2 * kv_heads) * d))
    cos, sin = _rope_tables(rng, context, d)
    slots, pos = _rows_in_slots(rng, context)
    kc, vc = _floats(rng, (SLOTS, kv_heads, context, d)), _floats(rng, (SLOTS, kv_heads, context, d))
    q = aligned_zeros((TOKENS, heads, d), np.float32)
    want = reference.rotary_append(qkv, cos, sin, slots, pos, kc.copy(), vc.copy(), heads)
    kernel(qkv, cos, sin, slots, pos, kc, vc, q)
    bound = reference.ROTARY_ULPS * reference.ULP * float(np.abs(qkv).max())
    return all(np.abs(got - w).max() <= bound for got, w in zip((q, kc, vc), want))


def check_decode_attention(kernel: Kernel, rng: np.random.Generator) -> bool:
    """Shape keys: heads, kv_heads, head_dim. Within reference.ATTENTION_TOLERANCE x max |V|,
    each row in its own slot at a random length of a 41-position cache."""
    heads, kv_heads, d = (kernel.shape[key] for key in ("heads", "kv_heads", "head_dim"))
    context = 41
    q, kc, vc = (
        _floats(rng, (TOKENS, heads, d), 3.0),
        _floats(rng, (SLOTS, kv_heads, context, d)),
        _floats(rng, (SLOTS, kv_heads, context, d)),
    )
    slots, pos = _rows_in_slots(rng, context)
    scores, out = aligned_zeros((TOKENS, kv_heads, heads // kv_heads, context), np.float32), aligned_zeros((TOKENS, heads * d), np.float32)
    kernel(q, kc, vc, slots, pos, scores, out)
    want = reference.decode_attention(q, kc, vc, slots, pos)
    return bool(np.abs(out - want).max() <= reference.ATTENTION_TOLERANCE * np.abs(vc).max())


def check_residual_dequantize(kernel: Kernel, rng: np.random.Generator) -> bool:
    """Shape keys: n, n_padded. Within reference.RESIDUAL_ULPS of |x| + |product|, elementwise."""
    n, n_p = kernel.shape["n"], kernel.shape["n_padded"]
    acc = aligned_copy(rng.integers(-(2**24), 2**24, (TOKENS, n_p), dtype=np.int32))
    act_scale, weight_scale = (
        aligned_copy(rng.uniform(0.1, 1000, TOKENS).astype(np.float32)),
        aligned_copy(rng.uniform(0.01, 2, n).astype(np.float32)),
    )
    x, out = _floats(rng, (TOKENS, n), 1000.0), aligned_zeros((TOKENS, n), np.float32)
    kernel(acc, act_scale, weight_scale, x, out)
    want = reference.residual_dequantize(acc[:, :n], act_scale, weight_scale, x)
    return bool(np.all(np.abs(out - want) <= reference.RESIDUAL_ULPS * reference.ULP * (np.abs(x) + np.abs(want - x))))


def check_gated_act(kernel: Kernel, rng: np.random.Generator) -> bool:
    """Shape keys: n (ffn), act. relu2 exact; silu within reference.SILU_RTOL, relative."""
    n, act = kernel.shape["n"], kernel.shape["act"]
    gate_up, out = _floats(rng, (TOKENS, 2 * n), 4.0), aligned_zeros((TOKENS, n), np.float32)
    kernel(gate_up, out)
    want = reference.gated_act(gate_up, act)
    if act == "relu2":
        return np.array_equal(out, want)
    return bool(np.all(np.abs(out - want) <= reference.SILU_RTOL * np.maximum(np.abs(want), 1e-30)))


TOLERANT_OPS = {
    "f16_gemv": f"close (within {reference.F16_GEMV_RTOL:g} x sum|x w|)",
    "f16_gemm": f"close (within {reference.F16_GEMV_RTOL:g} x sum|x w|)",
    "rmsnorm_quantize": "close (one step off at most, in few entries)",
    "rmsnorm": f"close (within {reference.RMSNORM_RTOL:g} x max|out|)",
    "rotary_append": f"close (within {reference.ROTARY_ULPS} ulp)",
    "decode_attention": f"close (within {reference.ATTENTION_TOLERANCE:g} x max|V|)",
    "residual_dequantize": f"close (within {reference.RESIDUAL_ULPS} ulp)",
    "gated_act": f"exact (relu2) or close (silu, within {reference.SILU_RTOL:g})",
}  # checked to a tolerance, not exactly


# manifest operator -> its check against the numpy reference
CHECKS = {
    "quantize": check_quantize,
    "rmsnorm_quantize": check_rmsnorm_quantize,
    "lut_table": check_table,
    "lut_gemv": check_lut_matmul,
    "lut_gemm": check_lut_matmul,
    "dot2_gemv": check_dot2_matmul,
    "dot2_gemm": check_dot2_matmul,
    "gpu2_gemv": check_gpu2_matmul,
    "gpu2_gemm": check_gpu2_matmul,
    "dequantize": check_dequantize,
    "f16_gemv": check_f16_gemv,
    "f16_gemm": check_f16_gemm,
    "i8_gemv": check_i8_gemv,
    "i8_gemm": check_i8_gemm,
    "rmsnorm": check_rmsnorm,
    "rotary_append": check_rotary_append,
    "decode_attention": check_decode_attention,
    "residual_dequantize": check_residual_dequantize,
    "gated_act": check_gated_act,
}


def check_kernel(artifact: Artifact, name: str, rng: np.random.Generator) -> bool:
    kernel = artifact.kernel(name)
    return CHECKS[kernel.op](kernel, rng)


def verify(artifact: Artifact, seed: int = 0, names: list[str] | None = None, echo=print) -> bool:
    """Check the named kernels (all by default); print one line each and a summary."""
    rng = np.random.default_rng(seed)
    names = names or artifact.kernel_names
    failed = 0
    for name in names:
        start = time.perf_counter()
        ok = check_kernel(artifact, name, rng)
        failed += not ok
        verdict = TOLERANT_OPS.get(artifact.kernel(name).op, "exact") if ok else "MISMATCH against the numpy reference"
        echo(f"{'ok  ' if ok else 'FAIL'}  {name:<34} {verdict}  ({time.perf_counter() - start:.2f} s)")
    echo(f"{len(names) - failed} passed, {failed} failed")
    return failed == 0
