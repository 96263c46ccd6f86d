"""BitLinear on compiled kernels: float32 activations [tokens, in] -> float32 [tokens, out].

One call = four kernels: absmax int8 quantization, table construction, LUT matmul (GEMV for
one token, GEMM for several), dequantization. Weights are packed once at construction;
working buffers are 64-byte aligned and reused per token count, so the hot path allocates
nothing but the returned array.
"""

from __future__ import annotations

import numpy as np

from . import layout
from .artifact import Artifact
from .errors import UserError
from .memory import aligned_copy, aligned_empty


class _Buffers:
    """Aligned working memory for one token count."""

    def __init__(self, tokens: int, shape: dict, rows: int):
        n_p, k_p = shape["n_padded"], shape["k_padded"]
        self.x = aligned_empty((tokens, shape["k"]), np.float32)
        self.q = aligned_empty((tokens, k_p), np.int8)
        self.scale = aligned_empty((tokens,), np.float32)
        self.tables = aligned_empty((tokens, k_p // layout.GROUP, 2, 16), np.int8)
        self.acc = aligned_empty((tokens, n_p // rows, 2, rows // 16, 8), np.int32)
        self.acc_flat = self.acc.reshape(tokens, n_p)
        self.out = aligned_empty((tokens, shape["n"]), np.float32)


class BitLinear:
    """A ternary linear layer y = x W^T * weight_scale with BitNet b1.58 activation quantization."""

    def __init__(self, artifact: Artifact, weights: np.ndarray, weight_scale: float):
        w = layout.check_ternary(weights)
        n, k = w.shape
        entry = artifact.linear(n, k)
        self.shape = {key: entry[key] for key in ("n", "k", "n_padded", "k_padded")}
        names = entry["kernels"]
        self.quantize = artifact.kernel(names["quantize"])
        self.table = artifact.kernel(names["lut_table"])
        self.gemv = artifact.kernel(names["lut_gemv"])
        self.gemm = artifact.kernel(names["lut_gemm"])
        self.dequantize = artifact.kernel(names["dequantize"])
        self.rows = artifact.rows
        kblock = int(self.gemv.knobs["kblock"])
        self.packed = aligned_copy(layout.pack_ternary(w, self.rows, kblock))
        if not np.isfinite(weight_scale):
            raise UserError(f"weight_scale must be a finite number, got {weight_scale!r}")
        self.weight_scale = aligned_copy(np.array([weight_scale], np.float32))
        self._buffers: dict[int, _Buffers] = {}

    def _check_input(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            raise UserError(f"activations must be floating point, got dtype {x.dtype}")
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.shape["k"] or x.shape[0] == 0:
            raise UserError(f"activations must have shape [tokens, {self.shape['k']}], got {list(np.shape(x))}")
        return x

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = self._check_input(x)
        tokens = x.shape[0]
        buf = self._buffers.get(tokens)
        if buf is None:
            buf = self._buffers[tokens] = _Buffers(tokens, self.shape, self.rows)
        buf.x[...] = x
        self.quantize(buf.x, buf.q, buf.scale)
        self.table(buf.q, buf.tables)
        (self.gemv if tokens == 1 else self.gemm)(buf.tables, self.packed, buf.acc)
        self.dequantize(buf.acc_flat, buf.scale, self.weight_scale, buf.out)
        return buf.out.copy()
