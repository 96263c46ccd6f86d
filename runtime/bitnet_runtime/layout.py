"""Weight and table layouts shared by the compiler (which generates code for them) and the
runtime (which packs a model's weights into them on the device).

Layout ``lut4-v1``: ternary weights in groups of 4 along K. Each (row, group) becomes one byte:
the low nibble is the mask of weights equal to +1, the high nibble the mask of weights equal
to -1. With ``L[e]`` = the sum of the activations whose bit is set in ``e``, the group's dot
product is ``L[lo] - L[hi]``: exact, no correction term. Rows are tiled in blocks of
``rows`` (32 for ymm, 64 for zmm). Inside a block, the byte of row ``h * rows/2 + l * 8 + i``
sits at offset ``l * 16 + h * 8 + i``: that is where vpunpck{l,h}bw of the two table planes
puts its 16-bit result, so the kernel writes rows back in natural order without a shuffle.
Storage order is ``[row_block, group, rows/16, 2, 8]``, so one block streams contiguously.

Tables: ``[tokens, groups, 2, 16]`` int8; plane 0 holds the low byte of the int16 entry
``L[e]`` (read unsigned), plane 1 the high byte. int16 entries make every int8 activation
exact (|L| <= 512).

Calling convention (``bind``): int8 activations q [tokens, K_padded] -> lut_table -> tables ->
lut_gemv (one token) or lut_gemm -> int32 acc ``acc_shape`` (the same memory as
[tokens, N_padded]).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import UserError
from .memory import aligned_empty, aligned_zeros

Kernels = Mapping[str, Callable[..., Any]]  # a layer's kernels by role, the manifest's "kernels" keys (lut_table, gemv, gemm)
Params = Mapping[str, Any]  # shape and layout parameters: LinearEntry.params, Kernel.params, or shape | knobs

VERSION = "lut4-v1"
PACKING_PARAMS = ("rows", "kblock")  # the layout_params that change the packed bytes
PARAMS = PACKING_PARAMS  # every layout_param the packing and the calling convention read (positive)
ROLES = ("lut_table", "gemv", "gemm")  # the kernels the calling convention calls
GROUP = 4  # weights per table lookup


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def effective_kblock(k: int, kblock: int) -> int:
    """A k-block never exceeds the groups there are, so short K is not padded to a long block."""
    return max(1, min(kblock, -(-k // GROUP)))


def padded_shape(n: int, k: int, rows: int, kblock: int) -> tuple[int, int]:
    """(N, K) as the kernel sees them: N to whole row blocks, K to whole k-blocks of groups."""
    groups = -(-k // GROUP)
    return round_up(n, rows), round_up(groups, effective_kblock(k, kblock)) * GROUP


def table_shape(tokens: int, k_padded: int) -> tuple[int, ...]:
    """Shape of the tables the LUT kernels read: [tokens, groups, 2 planes, 16 entries]."""
    return (tokens, k_padded // GROUP, 2, 16)


def acc_shape(tokens: int, n_padded: int, rows: int) -> tuple[int, ...]:
    """Shape of the LUT matmul's int32 output; the same memory as [tokens, n_padded]."""
    return (tokens, n_padded // rows, 2, rows // 16, 8)


def check_ternary(weights: np.ndarray) -> np.ndarray:
    """The packer's input contract: a 2-D integer or float matrix holding only -1, 0, +1."""
    w = np.asarray(weights)
    if w.ndim != 2:
        raise UserError(f"ternary weights must be a 2-D [out_features, in_features] matrix, got shape {w.shape}")
    if not (np.issubdtype(w.dtype, np.integer) or np.issubdtype(w.dtype, np.floating)):
        raise UserError(f"ternary weights must be numeric, got dtype {w.dtype}")
    bad = ~np.isin(w, (-1, 0, 1))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise UserError(f"weights are not ternary: element [{r}, {c}] is {w[r, c]!r} (only -1, 0, +1 allowed)")
    return w.astype(np.int8)


def pack_ternary(weights: np.ndarray, rows: int, kblock: int) -> np.ndarray:
    """Pack a {-1, 0, +1} matrix [N, K] into layout lut4-v1, zero-padded to ``padded_shape``."""
    w = check_ternary(weights)
    n, k = w.shape
    np_, kp = padded_shape(n, k, rows, kblock)
    full = np.zeros((np_, kp), np.int8)
    full[:n, :k] = w
    quads = full.reshape(np_, kp // GROUP, GROUP)
    bit = (1 << np.arange(GROUP)).astype(np.uint8)
    pos = ((quads == 1) * bit).sum(-1, dtype=np.uint8)
    neg = ((quads == -1) * bit).sum(-1, dtype=np.uint8)
    byte = pos | (neg << 4)  # [N, G]
    blocked = byte.reshape(np_ // rows, 2, rows // 16, 8, kp // GROUP)  # row = h*rows/2 + l*8 + i
    return np.ascontiguousarray(blocked.transpose(0, 4, 2, 1, 3))


def unpack_ternary(packed: np.ndarray) -> np.ndarray:
    """Inverse of ``pack_ternary`` (padded shape): lets tests prove the layout loses nothing."""
    nb, groups, lanes, _, _ = packed.shape
    rows = lanes * 16
    byte = packed.transpose(0, 3, 2, 4, 1).reshape(nb * rows, groups)
    bits = (1 << np.arange(GROUP)).astype(np.uint8)
    pos = (byte[..., None] & bits) != 0
    neg = ((byte[..., None] >> 4) & bits) != 0
    return (pos.astype(np.int8) - neg.astype(np.int8)).reshape(nb * rows, groups * GROUP)


@dataclass(frozen=True)
class LutCall:
    """lut4-v1 for one token count: the buffers, 64-byte aligned and allocated once, and
    ``run(packed) -> out`` (lut_table, then the matmul). ``run`` is a closure over the buffers,
    so a call does no more than the two kernel calls: BitLinear makes it for every layer."""

    q: np.ndarray  # int8 [tokens, K_padded], zero past K: the activations, written by the caller
    tables: np.ndarray  # int8 table_shape: lut_table's output, the matmul's input
    acc: np.ndarray  # int32 acc_shape, as the matmul writes it
    out: np.ndarray  # acc as int32 [tokens, N_padded]
    run: Callable[[np.ndarray], np.ndarray]

    def args(self, packed: np.ndarray) -> tuple[np.ndarray, ...]:
        """The matmul kernel's arguments (the tables filled by the caller): for timing it alone."""
        return self.tables, packed, self.acc


def bind(kernels: Kernels, params: Params, tokens: int) -> LutCall:
    """The calls for ``tokens`` rows: lut_gemv for one, lut_gemm for more. ``params``: n_padded,
    k_padded, rows. ``kernels`` may lack what the caller runs itself (e.g. only "gemv" when the
    tables come from the reference; none at all for ``args`` alone)."""
    n_p, k_p = params["n_padded"], params["k_padded"]
    q = aligned_zeros((tokens, k_p), np.int8)
    tables = aligned_empty(table_shape(tokens, k_p), np.int8)
    acc = aligned_empty(acc_shape(tokens, n_p, params["rows"]), np.int32)
    out = acc.reshape(tokens, n_p)
    table, matmul = kernels.get("lut_table"), kernels.get("gemv" if tokens == 1 else "gemm")

    def run(packed: np.ndarray) -> np.ndarray:
        table(q, tables)
        matmul(tables, packed, acc)
        return out

    return LutCall(q, tables, acc, out, run)
