"""The output layer (logits = h @ E^T for the last token) on the artifact's kernels.

Two formats, chosen at load time, both computed by compiled GEMV kernels:
- "f16": the checkpoint's matrix in float16 (bfloat16 checkpoints convert exactly except for
  values below float16's normal range, ~6e-5), float32 accumulation. The peers' format.
- "i8": one int8 per weight with a float32 scale per row (max|row| / 127) and the hidden
  state quantized per token like a BitLinear input: a quarter of float32's bytes, half of
  float16's, so decoding reads less. Its top-1 agreement with "f16" is what
  ``bitnet-compile bench`` reports.
"""

from __future__ import annotations

import numpy as np

from . import layout_f16, layout_i8
from .artifact import Artifact
from .errors import UserError
from .memory import aligned_empty, aligned_zeros
from .weights import ModelWeights

OUTPUT_FORMATS = ("f16", "i8")


class F16Output:
    """logits = tiles @ h in float32, one f16_gemv call."""

    def __init__(self, artifact: Artifact, entry: dict, tiles: np.ndarray):
        self.n = entry["n"]
        self.kernel = artifact.kernel(entry["formats"]["f16"]["kernels"]["gemv"]).function
        self.tiles = tiles
        self.x = aligned_empty((1, entry["k"]), np.float32)
        self.out = aligned_empty((layout_f16.padded_rows(self.n),), np.float32)
        self.out_tiles = layout_f16.out_view(self.out)

    @property
    def nbytes(self) -> int:
        """Weight bytes one call reads."""
        return self.tiles.nbytes

    def __call__(self, h: np.ndarray) -> np.ndarray:
        self.x[0] = h
        self.kernel(self.x, self.tiles, self.out_tiles)
        return self.out[: self.n].copy()


class I8Output:
    """logits = (int8 rows @ quantize(h)) * row scale / activation scale: three kernel calls."""

    def __init__(self, artifact: Artifact, entry: dict, weights: ModelWeights):
        fmt = entry["formats"]["i8"]
        kernels = fmt["kernels"]
        self.n, self.k_p = entry["n"], fmt["k_padded"]
        self.quantize = artifact.kernel(kernels["quantize"]).function
        self.gemv = artifact.kernel(kernels["gemv"]).function
        self.dequantize = artifact.kernel(kernels["dequantize"]).function
        self.rows, scale, (correction,) = layout_i8.kernel_arrays(weights.output_i8(), fmt)
        self.scale = scale[: self.n]
        self.x = aligned_empty((1, entry["k"]), np.float32)
        self.q = aligned_zeros((1, self.k_p), np.int8)
        self.act_scale = aligned_empty((1,), np.float32)
        self.acc = aligned_empty((1, fmt["n_padded"]), np.int32)
        self.q_view, self.correction, self.acc_view = layout_i8.kernel_views(self.q, correction, self.acc)
        self.out = aligned_empty((1, self.n), np.float32)

    @property
    def nbytes(self) -> int:
        """Weight bytes one call reads: the rows, their scales and correction terms."""
        return self.rows.nbytes + self.scale.nbytes + self.correction.nbytes

    def __call__(self, h: np.ndarray) -> np.ndarray:
        self.x[0] = h
        self.quantize(self.x, self.q, self.act_scale)
        self.gemv(self.q_view, self.rows, self.correction, self.acc_view)
        self.dequantize(self.acc, self.act_scale, self.scale, self.out)
        return self.out[0].copy()


def make_output_layer(artifact: Artifact, weights: ModelWeights, fmt: str):
    """The model's output layer in format ``fmt`` (the tied embedding or a separate lm_head)."""
    c = weights.config
    entry = artifact.output_layer(c.vocab, c.hidden)
    if fmt not in OUTPUT_FORMATS or fmt not in entry["formats"]:
        raise UserError(f"output layer format {fmt!r} is not in this artifact (it has {', '.join(entry['formats'])})")
    if fmt == "f16":
        return F16Output(artifact, entry, weights.array("output"))
    return I8Output(artifact, entry, weights)
