"""One decode step for several sequences at once: the server's continuous batching.

Each sequence adds one token. Every linear runs once for all of them (a GEMM with M = the
number of sequences, so the ternary weights are read once per step, not once per sequence);
rotary embedding and attention run per sequence, each over its own KV cache at its own
position. The kernels are the compiled decode step's own (``decode_step.py``), called from
Python: rmsnorm_quantize, the integer matmul (exact, GEMM or GEMV alike), dequantize and
residual_dequantize, rotary_append, decode_attention, gated_act, rmsnorm, and the output
layer (f16: one f16_gemm for all rows, whose rows equal f16_gemv's). Each works row by row,
so a sequence's logits here are bit for bit those of decoding it alone: batching never
changes a greedy result.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np

from .decode_step import scores_buffer
from .errors import UserError
from .memory import aligned_empty, aligned_zeros
from .model import Model, Sequence, _library_matches_manifest


class BatchDecode:
    """``__call__(seqs, tokens)``: the logits [len(seqs), vocab] after each sequence's token."""

    def __init__(self, model: Model):
        program = model.artifact.manifest.program
        if not model.compiled_step:
            raise UserError("batched decoding needs an artifact with a compiled decode step: rebuild it with this bitnet-compile")
        c = self.c = model.config
        self.model = model
        self.k = {role: model.artifact.kernel(name).function for role, name in program.kernels.items()}
        self.eps = model.layers[0].eps
        self.scores = scores_buffer(c.kv_heads, c.heads // c.kv_heads, model.context_length)
        width = model.layers[0].linears["qkv"][0].shape["n"]
        self.qkv_row, self.q = aligned_empty((1, width), np.float32), aligned_empty((c.heads, c.head_dim), np.float32)
        self.att_row, self.pos = aligned_empty((1, c.heads * c.head_dim), np.float32), aligned_zeros((1,), np.int32)
        self._rows: dict[int, dict[str, np.ndarray]] = {}

    def _buffers(self, count: int) -> dict[str, np.ndarray]:
        """Per batch size: the hidden rows, the attention outputs, the activations, the final norm."""
        if count not in self._rows:
            c = self.c
            self._rows[count] = {
                "x": aligned_empty((count, c.hidden), np.float32),
                "att": aligned_empty((count, c.heads * c.head_dim), np.float32),
                "act": aligned_empty((count, c.ffn), np.float32),
                "normed": aligned_empty((count, c.hidden), np.float32),
            }
        return self._rows[count]

    def __call__(self, seqs: Seq[Sequence], tokens: Seq[int]) -> np.ndarray:
        m = self.model
        for seq, token in zip(seqs, tokens):
            m._check([token], seq)
        buf = self._buffers(len(seqs))
        buf["x"][...] = m.embed[list(tokens)]
        h = buf["x"]
        with _library_matches_manifest():
            for i, layer in enumerate(m.layers):
                h = self._layer(layer, i, seqs, h, buf)
            self.k["rmsnorm"](h, m.norm, self.eps, buf["normed"])
            logits = m.output.batch(buf["normed"])
        for seq in seqs:
            seq.pos += 1
        for row, seq in zip(logits, seqs):
            m._finite(row, seq)
        return logits

    def _layer(self, layer, index: int, seqs: Seq[Sequence], h: np.ndarray, buf: dict) -> np.ndarray:
        """One layer for every sequence, as ``program._layer`` emits it for one."""
        k, lin = self.k, layer.linears
        sub = layer.sub_norms or (None, None)
        qkv = lin["qkv"][0].forward_normed(h, layer.input_norm, self.eps)
        for row, seq in enumerate(seqs):
            cache = seq.caches[index]
            self.qkv_row[0] = qkv[row]
            self.pos[0] = seq.pos
            k["rotary_append"](self.qkv_row, self.model.cos, self.model.sin, self.pos, cache.k, cache.v, self.q)
            k["decode_attention"](self.q, cache.k, cache.v, self.pos, self.scores, self.att_row)
            buf["att"][row] = self.att_row[0]
        h = lin["o"][0].forward_residual(buf["att"], h, k["residual_o"], sub[0], self.eps)
        gate_up = lin["gate_up"][0].forward_normed(h, layer.post_norm, self.eps)
        k["gated_act"](gate_up, buf["act"])
        return lin["down"][0].forward_residual(buf["act"], h, k["residual_down"], sub[1], self.eps)
