"""Layout ``i8-tiles-v1`` of the int8 output-layer GEMV (logits = hidden @ E^T, quantized).

Each row n of E [vocab, hidden] is quantized symmetrically on its own: ``scale[n] = max|E[n]| /
127``, ``w[n, k] = clamp(round_half_even(E[n, k] / scale[n]), -127, 127)`` (an all-zero row gets
scale 0 and weights 0). The kernel returns the int32 ``acc[n] = sum_k q[k] * w[n, k]`` of the
int8 activations q (from the quantize kernel), and the existing dequantize kernel applies
``scale`` per row: ``logits = acc * scale[n] / act_scale``.

Storage ``[N_padded / 64, K_padded / 4, 64, 4]`` int8: rows in tiles of 64, K in chunks of
4; byte j of row i in chunk c holds ``w[64 t + i, 4 c + j]``. One chunk of a tile is 256
contiguous bytes = four zmm of 16 rows x 4 weights, exactly what four vpdpbusd meet with
the broadcast activation dword q[4c : 4c + 4]; a tile streams contiguously. Padded rows and
columns are zero.

vpdpbusd multiplies unsigned by signed bytes, so the kernel feeds it the activations shifted
to unsigned (q + 128, a flip of the sign bit) and subtracts ``correction[n] = 128 * sum_k
w[n, k]`` (int32 [N_padded], computed here at pack time) from each row: exact in int32.

Kernel arguments: ``q`` int8 [1, K_padded / 4, 4] (the same memory as [1, K_padded]),
``packed``, ``correction`` int32 [N_padded / 64, 64], ``out`` int32 [N_padded / 64, 64] (the
same memory as [1, N_padded], the dequantize kernel's ``acc``); ``bind`` allocates them once.
The GEMM of several tokens takes the same with a leading [blocks, TOKEN_BLOCK] (``bind_batch``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .layout import Kernels, Params
from .layout_f16 import CHUNK_ROWS, check_matrix, rows_as_float32
from .memory import aligned_empty, aligned_zeros

VERSION = "i8-tiles-v1"
ROWS = 64  # rows per tile: 4 zmm of int32 accumulators
CHUNK = 4  # weights of a row per chunk: one vpdpbusd dword
SHIFT = 128  # activations enter vpdpbusd as q + SHIFT (unsigned)
TOKEN_BLOCK = 4  # tokens the GEMM ("gemm", several tokens) accumulates together: 4 x 4 zmm
QMAX = 127


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def padded_shape(n: int, k: int) -> tuple[int, int]:
    """(N_padded, K_padded): N to whole tiles of 64, K to whole chunks of 4."""
    return round_up(n, ROWS), round_up(k, CHUNK)


def packed_shape(n: int, k: int) -> tuple[int, int, int, int]:
    n_p, k_p = padded_shape(n, k)
    return (n_p // ROWS, k_p // CHUNK, ROWS, CHUNK)


def kernel_arrays(arrays: tuple[np.ndarray, np.ndarray, np.ndarray], shape: dict | None = None) -> tuple:
    """``quantize_rows``' (packed, scale, correction) as (packed, per-row scale for the dequantize
    kernel, the extra GEMV arguments after ``packed``: (correction [N_padded/64, 64],)).
    ``shape``, a manifest shape with n_padded and k_padded, is checked against the arrays."""
    packed, scale, corr = arrays
    if shape is not None and packed.shape != (shape["n_padded"] // ROWS, shape["k_padded"] // CHUNK, ROWS, CHUNK):
        want = f"n_padded={shape['n_padded']} k_padded={shape['k_padded']}"
        raise UserError(f"int8 output weights of shape {packed.shape} do not fit the kernel's {want}")
    return packed, scale, (corr.reshape(-1, ROWS),)


def quantize_block(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 rows [r, K] -> (int8 [r, K], float32 scale [r]) by per-row absmax (one float32
    temporary the size of ``rows``; ``rows`` itself is left alone: it may be the caller's)."""
    absmax = np.maximum(rows.max(axis=1), -rows.min(axis=1))
    scale = (absmax / np.float32(QMAX)).astype(np.float32)
    floor = np.float32(1e-30)  # 127 / absmax must stay finite (a row this small quantizes to 0)
    inverse = np.divide(np.float32(QMAX), np.maximum(absmax, floor), out=np.zeros_like(absmax), where=absmax > 0)
    scaled = rows * inverse[:, None]
    np.rint(scaled, out=scaled)
    np.clip(scaled, -QMAX, QMAX, out=scaled)
    return scaled.astype(np.int8), scale


def pack_block(w: np.ndarray, k_padded: int) -> np.ndarray:
    """int8 rows [64 * tiles, K] -> tiles [tiles, K_padded / 4, 64, 4] (zero columns past K)."""
    r, k = w.shape
    full = np.zeros((r, k_padded), np.int8)
    full[:, :k] = w
    return full.reshape(r // ROWS, ROWS, k_padded // CHUNK, CHUNK).transpose(0, 2, 1, 3)


def correction(packed: np.ndarray) -> np.ndarray:
    """int32 [N_padded] = SHIFT * (sum of each row's weights), the term the kernel subtracts."""
    tiles, chunks = packed.shape[:2]
    out = aligned_empty((tiles, ROWS), np.int32)
    for start in range(0, tiles, 64):  # summing over chunks first (axis 1) is what numpy does fast
        block = packed[start : start + 64].reshape(-1, chunks, ROWS * CHUNK)
        out[start : start + 64] = np.add.reduce(block, axis=1, dtype=np.int32).reshape(-1, ROWS, CHUNK).sum(axis=2) * SHIFT
    return out.reshape(-1)


def quantize_rows(w, bf16: bool = False, chunk_rows: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float [N, K] (any float dtype, or bfloat16 bits as uint16 with ``bf16``; a np.memmap is
    read ``chunk_rows`` rows at a time) -> (packed int8 [N_padded/64, K_padded/4, 64, 4],
    scale float32 [N], correction int32 [N_padded]), all 64-byte aligned."""
    n, k = check_matrix(w)
    n_p, k_p = padded_shape(n, k)
    chunk_rows = max(ROWS, chunk_rows // ROWS * ROWS)
    packed = aligned_empty(packed_shape(n, k), np.int8)
    scale = aligned_zeros((n,), np.float32)
    for start in range(0, n_p, chunk_rows):
        stop = min(start + chunk_rows, n_p)
        rows = rows_as_float32(w, start, min(stop, n), bf16)
        if rows.size and not (np.isfinite(rows.min()) and np.isfinite(rows.max())):
            raise UserError(f"weights in rows {start}..{min(stop, n) - 1} are not finite")
        q = np.zeros((stop - start, k), np.int8)
        q[: rows.shape[0]], scale[start : start + rows.shape[0]] = quantize_block(rows)
        packed[start // ROWS : stop // ROWS] = pack_block(q, k_p)
    return packed, scale, correction(packed)


def unpack_rows(packed: np.ndarray, n: int | None = None, k: int | None = None) -> np.ndarray:
    """Inverse of the packing: int8 [n, k] (all padded rows and columns by default)."""
    tiles, chunks, _, _ = packed.shape
    full = packed.transpose(0, 2, 1, 3).reshape(tiles * ROWS, chunks * CHUNK)
    return full[: tiles * ROWS if n is None else n, : chunks * CHUNK if k is None else k]


@dataclass(frozen=True)
class I8Call:
    """i8-tiles-v1's GEMV (one token): its buffers, allocated once, and
    ``run(packed, correction) -> out`` (correction [N_padded / 64, 64], as ``kernel_arrays``
    gives it: the packed weights are the two arrays)."""

    q: np.ndarray  # int8 [1, K_padded], zero past K: the activations, written by the caller
    out: np.ndarray  # int32 [1, N_padded]: the dequantize kernel's acc
    acts: np.ndarray  # q's memory as the kernel takes it
    acc: np.ndarray  # out's memory as the kernel takes it
    run: Callable[[np.ndarray, np.ndarray], np.ndarray]

    def args(self, packed: np.ndarray, correction: np.ndarray) -> tuple[np.ndarray, ...]:
        """The kernel's arguments: for timing it."""
        return self.acts, packed, correction, self.acc


def bind(kernels: Kernels, params: Params) -> I8Call:
    """The "gemv" call of an output layer padded to ``params``' n_padded, k_padded."""
    q = aligned_zeros((1, params["k_padded"]), np.int8)
    out = aligned_empty((1, params["n_padded"]), np.int32)
    acts, acc, gemv = q.reshape(1, -1, CHUNK), out.reshape(-1, ROWS), kernels.get("gemv")

    def run(packed: np.ndarray, correction: np.ndarray) -> np.ndarray:
        gemv(acts, packed, correction, acc)
        return out

    return I8Call(q, out, acts, acc, run)


@dataclass(frozen=True)
class I8BatchCall:
    """The "gemm" (several tokens) with its buffers: q [tokens padded to TOKEN_BLOCK, K_padded],
    rows past ``tokens`` zero; ``run(packed, correction)`` -> out int32 [tokens, N_padded]."""

    q: np.ndarray
    out: np.ndarray  # int32 [padded tokens, N_padded]
    acts: np.ndarray  # q's memory as the kernel takes it: [blocks, TOKEN_BLOCK, K_padded / 4, 4]
    acc: np.ndarray  # out's memory as the kernel takes it: [blocks, TOKEN_BLOCK, N_padded / 64, 64]
    run: Callable[[np.ndarray, np.ndarray], np.ndarray]

    def args(self, packed: np.ndarray, correction: np.ndarray) -> tuple[np.ndarray, ...]:
        return self.acts, packed, correction, self.acc


def padded_tokens(tokens: int) -> int:
    """Tokens as the GEMM runs them: whole blocks of TOKEN_BLOCK."""
    return round_up(tokens, TOKEN_BLOCK)


def bind_batch(kernels: Kernels, params: Params, tokens: int) -> I8BatchCall:
    """The "gemm" call of an output layer padded to ``params``' n_padded, k_padded, for ``tokens`` tokens."""
    padded, n_p, k_p = padded_tokens(tokens), params["n_padded"], params["k_padded"]
    q = aligned_zeros((padded, k_p), np.int8)
    out = aligned_empty((padded, n_p), np.int32)
    blocks = padded // TOKEN_BLOCK
    acts, acc, gemm = q.reshape(blocks, TOKEN_BLOCK, -1, CHUNK), out.reshape(blocks, TOKEN_BLOCK, -1, ROWS), kernels.get("gemm")

    def run(packed: np.ndarray, correction: np.ndarray) -> np.ndarray:
        gemm(acts, packed, correction, acc)
        return out[:tokens]

    return I8BatchCall(q, out, acts, acc, run)
