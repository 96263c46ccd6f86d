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
    """Per-token absmax int8 quantization; returns (q [M, k_padded], scale [M]) with zero padding."""
    x = np.asarray(x, np.float32)
    m, k = x.shape
    absmax = np.abs(x).max(axis=1)
    scale = np.float32(127.0) / np.maximum(absmax, ABSMAX_FLOOR)
    q = np.clip(np.round(x * scale[:, None]), -128, 127).astype(np.int8)
    out = np.zeros((m, k_padded or k), np.int8)
    out[:, :k] = q
    return out, scale.astype(np.float32)


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
