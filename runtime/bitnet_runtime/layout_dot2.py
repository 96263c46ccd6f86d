"""Layout ``dot2-v1`` of the VNNI kernel family: 2 bits per weight, stored as w + 1 in {0, 1, 2}.

Rows in blocks of 16 (one zmm of int32), K in chunks of 16. Byte j of row i in chunk c holds,
in bits 2f..2f+1, the weight of column 16c + 4f + j: masking field f of 64 consecutive bytes
gives vpdpbusd exactly the 16 rows x 4 weights that meet the activation dword
q[16c + 4f : 16c + 4f + 4]. Storage order ``[N/16, K/16, 16, 4]``: a row block streams
contiguously. Activations are plain int8 [tokens, K] (viewed as [K/16, 4, 4]).

Calling convention (``bind``): dot2_gemv on one token, dot2_gemm on whole token tiles (a
prompt padded with zero tokens), int32 acc [tokens, N_padded]. The GPU kernels (gpu2_*) take
the same bytes as uint32 words (``act_words``, ``packed_words``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .layout import Kernels, Params, check_ternary, round_up
from .memory import aligned_empty, aligned_zeros

VERSION = "dot2-v1"
PACKING_PARAMS: tuple[str, ...] = ()  # token_tile shapes the GEMM call, not the packed bytes
PARAMS = ("token_tile",)  # every layout_param the calling convention reads (positive)
ROLES = ("gemv", "gemm")  # the kernels the calling convention calls
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


def act_words(acts: np.ndarray, token_tile: int | None = None) -> np.ndarray:
    """The GPU kernels' view of int8 acts [rows, K], no copy: int32 dwords [1, K/16, 4] (GEMV,
    ``token_tile`` None) or [rows / token_tile, token_tile, K/16, 4] (GEMM)."""
    rows = acts.shape[0]
    lead = (rows,) if token_tile is None else (rows // token_tile, token_tile)
    return np.ascontiguousarray(acts).view(np.int32).reshape(*lead, acts.shape[1] // CHUNK, 4)


def packed_words(packed: np.ndarray) -> np.ndarray:
    """The GPU kernels' view of the packed bytes [N/16, K/16, 16, 4], no copy: uint32 words
    [N/16, K/16, 16] (one row's 16 weights of a chunk; little-endian, byte j = bits 8j..8j+7)."""
    return np.ascontiguousarray(packed).view(np.uint32).reshape(packed.shape[:3])


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


@dataclass(frozen=True)
class Dot2Call:
    """dot2-v1 for one token count: the buffers, 64-byte aligned and allocated once, and
    ``run(packed) -> out``. ``run`` is a closure over the kernel's views, so a call does no
    more than the kernel call: BitLinear makes it for every layer."""

    q: np.ndarray  # int8 [tokens, K_padded], zero past K: the activations, written by the caller
    out: np.ndarray  # int32 [tokens, N_padded]
    acts: np.ndarray  # q's memory with its zero padding tokens, as the kernel takes it
    acc: np.ndarray  # out's memory with the padding tokens' rows, as the kernel takes it
    words: bool  # the GPU kernels' convention
    run: Callable[[np.ndarray], np.ndarray]

    def args(self, packed: np.ndarray) -> tuple[np.ndarray, ...]:
        """The kernel's arguments: for timing it, or calling it some other way (a GPU's buffers)."""
        return self.acts, packed_words(packed) if self.words else packed, self.acc


def bind(kernels: Kernels, params: Params, tokens: int, words: bool = False) -> Dot2Call:
    """The call for ``tokens`` rows: "gemv" for one, else "gemm" on ``token_tile`` rows at a
    time. ``params``: n_padded, k_padded, token_tile (GEMM). ``words``: the gpu2 kernels'
    views. ``kernels`` may be empty when the caller runs the kernel itself (``args``)."""
    n_p, k_p = params["n_padded"], params["k_padded"]
    tile = None if tokens == 1 else params["token_tile"]
    rows = round_up(tokens, tile or 1)
    q, acc = aligned_zeros((rows, k_p), np.int8), aligned_empty((rows, n_p), np.int32)
    if words:
        acts = act_words(q, tile)
        acc_view = acc.reshape(*acts.shape[:-2], n_p)
    else:
        acts, acc_view = kernel_views(q, acc, tile)
    out, matmul = acc[:tokens], kernels.get("gemv" if tokens == 1 else "gemm")

    def run(packed: np.ndarray) -> np.ndarray:
        matmul(acts, packed, acc_view)
        return out

    def run_words(packed: np.ndarray) -> np.ndarray:
        matmul(acts, packed_words(packed), acc_view)
        return out

    return Dot2Call(q[:tokens], out, acts, acc_view, words, run_words if words else run)
