"""Layout ``f16-tiles-v1`` of the float16 output-layer GEMV (logits = hidden @ E^T).

The output layer's matrix (the tied embedding E [vocab, hidden], or lm_head) as float16:
128256 x 2560 is 656 MB, half of float32. Lookups do not use these tiles: a lookup would map
in 64 rows of a tile for one (``weights`` keeps row-major float16 rows for them).

Rows in tiles of ROWS = 64, storage ``[N_padded / 64, K, 64]`` float16: at each k the kernel
reads the 64 weights of a tile as 128 contiguous bytes (two zmm, vcvtph2ps to four zmm of
float32) and multiplies them by the one activation x[k], so the 64 outputs of a tile
accumulate in four zmm registers (eight ymm on AVX2) and a tile is one contiguous stream.
Padded rows (N_padded - N of them) are zero, so their outputs are 0. K is not padded.

Kernel arguments: ``x`` float32 [1, K], ``packed`` [N_padded / 64, K, 64] float16, ``out``
float32 [N_padded / 64, 64] (the same memory as [1, N_padded]; ``out_view``); ``bind``
allocates them once.

Packing from a checkpoint: ``pack_rows`` converts ROWS rows at a time (``chunk_rows`` at most
per step), so it never holds a float32 copy of the whole matrix and works on a memory-mapped
source, float32/float16 or bfloat16 stored as uint16 bit patterns (``bf16=True``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .layout import Kernels, Params
from .memory import aligned_empty, aligned_zeros

VERSION = "f16-tiles-v1"
ROWS = 64  # rows per tile: 64 float32 accumulators = 4 zmm
TOKEN_BLOCK = 4  # tokens the GEMM ("gemm", several tokens) accumulates together: 4 x 4 zmm
CHUNK_ROWS = 4096  # rows converted per packing step (4096 x 2560 float32 = 40 MB)
F16_MAX = float(np.finfo(np.float16).max)


def padded_rows(n: int) -> int:
    """N as the kernel sees it: whole tiles of ROWS."""
    return -(-n // ROWS) * ROWS


def packed_shape(n: int, k: int) -> tuple[int, int, int]:
    return (padded_rows(n) // ROWS, k, ROWS)


def out_view(out: np.ndarray) -> np.ndarray:
    """The kernel's view [N_padded / 64, 64] of a float32 [1, N_padded] (or [N_padded]) output."""
    return out.reshape(-1, ROWS)


def rows_as_float32(w: np.ndarray, start: int, stop: int, bf16: bool = False) -> np.ndarray:
    """Rows [start, stop) of a 2-D weight matrix as float32 (bf16: uint16 bit patterns of bfloat16)."""
    block = np.asarray(w[start:stop])
    if bf16:
        if block.dtype != np.uint16:
            raise UserError(f"bf16=True expects the uint16 bit patterns of bfloat16, got dtype {block.dtype}")
        return (block.astype(np.uint32) << 16).view(np.float32)
    if not np.issubdtype(block.dtype, np.floating):
        raise UserError(f"weights must be a float matrix (or bf16=True with uint16 bit patterns), got dtype {block.dtype}")
    return block.astype(np.float32, copy=False)


def check_matrix(w) -> tuple[int, int]:
    shape = getattr(w, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise UserError(f"weights must be a non-empty 2-D [rows, cols] matrix, got shape {shape}")
    return int(shape[0]), int(shape[1])


def pack_rows(w, bf16: bool = False, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """float [N, K] (any float dtype, or bfloat16 bits as uint16 with ``bf16``) -> 64-byte aligned
    float16 [N_padded / 64, K, 64], padded rows zero. Values beyond float16 range are an error."""
    n, k = check_matrix(w)
    chunk_rows = max(ROWS, chunk_rows // ROWS * ROWS)
    packed = aligned_empty(packed_shape(n, k), np.float16)
    for start in range(0, padded_rows(n), chunk_rows):
        stop = min(start + chunk_rows, padded_rows(n))
        rows = rows_as_float32(w, start, min(stop, n), bf16)
        if rows.size and not (-F16_MAX <= rows.min() and rows.max() <= F16_MAX):  # NaN fails too
            raise UserError(f"weights in rows {start}..{min(stop, n) - 1} are not finite or exceed float16 range ({F16_MAX})")
        tiles = np.zeros((stop - start, k), np.float16)
        tiles[: rows.shape[0]] = rows
        packed[start // ROWS : stop // ROWS] = tiles.reshape(-1, ROWS, k).transpose(0, 2, 1)
    return packed


def unpack_rows(packed: np.ndarray, n: int | None = None) -> np.ndarray:
    """Inverse of ``pack_rows``: float16 [n, K] (all N_padded rows by default)."""
    tiles, k, _ = packed.shape
    return packed.transpose(0, 2, 1).reshape(tiles * ROWS, k)[: tiles * ROWS if n is None else n]


@dataclass(frozen=True)
class F16Call:
    """f16-tiles-v1's GEMV (one token): its buffers, allocated once, and ``run(packed) -> out``."""

    x: np.ndarray  # float32 [1, K]: the hidden state, written by the caller
    out: np.ndarray  # float32 [1, N_padded]; padded rows come out 0
    acc: np.ndarray  # out's memory as the kernel takes it
    run: Callable[[np.ndarray], np.ndarray]

    def args(self, packed: np.ndarray) -> tuple[np.ndarray, ...]:
        """The kernel's arguments: for timing it."""
        return self.x, packed, self.acc


def bind(kernels: Kernels, params: Params) -> F16Call:
    """The "gemv" call of an [n, k] output layer (``params``: n, k; N pads to whole tiles)."""
    x = aligned_empty((1, params["k"]), np.float32)
    out = aligned_empty((1, padded_rows(params["n"])), np.float32)
    acc, gemv = out_view(out), kernels.get("gemv")

    def run(packed: np.ndarray) -> np.ndarray:
        gemv(x, packed, acc)
        return out

    return F16Call(x, out, acc, run)


@dataclass(frozen=True)
class F16BatchCall:
    """The "gemm" (several tokens) with its buffers: x [tokens padded to TOKEN_BLOCK, K], rows
    past ``tokens`` zero; ``run(packed)`` -> out [tokens, N_padded]."""

    x: np.ndarray
    out: np.ndarray  # float32 [padded tokens, N_padded]
    acc: np.ndarray  # out's memory as the kernel takes it: [blocks, TOKEN_BLOCK, N_padded / 64, 64]
    run: Callable[[np.ndarray], np.ndarray]

    def args(self, packed: np.ndarray) -> tuple[np.ndarray, ...]:
        return self.x.reshape(self.acc.shape[0], TOKEN_BLOCK, -1), packed, self.acc


def padded_tokens(tokens: int) -> int:
    """Tokens as the GEMM runs them: whole blocks of TOKEN_BLOCK."""
    return -(-tokens // TOKEN_BLOCK) * TOKEN_BLOCK


def bind_batch(kernels: Kernels, params: Params, tokens: int) -> F16BatchCall:
    """The "gemm" call of an [n, k] output layer for ``tokens`` tokens."""
    padded = padded_tokens(tokens)
    x = aligned_zeros((padded, params["k"]), np.float32)
    out = aligned_empty((padded, padded_rows(params["n"])), np.float32)
    blocks = padded // TOKEN_BLOCK
    acc, gemm = out.reshape(blocks, TOKEN_BLOCK, -1, ROWS), kernels.get("gemm")
    x_blocks = x.reshape(blocks, TOKEN_BLOCK, -1)

    def run(packed: np.ndarray) -> np.ndarray:
        gemm(x_blocks, packed, acc)
        return out[:tokens]

    return F16BatchCall(x, out, acc, run)
