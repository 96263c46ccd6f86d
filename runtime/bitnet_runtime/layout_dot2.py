"""Layout ``dot2-v1`` of the VNNI kernel family: 2 bits per weight, stored as w + 1 in {0, 1, 2}.

Rows in blocks of 16 (one zmm of int32), K in chunks of 16. Byte j of row i in chunk c holds,
in bits 2f..2f+1, the weight of column 16c + 4f + j: masking field f of 64 consecutive bytes
gives vpdpbusd exactly the 16 rows x 4 weights that meet the activation dword
q[16c + 4f : 16c + 4f + 4]. Storage order ``[N/16, K/16, 16, 4]``: a row block streams
contiguously. Activations are plain int8 [tokens, K] (viewed as [K/16, 4, 4]).
"""

from __future__ import annotations

import numpy as np

from .layout import check_ternary, round_up

VERSION = "dot2-v1"
PACKING_PARAMS: tuple[str, ...] = ()  # token_tile shapes the GEMM call, not the packed bytes
ROWS = 16
CHUNK = 16  # weights of a row per chunk (4 fields x 4 bytes)


def padded_shape(n: int, k: int, row_blocks: int, k_chunks: int) -> tuple[int, int]:
    """N to whole groups of ``row_blocks`` blocks, K to whole groups of ``k_chunks`` chunks."""
    return round_up(n, ROWS * row_blocks), round_up(k, CHUNK * k_chunks)


def kernel_views(acts: np.ndarray, acc: np.ndarray, token_tile: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """int8 acts [rows, K] and int32 acc [rows, N] as the kernels take them: the GEMV
    (``token_tile`` None, one row) as [1, ...], the GEMM as [rows / token_tile, token_tile, ...]."""
    rows = acts.shape[0]
    lead = (rows,) if token_tile is None else (rows // token_tile, token_tile)
    return acts.reshape(*lead, acts.shape[1] // CHUNK, 4, 4), acc.reshape(*lead, acc.shape[1] // ROWS, ROWS)


def word_views(acts: np.ndarray, packed: np.ndarray, token_tile: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The GPU kernels' views, no copies: int8 acts [rows, K] as int32 dwords [1, K/16, 4]
    (GEMV, ``token_tile`` None) or [rows / token_tile, token_tile, K/16, 4] (GEMM), and the
    packed bytes [N/16, K/16, 16, 4] as uint32 words [N/16, K/16, 16] (one row's 16 weights of
    a chunk; little-endian, byte j = bits 8j..8j+7)."""
    rows = acts.shape[0]
    lead = (rows,) if token_tile is None else (rows // token_tile, token_tile)
    words = np.ascontiguousarray(acts).view(np.int32).reshape(*lead, acts.shape[1] // CHUNK, 4)
    return words, np.ascontiguousarray(packed).view(np.uint32).reshape(packed.shape[:3])


def pack_ternary(weights: np.ndarray, n_padded: int, k_padded: int) -> np.ndarray:
    w = check_ternary(weights)
    n, k = w.shape
    full = np.zeros((n_padded, k_padded), np.uint8)
    full[:n, :k] = w + 1
    full[n:, :] = 1  # padding weighs 0
    full[:, k:] = 1
    v = full.reshape(n_padded // ROWS, ROWS, k_padded // CHUNK, 4, 4)  # block, row, chunk, field, byte
    byte = v[:, :, :, 0] | (v[:, :, :, 1] << 2) | (v[:, :, :, 2] << 4) | (v[:, :, :, 3] << 6)
    return np.ascontiguousarray(byte.transpose(0, 2, 1, 3))


def unpack_ternary(packed: np.ndarray) -> np.ndarray:
    """Inverse of ``pack_ternary`` (padded shape)."""
    blocks, chunks = packed.shape[:2]
    fields = np.stack([(packed >> (2 * f)) & 3 for f in range(4)], axis=3)  # block, chunk, row, field, byte
    return fields.transpose(0, 2, 1, 3, 4).reshape(blocks * ROWS, chunks * CHUNK).astype(np.int8) - 1
