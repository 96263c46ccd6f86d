"""One decode step for several sequences at once: the server's continuous batching.

Each sequence adds one token. Every linear runs once for all of them (a GEMM with M = the
number of sequences, so the ternary weights are read once per step, not once per sequence);
rotary embedding and attention are one call each per layer too, every row reading and
writing its own slot of the sequences' shared ``KVPool`` at its own position. The kernels
are the compiled decode step's own (``decode_step.py``), called from Python:
rmsnorm_quantize, the integer matmul (exact, GEMM or GEMV alike), dequantize and
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
from .memory import aligned_empty
from .model import Model, Sequence, _library_matches_manifest


class BatchDecode:
    """``__call__(seqs, tokens)``: the logits [len(seqs), vocab] after each sequence's token.
    The sequences must share one ``KVPool`` (``Model.sequences``)."""

    def __init__(self, model: Model):
        program = model.artifact.manifest.program
        if not model.compiled_step:
            raise UserError("batched decoding needs an artifact with a compiled decode step: rebuild it with this bitnet-compile")
        self.c = model.config
        self.model = model
        self.k = {role: model.artifact.kernel(name).function for role, name in program.kernels.items()}
        self.eps = model.layers[0].eps
        self._rows: dict[int, dict[str, np.ndarray]] = {}

    def _buffers(self, count: int) -> dict[str, np.ndarray]:
        """Per batch size: the rows' slots and positions, the hidden rows, the rotated queries,
        the attention scores and outputs, the activations, the final norm."""
        if count not in self._rows:
            c = self.c
            self._rows[count] = {
                "slots": aligned_empty((count,), np.int32),
                "pos": aligned_empty((count,), np.int32),
                "x": aligned_empty((count, c.hidden), np.float32),
                "q": aligned_empty((count, c.heads, c.head_dim), np.float32),
                "scores": scores_buffer(count, c.kv_heads, c.heads // c.kv_heads, self.model.context_length),
                "att": aligned_empty((count, c.heads * c.head_dim), np.float32),
                "act": aligned_empty((count, c.ffn), np.float32),
                "normed": aligned_empty((count, c.hidden), np.float32),
            }
        return self._rows[count]

    def __call__(self, seqs: Seq[Sequence], tokens: Seq[int]) -> np.ndarray:
        m, pool = self.model, seqs[0].pool
        if any(seq.pool is not pool for seq in seqs) or len({seq.slot for seq in seqs}) < len(seqs):
            raise ValueError("batched sequences must be distinct sequences of one KVPool (Model.sequences)")
        for seq, token in zip(seqs, tokens):
            m._check([token], seq)
        buf = self._buffers(len(seqs))
        buf["slots"][:] = [seq.slot for seq in seqs]
        buf["pos"][:] = [seq.pos for seq in seqs]
        buf["x"][...] = m.embed[list(tokens)]
        h = buf["x"]
        with _library_matches_manifest():
            for i, layer in enumerate(m.layers):
                h = self._layer(layer, pool.k[i], pool.v[i], h, buf)
            self.k["rmsnorm"](h, m.norm, self.eps, buf["normed"])
            logits = m.output.batch(buf["normed"])
        for seq in seqs:
            seq.pos += 1
        for row, seq in zip(logits, seqs):
            m._finite(row, seq)
        return logits

    def _layer(self, layer, k_cache: np.ndarray, v_cache: np.ndarray, h: np.ndarray, buf: dict) -> np.ndarray:
        """One layer for every sequence, as ``program._layer`` emits it for one."""
        k, lin, m = self.k, layer.linears, self.model
        sub = layer.sub_norms or (None, None)
        qkv = lin["qkv"][0].forward_normed(h, layer.input_norm, self.eps)
        k["rotary_append"](qkv, m.cos, m.sin, buf["slots"], buf["pos"], k_cache, v_cache, buf["q"])
        k["decode_attention"](buf["q"], k_cache, v_cache, buf["slots"], buf["pos"], buf["scores"], buf["att"])
        h = lin["o"][0].forward_residual(buf["att"], h, k["residual_o"], sub[0], self.eps)
        gate_up = lin["gate_up"][0].forward_normed(h, layer.post_norm, self.eps)
        k["gated_act"](gate_up, buf["act"])
        return lin["down"][0].forward_residual(buf["act"], h, k["residual_down"], sub[1], self.eps)
