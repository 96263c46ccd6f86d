"""The output layer (logits = h @ E^T for the last token).

Three formats, chosen at load time; the first two are computed by compiled GEMV kernels:
- "f16": the checkpoint's matrix in float16 (bfloat16 checkpoints convert exactly except for
  values below float16's normal range, ~6e-5), float32 accumulation. The peers' format.
- "i8": one int8 per weight with a float32 scale per row (max|row| / 127) and the hidden
  state quantized per token like a BitLinear input: a quarter of float32's bytes, half of
  float16's, so decoding reads less. Its top-1 agreement with "f16" is what
  ``bitnet-compile bench`` reports.
- "f32": the checkpoint's values exactly, float32 rows, multiplied by numpy: the reference's
  own arithmetic, for checking a model against transformers (twice f16's bytes, not fast).
"""

from __future__ import annotations

import numpy as np

from . import layout_f16, layout_i8
from .artifact import Artifact
from .errors import UserError
from .layout import Kernels
from .manifest import OutputLayer
from .memory import aligned_empty
from .weights import ModelWeights

OUTPUT_FORMATS = ("f16", "i8", "f32")


def _kernels(artifact: Artifact, entry: OutputLayer, fmt: str) -> Kernels:
    return {role: artifact.kernel(name).function for role, name in entry.formats[fmt].kernels.items()}


class F16Output:
    """logits = tiles @ h in float32, one f16_gemv call."""

    def __init__(self, artifact: Artifact, entry: OutputLayer, tiles: np.ndarray):
        self.n = entry.n
        self.kernels, self.params = _kernels(artifact, entry, "f16"), entry.params("f16")
        self.call = layout_f16.bind(self.kernels, self.params)
        self.tiles = tiles
        self._batches: dict[int, layout_f16.F16BatchCall] = {}

    @property
    def nbytes(self) -> int:
        """Weight bytes one call reads."""
        return self.tiles.nbytes

    def __call__(self, h: np.ndarray) -> np.ndarray:
        self.call.x[0] = h
        return self.call.run(self.tiles)[0, : self.n].copy()

    def batch(self, rows: np.ndarray) -> np.ndarray:
        """Logits [tokens, n] of several hidden states: one f16_gemm call (each row bit for bit
        what ``__call__`` gives it) where the artifact has it, else (and for one row) the GEMV.
        Buffers per block-padded count: rows past ``tokens`` are stale, their outputs unread."""
        if len(rows) == 1 or "gemm" not in self.kernels:
            return _row_by_row(self, rows)
        padded = layout_f16.padded_tokens(len(rows))
        call = self._batches.get(padded)
        if call is None:
            call = self._batches[padded] = layout_f16.bind_batch(self.kernels, self.params, padded)
        call.x[: len(rows)] = rows
        return call.run(self.tiles)[: len(rows), : self.n].copy()

    # the compiled decode step runs this format's kernels itself (decode_step.py)
    step_format = "f16"

    @property
    def step_arrays(self) -> tuple[np.ndarray, ...]:
        return (self.tiles,)

    def from_step(self, out: np.ndarray) -> np.ndarray:
        return out[: self.n].copy()


class I8Output:
    """logits = (int8 rows @ quantize(h)) * row scale / activation scale: three kernel calls."""

    def __init__(self, artifact: Artifact, entry: OutputLayer, weights: ModelWeights):
        kernels, params = _kernels(artifact, entry, "i8"), entry.params("i8")
        self.n, self.kernels, self.params = entry.n, kernels, params
        self.quantize, self.dequantize = kernels["quantize"], kernels["dequantize"]
        self.call = layout_i8.bind(kernels, params)
        self._batches: dict[int, tuple[layout_i8.I8BatchCall, np.ndarray, np.ndarray, np.ndarray]] = {}
        self.rows, scale, (self.correction,) = layout_i8.kernel_arrays(weights.output_i8(), params)
        self.scale = scale[: self.n]
        self.x = aligned_empty((1, entry.k), np.float32)
        self.act_scale = aligned_empty((1,), np.float32)
        self.out = aligned_empty((1, self.n), np.float32)

    @property
    def nbytes(self) -> int:
        """Weight bytes one call reads: the rows, their scales and correction terms."""
        return self.rows.nbytes + self.scale.nbytes + self.correction.nbytes

    def __call__(self, h: np.ndarray) -> np.ndarray:
        self.x[0] = h
        self.quantize(self.x, self.call.q, self.act_scale)
        acc = self.call.run(self.rows, self.correction)
        self.dequantize(acc, self.act_scale, self.scale, self.out)
        return self.out[0].copy()

    step_format = "i8"

    @property
    def step_arrays(self) -> tuple[np.ndarray, ...]:
        return self.rows, self.scale, self.correction

    def from_step(self, out: np.ndarray) -> np.ndarray:
        return out.copy()

    def batch(self, rows: np.ndarray) -> np.ndarray:
        """Logits [tokens, n] of several hidden states: quantize, one i8_gemm call (each row's
        integer sums exactly the GEMV's), dequantize, where the artifact has the GEMM; else
        (and for one row) the GEMV row by row. Buffers per block-padded count."""
        if len(rows) == 1 or "gemm" not in self.kernels:
            return _row_by_row(self, rows)
        padded = layout_i8.padded_tokens(len(rows))
        if padded not in self._batches:
            self._batches[padded] = (
                layout_i8.bind_batch(self.kernels, self.params, padded),
                aligned_empty((padded, self.x.shape[1]), np.float32),
                aligned_empty((padded,), np.float32),
                aligned_empty((padded, self.n), np.float32),
            )
        call, x, act_scale, out = self._batches[padded]
        tokens = len(rows)
        x[:tokens] = rows
        self.quantize(x[:tokens], call.q[:tokens], act_scale[:tokens])
        acc = call.run(self.rows, self.correction)[:tokens]  # the call holds ``padded`` rows
        self.dequantize(acc, act_scale[:tokens], self.scale, out[:tokens])
        return out[:tokens].copy()


class F32Output:
    """logits = rows @ h in float32 by numpy: exact checkpoint values, for checking."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    def __call__(self, h: np.ndarray) -> np.ndarray:
        return self.rows @ np.asarray(h, np.float32).reshape(-1)

    step_format = "hidden"  # the step returns the final-normed hidden state; numpy multiplies
    step_arrays = ()

    def from_step(self, h: np.ndarray) -> np.ndarray:
        return self(h)

    def batch(self, rows: np.ndarray) -> np.ndarray:
        return _row_by_row(self, rows)


def _row_by_row(layer, rows: np.ndarray) -> np.ndarray:
    """Logits [tokens, n], one GEMV per row: the formats without a batched kernel."""
    return np.stack([layer(row) for row in rows])


def make_output_layer(artifact: Artifact, weights: ModelWeights, fmt: str):
    """The model's output layer in format ``fmt`` (the tied embedding or a separate lm_head)."""
    c = weights.config
    if fmt == "f32":
        return F32Output(weights.output_f32())
    entry = artifact.output_layer(c.vocab, c.hidden)
    if fmt not in OUTPUT_FORMATS or fmt not in entry.formats:
        raise UserError(f"output layer format {fmt!r} is not in this artifact (it has {', '.join(entry.formats)})")
    if fmt == "f16":
        return F16Output(artifact, entry, weights.array("output"))
    return I8Output(artifact, entry, weights)
