"""numpy references of every kernel bitnet-compile generates.

They live in the runtime because ``verify`` runs them on the edge device, where the compiler
is absent; each operator module in ``bitnet_compile.ops`` points at its reference here.
Float steps are written in float32 in the kernels' order, so integer results are bit-exact and
float results equal to the kernels' within rounding of the same operations.
"""

from __future__ import annotations

import numpy as np

from .layout import GROUP, table_shape

ABSMAX_FLOOR = np.float32(1e-5)  # BitNet b1.58: scale = 127 / max(|x|, 1e-5)


def quantize_activations(x: np.ndarray, k_padded: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-token absmax int8 quantization; returns (q [M, k_padded], scale [M]) with zero padding.
    A row holding NaN gets scale NaN and one holding Inf scale 0 (q is 0 wherever x * scale is
    NaN), so the matmul that divides by the scale carries the NaN on to the logits, where
    generation stops with an error, instead of quantizing it to plausible numbers."""
    x = np.asarray(x, np.float32)
    m, k = x.shape
    absmax = np.abs(x).max(axis=1)
    scale = np.float32(127.0) / np.maximum(absmax, ABSMAX_FLOOR)  # a row with NaN: scale NaN
    with np.errstate(invalid="ignore"):
        product = x * scale[:, None]  # Inf * 0 = NaN: a row with Inf (scale 0) ends NaN downstream too
        q = np.where(np.isnan(product), 0, np.clip(np.round(product), -128, 127)).astype(np.int8)
    out = np.zeros((m, k_padded or k), np.int8)
    out[:, :k] = q
    return out, scale.astype(np.float32)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm in float32, in the order transformers computes it."""
    variance = np.mean(np.square(x), axis=-1, keepdims=True)
    return weight * (x * (np.float32(1.0) / np.sqrt(variance + np.float32(eps))))


def rmsnorm_quantize(x: np.ndarray, weight: np.ndarray, eps: float, k_padded: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """RMSNorm, then per-token absmax int8 quantization: what a normalized BitLinear input is."""
    return quantize_activations(rms_norm(np.asarray(x, np.float32), weight, eps), k_padded)


RMSNORM_MAX_DIFFERENT = 1e-3  # fraction of quantized activations that may be one step off


def rmsnorm_quantize_mismatch(q: np.ndarray, scale: np.ndarray, want_q: np.ndarray, want_scale: np.ndarray) -> str | None:
    """None when a fused RMSNorm + quantize result is the reference's but for entries one
    step off (at most RMSNORM_MAX_DIFFERENT of them) and scales equal to float32 rounding: the
    kernel sums squares in another order than numpy's mean, so the variance may differ in its
    last bits, which moves a value lying that close to a rounding boundary by one step."""
    off = np.abs(q.astype(np.int16) - want_q.astype(np.int16))
    if off.max(initial=0) > 1 or (off > 0).mean() > RMSNORM_MAX_DIFFERENT:
        return f"{int((off > 0).sum())} of {q.size} quantized activations differ (max {int(off.max(initial=0))} steps)"
    if not np.allclose(scale, want_scale, rtol=1e-5, atol=0):
        return f"scales differ from the reference by up to {float(np.max(np.abs(scale / want_scale - 1))):.2e}"
    return None


def lut_tables(q: np.ndarray) -> np.ndarray:
    """Tables [M, K/4, 2, 16] int8: byte planes of L[e] = sum of the activations selected by e."""
    m, k = q.shape
    quads = q.reshape(m, k // GROUP, GROUP).astype(np.int16)
    select = ((np.arange(16)[:, None] >> np.arange(GROUP)[None, :]) & 1).astype(np.int16)
    entries = quads @ select.T  # [M, G, 16]
    tables = np.empty(table_shape(m, k), np.int8)
    tables[:, :, 0] = (entries & 0xFF).astype(np.uint8).view(np.int8)
    tables[:, :, 1] = (entries >> 8).astype(np.int8)
    return tables


def write_lut_tables(q: np.ndarray, tables: np.ndarray) -> None:
    """``lut_tables`` called as the lut_table kernel is: a stand-in for that kernel in
    ``layout.bind``, where a LUT matmul is checked or timed on its own."""
    tables[...] = lut_tables(q)


def ternary_matmul(q: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """int32 [M, N] = q [M, K] @ weights[N, K]^T, the quantity every matmul kernel must equal."""
    return q.astype(np.int32) @ np.asarray(weights, np.int32).T


def dequantize(acc: np.ndarray, act_scale: np.ndarray, weight_scale: np.ndarray | float) -> np.ndarray:
    """float32 [M, N] = (acc * weight_scale[n]) * (1 / act_scale[m]), in float32 as the kernel does it.

    ``weight_scale`` is one value per output row (or a scalar, broadcast to all rows)."""
    n = acc.shape[1]
    ws = np.broadcast_to(np.asarray(weight_scale, np.float32), (n,))
    inverse = np.float32(1.0) / np.asarray(act_scale, np.float32)
    return (acc.astype(np.float32) * ws[None, :]) * inverse[:, None]


def residual_dequantize(acc: np.ndarray, act_scale: np.ndarray, weight_scale: np.ndarray | float, x: np.ndarray) -> np.ndarray:
    """x + dequantize(acc, ...): a BitLinear's output added to the residual stream."""
    return x + dequantize(acc, act_scale, weight_scale)


# ----------------------------------------------------------------------------- decoder layer
# The float steps of a decoder layer between its BitLinears, as model.py runs them: the spec
# the compiled decode step's kernels are checked against, and how close each kernel must be.
# LLVM fuses a multiply and an add into one rounding where numpy rounds twice, and sums in
# vector-wide partial sums where numpy sums pairwise or by BLAS: hence bounds, not equality.

ULP = float(np.finfo(np.float32).eps)
ROTARY_ULPS = 4  # rotary_append: |kernel - reference| <= 4 ulp of max |q|k|v| (v exact)
RESIDUAL_ULPS = 2  # residual_dequantize: <= 2 ulp of |x| + |product|, elementwise
ATTENTION_TOLERANCE = 1e-5  # decode_attention: <= this x max |V|
SILU_RTOL = 1e-6  # gated_act with silu (relu2 is exact): relative
RMSNORM_RTOL = 1e-6  # rmsnorm: <= this x max |out|


def relu2(x: np.ndarray) -> np.ndarray:
    return np.square(np.maximum(x, np.float32(0)))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


ACTIVATIONS = {"relu2": relu2, "silu": silu}


def gated_act(gate_up: np.ndarray, act: str) -> np.ndarray:
    """act(gate) * up of the fused gate|up output [tokens, 2 * ffn], gate first."""
    ffn = gate_up.shape[-1] // 2
    return ACTIVATIONS[act](gate_up[..., :ffn]) * gate_up[..., ffn:]


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary embedding with rotate-half pairing: x [T, heads, d], cos/sin [T, d]."""
    half = x.shape[-1] // 2
    rotated = np.concatenate((-x[..., half:], x[..., :half]), axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: int) -> np.ndarray:
    """Causal grouped-query attention of queries q [T, heads, d] at positions pos.. over keys
    and values [kv_heads, pos + T, d]: [T, heads * d]."""
    t, heads, d = q.shape
    kv_heads, length = k.shape[0], pos + t
    group = heads // kv_heads
    qg = q.reshape(t, kv_heads, group, d).transpose(1, 2, 0, 3).reshape(kv_heads, group * t, d)
    scores = (qg @ k[:, :length].transpose(0, 2, 1)) * np.float32(d**-0.5)
    if t > 1:  # row g*t + i is query i of head g: it sees positions <= pos + i
        future = np.arange(length)[None, :] > (pos + np.arange(t))[:, None]
        scores[:, np.tile(future, (group, 1))] = -np.inf
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    scores /= scores.sum(axis=-1, keepdims=True)
    out = scores @ v[:, :length]
    return out.reshape(kv_heads, group, t, d).transpose(2, 0, 1, 3).reshape(t, heads * d)


def rotary_append(qkv: np.ndarray, cos: np.ndarray, sin: np.ndarray, slots: np.ndarray, pos: np.ndarray, kc: np.ndarray, vc: np.ndarray,
                  heads: int):  # fmt: skip
    """The q|k|v rows [rows, (heads + 2 kv_heads) d] of tokens at positions ``pos`` of the
    sequences in cache slots ``slots``: (rotated q [rows, heads, d], and the caches [slots,
    kv_heads, context, d] with row pos[r] of slot slots[r] holding row r's rotated k and v)."""
    _, kv_heads, _, d = kc.shape
    q = np.empty((len(qkv), heads, d), np.float32)
    for r, (s, p) in enumerate(zip(slots, pos)):
        qk = rotate(qkv[r : r + 1, : (heads + kv_heads) * d].reshape(1, -1, d), cos[p : p + 1], sin[p : p + 1])[0]
        q[r], kc[s, :, p], vc[s, :, p] = qk[:heads], qk[heads:], qkv[r, (heads + kv_heads) * d :].reshape(kv_heads, d)
    return q, kc, vc


def decode_attention(q: np.ndarray, kc: np.ndarray, vc: np.ndarray, slots: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Query tokens q [rows, heads, d], row r at position pos[r] over cache slot slots[r] of
    [slots, kv_heads, context, d]: [rows, heads * d]."""
    return np.concatenate([attend(q[r][None], kc[s], vc[s], int(p)) for r, (s, p) in enumerate(zip(slots, pos))])


# ----------------------------------------------------------------------------- output layer
# Output-layer GEMVs (logits = hidden @ E^T, one token): float16 weights in layout
# f16-tiles-v1 ([tiles, K, 64]) and int8 weights in layout i8-tiles-v1 ([tiles, K/4, 64, 4]).
# Both work tile chunk by tile chunk, so the 128256-row vocabulary never needs a float64 or
# int32 copy of the whole matrix on the device.

F16_GEMV_RTOL = 1e-5  # |kernel - exact| <= F16_GEMV_RTOL * sum_k |x[k] w[n, k]| (+ F16_GEMV_ATOL)
F16_GEMV_ATOL = 1e-30
_OUTPUT_TILES_PER_STEP = 16


def f16_gemv(x: np.ndarray, packed: np.ndarray, with_bound: bool = False):
    """float32 [1, N_padded]: x [K] (or [1, K]) times the float16 tiles [N_padded/64, K, 64],
    computed in float64 (exact products, sums good to ~1e-16) and rounded to float32 once.
    The kernel sums in float32 in k order (possibly with fused multiply-adds), so it equals
    this only within ``f16_gemv_close``. ``with_bound`` also returns sum_k |x[k] w[n, k]| (float64 [1, N_padded])."""
    x64 = np.asarray(x, np.float64).reshape(-1)
    tiles, k, rows = packed.shape
    out, bound = np.empty((tiles, rows), np.float64), np.empty((tiles, rows), np.float64)
    for start in range(0, tiles, _OUTPUT_TILES_PER_STEP):
        w = packed[start : start + _OUTPUT_TILES_PER_STEP].astype(np.float64)
        out[start : start + len(w)] = x64 @ w
        if with_bound:
            bound[start : start + len(w)] = np.abs(x64) @ np.abs(w)
    result = out.astype(np.float32).reshape(1, -1)
    return (result, bound.reshape(1, -1)) if with_bound else result


def f16_gemv_close(got: np.ndarray, x: np.ndarray, packed: np.ndarray) -> bool:
    """Whether a kernel's float32 output (any shape holding N_padded values) is within the
    stated tolerance of the exact product."""
    want, bound = f16_gemv(x, packed, with_bound=True)
    got = np.asarray(got, np.float64).reshape(want.shape)
    return bool(np.all(np.abs(got - want) <= F16_GEMV_RTOL * bound + F16_GEMV_ATOL))


def f16_gemm(x: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """float32 [tokens, N_padded]: each row of x [tokens, K] through ``f16_gemv``."""
    return np.concatenate([f16_gemv(row, packed) for row in np.asarray(x)])


def f16_gemm_close(got: np.ndarray, x: np.ndarray, packed: np.ndarray) -> bool:
    """``f16_gemv_close`` for every row."""
    got = np.asarray(got).reshape(len(x), -1)
    return all(f16_gemv_close(g, row, packed) for g, row in zip(got, x))


def i8_gemv(q: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """int32 [1, N_padded] = q [K_padded] (or [1, K_padded]) int8 times the int8 weight tiles
    [N_padded/64, K_padded/4, 64, 4], exactly (float64 products and sums are exact here:
    |sum| <= 128 * 128 * K < 2**53). The kernel must equal it bit for bit."""
    q64 = np.asarray(q, np.float64).reshape(-1)
    tiles, chunks, rows, width = packed.shape
    if q64.size != chunks * width:
        raise ValueError(f"activations have {q64.size} values, the weights {chunks * width} columns")
    out = np.empty((tiles, rows), np.float64)
    for start in range(0, tiles, _OUTPUT_TILES_PER_STEP):
        w = packed[start : start + _OUTPUT_TILES_PER_STEP].astype(np.float64)  # [t, c, r, j]
        out[start : start + len(w)] = np.einsum("tcrj,cj->tr", w, q64.reshape(chunks, width), optimize=True)
    return out.astype(np.int64).astype(np.int32).reshape(1, -1)


def i8_gemm(q: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """int32 [tokens, N_padded]: each row of q [tokens, K_padded] through ``i8_gemv``, exactly."""
    return np.concatenate([i8_gemv(row, packed) for row in np.asarray(q)])
