"""BitLinear on compiled kernels: float32 activations [tokens, in] -> float32 [tokens, out].

One call: absmax int8 quantization, the family's integer matmul (GEMV for one token, GEMM for
several), dequantization. Weights are packed once at construction; working buffers are
64-byte aligned and reused per token count, so the hot path allocates nothing but the result.
"""

from __future__ import annotations

import numpy as np

from . import layout, layout_dot2
from .artifact import Artifact
from .errors import UserError
from .layout import Kernels
from .manifest import LinearEntry
from .memory import aligned_copy, aligned_empty, is_aligned

# weight layout -> its calling convention: bind(kernels, params, tokens) -> call with .q and .run(packed)
MATMULS = {layout.VERSION: layout.bind, layout_dot2.VERSION: layout_dot2.bind}
LAYOUTS = {layout.VERSION: layout, layout_dot2.VERSION: layout_dot2}  # each with the PARAMS and kernel ROLES it reads
ROLES = ("quantize", "rmsnorm_quantize", "dequantize")  # every linear's kernels beside its layout's


class _Buffers:
    """Aligned working memory for one token count; the matmul's own (q, padded with zero
    tokens where its kernel needs them) comes from the layout's ``bind``."""

    def __init__(self, tokens: int, entry: LinearEntry, kernels: Kernels):
        call = MATMULS[entry.layout](kernels, entry.params, tokens)
        self.x = aligned_empty((tokens, entry.k), np.float32)
        self.q = call.q  # the quantize kernel writes the real tokens; padding rows stay zero
        self.scale = aligned_empty((tokens,), np.float32)
        self.out = aligned_empty((tokens, entry.n), np.float32)
        self.matmul = call.run


def pack_weights(entry: LinearEntry, weights: np.ndarray) -> np.ndarray:
    """Ternary weights [n, k] in the layout of a manifest linear entry, 64-byte aligned: what
    the conversion cache stores, so a model's second start packs nothing."""
    w = layout.check_ternary(weights)
    if (entry.n, entry.k) != w.shape:
        raise UserError(f"weights of shape {list(w.shape)} do not fit the artifact's {entry.n}x{entry.k} linear")
    params = entry.layout_params
    if entry.layout == layout.VERSION:
        return aligned_copy(layout.pack_ternary(w, params["rows"], params["kblock"]))
    if entry.layout == layout_dot2.VERSION:
        return aligned_copy(layout_dot2.pack_ternary(w, entry.n_padded, entry.k_padded))
    raise UserError(f"artifact uses weight layout {entry.layout!r}; this runtime knows {', '.join(MATMULS)}")


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
    def from_packed(cls, artifact: Artifact, n: int, k: int, packed: np.ndarray, weight_scale, buffers: dict | None = None) -> BitLinear:
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

    def _bind(self, artifact: Artifact, entry: LinearEntry, weight_scale) -> None:
        if entry.layout not in MATMULS:
            raise UserError(f"artifact uses weight layout {entry.layout!r}; this runtime knows {', '.join(MATMULS)}")
        spec, where = LAYOUTS[entry.layout], f"manifest is corrupted: the {entry.n}x{entry.k} linear"
        bad = [p for p in spec.PARAMS if not (isinstance(entry.layout_params.get(p), int) and entry.layout_params[p] > 0)]
        if bad:
            raise UserError(f"{where}'s layout_params need a positive {', '.join(bad)}")
        missing = [role for role in (*ROLES, *spec.ROLES) if role not in entry.kernels]
        if missing:
            raise UserError(f"{where} names no {', '.join(missing)} kernel")
        scale = np.broadcast_to(np.asarray(weight_scale, np.float32), (entry.n,))
        if not np.all(np.isfinite(scale)):
            raise UserError(f"weight_scale of the {entry.n}x{entry.k} layer must be finite")
        self._entry = entry
        self.shape = entry.shape
        self._kernels = {role: artifact.kernel(name).function for role, name in entry.kernels.items()}
        self.quantize, self.dequantize = self._kernels["quantize"], self._kernels["dequantize"]
        self.rmsnorm_quantize = self._kernels["rmsnorm_quantize"]
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

    def _buffer(self, tokens: int) -> _Buffers:
        buf = self._buffers.get(tokens)
        if buf is None:
            buf = self._buffers[tokens] = _Buffers(tokens, self._entry, self._kernels)
        return buf

    def forward(self, x: np.ndarray) -> np.ndarray:
        """y for x [tokens, in], in this layer's own buffer: valid until its next call with
        the same token count (the model's hot path, which copies nothing)."""
        buf = self._quantized(x)
        return self._dequantized(buf, buf.matmul(self.packed))

    def forward_normed(self, x: np.ndarray, norm: np.ndarray, eps: np.ndarray) -> np.ndarray:
        """y for RMSNorm(x) with weight ``norm`` and ``eps`` (float32 [1]), both 64-byte aligned:
        the norm and the quantization are one kernel (rmsnorm_quantize), the normalized
        activations never exist. Same buffer rules as ``forward``."""
        buf = self._quantized(x, norm, eps)
        return self._dequantized(buf, buf.matmul(self.packed))

    def forward_residual(
        self, x: np.ndarray, residual: np.ndarray, kernel, norm: np.ndarray | None = None, eps: np.ndarray | None = None
    ) -> np.ndarray:
        """residual + y (of RMSNorm(x) where ``norm`` is given), the addition fused into the
        dequantization by ``kernel`` (residual_dequantize): the compiled decode step's own
        arithmetic, so the batched decode (batch_step.py) matches it bit for bit."""
        buf = self._quantized(x, norm, eps)
        kernel(buf.matmul(self.packed), buf.scale, self.weight_scale, residual, buf.out)
        return buf.out

    def _quantized(self, x: np.ndarray, norm: np.ndarray | None = None, eps: np.ndarray | None = None) -> _Buffers:
        """The buffers of x's token count, holding x quantized (RMS-normalized first with ``norm``)."""
        x = self._check_input(x)
        buf = self._buffer(x.shape[0])
        if norm is None:
            buf.x[...] = x
            self.quantize(buf.x, buf.q, buf.scale)
            return buf
        if not is_aligned(x):  # the kernel reads with aligned vector loads
            buf.x[...] = x
            x = buf.x
        self.rmsnorm_quantize(x, norm, eps, buf.q, buf.scale)
        return buf

    def _dequantized(self, buf: _Buffers, acc: np.ndarray) -> np.ndarray:
        self.dequantize(acc, buf.scale, self.weight_scale, buf.out)
        return buf.out

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x).copy()
