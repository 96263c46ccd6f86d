"""BitLinear on compiled kernels: float32 activations [tokens, in] -> float32 [tokens, out].

One call: absmax int8 quantization, the family's integer matmul (GEMV for one token, GEMM for
several), dequantization. Weights are packed once at construction; working buffers are
64-byte aligned and reused per token count, so the hot path allocates nothing but the result.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from . import layout, layout_dot2
from .artifact import Artifact
from .errors import UserError
from .memory import aligned_copy, aligned_empty, aligned_zeros, is_aligned


class _LutMatmul:
    """lut4-v1: tables from the int8 activations, then LUT lookups."""

    def __init__(self, artifact: Artifact, entry: dict):
        names, params = entry["kernels"], entry["layout_params"]
        self.rows, self.kblock = params["rows"], params["kblock"]
        self.n_p, self.k_p = entry["n_padded"], entry["k_padded"]
        self.table, self.gemv, self.gemm = (artifact.kernel(names[key]).function for key in ("lut_table", "gemv", "gemm"))

    def token_rows(self, tokens: int) -> int:
        return tokens

    def bind(self, q: np.ndarray, tokens: int) -> Callable[[np.ndarray], np.ndarray]:
        """The calls for one token count with their buffers fixed once: run(packed) -> int32 [tokens, n_padded]."""
        tables = aligned_empty(layout.table_shape(tokens, self.k_p), np.int8)
        acc = aligned_empty(layout.acc_shape(tokens, self.n_p, self.rows), np.int32)
        acc_rows = acc.reshape(tokens, self.n_p)
        matmul = self.gemv if tokens == 1 else self.gemm

        def run(packed: np.ndarray) -> np.ndarray:
            self.table(q, tables)
            matmul(tables, packed, acc)
            return acc_rows

        return run


class _Dot2Matmul:
    """dot2-v1: the int8 activations as they are; the GEMM runs on whole token tiles."""

    def __init__(self, artifact: Artifact, entry: dict):
        names = entry["kernels"]
        self.token_tile = entry["layout_params"]["token_tile"]
        self.n_p, self.k_p = entry["n_padded"], entry["k_padded"]
        self.gemv, self.gemm = artifact.kernel(names["gemv"]).function, artifact.kernel(names["gemm"]).function

    def token_rows(self, tokens: int) -> int:
        return tokens if tokens == 1 else layout.round_up(tokens, self.token_tile)

    def bind(self, q: np.ndarray, tokens: int) -> Callable[[np.ndarray], np.ndarray]:
        """The call for one token count with its buffers fixed once (q has ``token_rows`` rows):
        run(packed) -> int32 [tokens, n_padded]."""
        acc = aligned_empty((q.shape[0], self.n_p), np.int32)
        acts, acc_view = layout_dot2.kernel_views(q, acc, None if tokens == 1 else self.token_tile)
        acc_rows = acc[:tokens]
        matmul = self.gemv if tokens == 1 else self.gemm

        def run(packed: np.ndarray) -> np.ndarray:
            matmul(acts, packed, acc_view)
            return acc_rows

        return run


MATMULS = {layout.VERSION: _LutMatmul, layout_dot2.VERSION: _Dot2Matmul}


class _Buffers:
    """Aligned working memory for one token count (q padded with zero tokens where needed)."""

    def __init__(self, tokens: int, shape: dict, matmul):
        self.x = aligned_empty((tokens, shape["k"]), np.float32)
        q = aligned_zeros((matmul.token_rows(tokens), shape["k_padded"]), np.int8)
        self.q = q[:tokens]  # the quantize kernel writes the real tokens; padding rows stay zero
        self.scale = aligned_empty((tokens,), np.float32)
        self.out = aligned_empty((tokens, shape["n"]), np.float32)
        self.matmul = matmul.bind(q, tokens)


def pack_weights(entry: dict, weights: np.ndarray) -> np.ndarray:
    """Ternary weights [n, k] in the layout of a manifest linear entry, 64-byte aligned: what
    the conversion cache stores, so a model's second start packs nothing."""
    w = layout.check_ternary(weights)
    if (entry["n"], entry["k"]) != w.shape:
        raise UserError(f"weights of shape {list(w.shape)} do not fit the artifact's {entry['n']}x{entry['k']} linear")
    params = entry["layout_params"]
    if entry.get("layout") == layout.VERSION:
        return aligned_copy(layout.pack_ternary(w, params["rows"], params["kblock"]))
    if entry.get("layout") == layout_dot2.VERSION:
        return aligned_copy(layout_dot2.pack_ternary(w, entry["n_padded"], entry["k_padded"]))
    raise UserError(f"artifact uses weight layout {entry.get('layout')!r}; this runtime knows {', '.join(MATMULS)}")


class BitLinear:
    """A ternary linear layer y = (x W^T) * weight_scale with BitNet b1.58 activation quantization.

    ``weight_scale`` is a scalar or one value per output row: fused layers (q|k|v, gate|up)
    concatenate matrices that carry their own scales.
    """

    def __init__(self, artifact: Artifact, weights: np.ndarray, weight_scale):
        w = layout.check_ternary(weights)
        self._bind(artifact, artifact.linear(*w.shape), weight_scale)
        self.packed = pack_weights(self._entry, w)

    @classmethod
    def from_packed(cls, artifact: Artifact, n: int, k: int, packed: np.ndarray, weight_scale, buffers: dict | None = None) -> "BitLinear":
        """A layer over weights already packed by ``pack_weights`` (e.g. memory-mapped from the cache).

        ``buffers``: working memory shared with other layers of the same shape (a model's 30
        q|k|v layers need one set, not 30); ``forward``'s result then lives until the next
        call of any layer sharing it."""
        layer = cls.__new__(cls)
        layer._bind(artifact, artifact.linear(n, k), weight_scale)
        if buffers is not None:
            layer._buffers = buffers
        if not is_aligned(packed):
            raise UserError(f"packed weights of the {n}x{k} layer must be C-contiguous and 64-byte aligned")
        layer.packed = packed
        return layer

    def _bind(self, artifact: Artifact, entry: dict, weight_scale) -> None:
        if entry.get("layout") not in MATMULS:
            raise UserError(f"artifact uses weight layout {entry.get('layout')!r}; this runtime knows {', '.join(MATMULS)}")
        scale = np.broadcast_to(np.asarray(weight_scale, np.float32), (entry["n"],))
        if not np.all(np.isfinite(scale)):
            raise UserError(f"weight_scale of the {entry['n']}x{entry['k']} layer must be finite")
        self._entry = entry
        self.shape = {key: entry[key] for key in ("n", "k", "n_padded", "k_padded")}
        self.quantize = artifact.kernel(entry["kernels"]["quantize"]).function
        self.dequantize = artifact.kernel(entry["kernels"]["dequantize"]).function
        self.matmul = MATMULS[entry["layout"]](artifact, entry)
        self.weight_scale = aligned_copy(scale)
        self._buffers: dict[int, _Buffers] = {}
    def _check_input(self, x: np.ndarray) -> np.ndarray:
        if type(x) is np.ndarray and x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == self.shape["k"] and x.shape[0]:
            return x  # the model's own activations: the common case, checked in one line
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            raise UserError(f"activations must be floating point, got dtype {x.dtype}")
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.shape["k"] or x.shape[0] == 0:
            raise UserError(f"activations must have shape [tokens, {self.shape['k']}], got {list(np.shape(x))}")
        return x

    def forward(self, x: np.ndarray) -> np.ndarray:
        """y for x [tokens, in], in this layer's own buffer: valid until its next call with
        the same token count (the model's hot path, which copies nothing)."""
        x = self._check_input(x)
        tokens = x.shape[0]
        buf = self._buffers.get(tokens)
        if buf is None:
            buf = self._buffers[tokens] = _Buffers(tokens, self.shape, self.matmul)
        buf.x[...] = x
        self.quantize(buf.x, buf.q, buf.scale)
        acc = buf.matmul(self.packed)
        self.dequantize(acc, buf.scale, self.weight_scale, buf.out)
        return buf.out

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x).copy()
