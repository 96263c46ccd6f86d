"""The BitNet b1.58 forward pass, top to bottom, on the artifact's compiled kernels.

Per layer: RMSNorm -> fused q|k|v (ternary) -> rotary embedding (rotate-half pairing) ->
grouped-query attention over the KV cache -> [attn_sub_norm] -> o_proj (ternary) -> residual
-> RMSNorm -> fused gate|up (ternary) -> act(gate) * up -> [ffn_sub_norm] -> down_proj
(ternary) -> residual. Then the final norm and the output layer, for the last token only.

The ternary matmuls and the output layer are compiled kernels; everything else is a handful
of small numpy operations per layer, in float32 as transformers computes them. A prompt goes
through as one batch (the kernels' GEMM path), then each new token alone (GEMV).
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from .artifact import Artifact
from .errors import UserError
from .linear import BitLinear
from .model_config import ModelConfig
from .output_layer import make_output_layer
from .weights import ModelWeights

KV_CHUNK = 256  # KV cache capacity grows in steps of this many positions


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    variance = np.mean(np.square(x), axis=-1, keepdims=True)
    return weight * (x * (np.float32(1.0) / np.sqrt(variance + np.float32(eps))))


def relu2(x: np.ndarray) -> np.ndarray:
    return np.square(np.maximum(x, np.float32(0)))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


ACTIVATIONS = {"relu2": relu2, "silu": silu}


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary embedding with rotate-half pairing: x [T, heads, d], cos/sin [T, d]."""
    half = x.shape[-1] // 2
    rotated = np.concatenate((-x[..., half:], x[..., :half]), axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class KVCache:
    """Keys and values of one layer, [kv_heads, positions, head_dim], grown on demand (a long
    context costs memory only when it is used)."""

    def __init__(self, kv_heads: int, head_dim: int, limit: int):
        self.limit = limit
        self.k = np.zeros((kv_heads, 0, head_dim), np.float32)
        self.v = np.zeros_like(self.k)

    def store(self, k: np.ndarray, v: np.ndarray, pos: int) -> None:
        end = pos + k.shape[0]
        if end > self.k.shape[1]:
            size = min(self.limit, -(-end // KV_CHUNK) * KV_CHUNK)
            self.k, self.v = (
                np.concatenate((c, np.zeros((c.shape[0], size - c.shape[1], c.shape[2]), np.float32)), axis=1) for c in (self.k, self.v)
            )
        self.k[:, pos:end] = k.transpose(1, 0, 2)
        self.v[:, pos:end] = v.transpose(1, 0, 2)

    def attend(self, q: np.ndarray, pos: int) -> np.ndarray:
        """Causal attention of queries q [T, heads, d] at positions pos.. over the cache: [T, heads*d]."""
        t, heads, d = q.shape
        kv_heads, length = self.k.shape[0], pos + t
        group = heads // kv_heads
        qg = q.reshape(t, kv_heads, group, d).transpose(1, 2, 0, 3).reshape(kv_heads, group * t, d)
        scores = (qg @ self.k[:, :length].transpose(0, 2, 1)) * np.float32(d**-0.5)
        if t > 1:  # row g*t + i is query i of head g: it sees positions <= pos + i
            future = np.arange(length)[None, :] > (pos + np.arange(t))[:, None]
            scores[:, np.tile(future, (group, 1))] = -np.inf
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        out = scores @ self.v[:, :length]
        return out.reshape(kv_heads, group, t, d).transpose(2, 0, 1, 3).reshape(t, heads * d)


class Layer:
    """One decoder layer: its ternary linears, norms and KV cache."""

    def __init__(self, artifact: Artifact, weights: ModelWeights, config: ModelConfig, index: int, context: int, buffers: dict):
        self.c = config
        prefix = f"layers.{index}."
        self.linears = {}
        for g in config.linear_groups():
            shared = buffers.setdefault(g.name, {})  # every layer's outputs are consumed before the next layer runs
            layer = BitLinear.from_packed(
                artifact, g.n, g.k, weights.array(prefix + g.name), weights.array(prefix + g.name + ".scale"), shared
            )
            norm = weights.array(prefix + g.name + ".norm") if config.quant.use_rms_norm else None
            self.linears[g.name] = (layer, norm)
        self.input_norm, self.post_norm = weights.array(prefix + "input_norm"), weights.array(prefix + "post_norm")
        self.sub_norms = (weights.array(prefix + "attn_sub_norm"), weights.array(prefix + "ffn_sub_norm")) if config.sub_norms else None
        self.cache = KVCache(config.kv_heads, config.head_dim, context)
        self.act = ACTIVATIONS[config.act]

    def _linear(self, name: str, x: np.ndarray) -> np.ndarray:
        layer, norm = self.linears[name]
        if norm is not None:  # use_rms_norm: the BitLinear normalizes its own input
            x = rms_norm(x, norm, self.c.quant.rms_norm_eps)
        return layer.forward(x)

    def _qkv(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(q|k side by side [T, heads + kv_heads, d], so one rotary call serves both; v [T, kv_dim])."""
        c = self.c
        if "qkv" in self.linears:
            y = self._linear("qkv", h)
            return y[:, : c.q_dim + c.kv_dim].reshape(h.shape[0], -1, c.head_dim), y[:, c.q_dim + c.kv_dim :]
        qk = np.concatenate((self._linear("q", h), self._linear("k", h)), axis=1)
        return qk.reshape(h.shape[0], -1, c.head_dim), self._linear("v", h)

    def _gate_up(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if "gate_up" in self.linears:
            y = self._linear("gate_up", h)
            return y[:, : self.c.ffn], y[:, self.c.ffn :]
        return self._linear("gate", h), self._linear("up", h)

    def __call__(self, x: np.ndarray, pos: int, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        c, t = self.c, x.shape[0]
        h = rms_norm(x, self.input_norm, c.rms_eps)
        qk, v = self._qkv(h)
        qk = rotate(qk, cos, sin)
        self.cache.store(qk[:, c.heads :], v.reshape(t, c.kv_heads, c.head_dim), pos)
        a = self.cache.attend(qk[:, : c.heads], pos)
        if self.sub_norms:
            a = rms_norm(a, self.sub_norms[0], c.rms_eps)
        x = x + self._linear("o", a)
        h = rms_norm(x, self.post_norm, c.rms_eps)
        gate, up = self._gate_up(h)
        m = self.act(gate) * up
        if self.sub_norms:
            m = rms_norm(m, self.sub_norms[1], c.rms_eps)
        return x + self._linear("down", m)


class Model:
    """A loaded model: ``prefill(ids)`` then ``decode(id)`` repeatedly, each returning the
    float32 logits of the last token; ``reset()`` starts a new sequence."""

    def __init__(self, artifact: Artifact, weights: ModelWeights, output: str = "f16", context: int | None = None):
        # numpy's BLAS (attention) would start a thread per core beside the kernels' pool on the
        # same cores: measured, a 128-token prompt ran at 30 tok/s with it and 50 without.
        threadpool_limits(1, user_api="blas")
        c = self.config = weights.config
        self.artifact, self.weights = artifact, weights
        self.context_length = min(context or c.max_positions, c.max_positions)
        buffers: dict = {}
        self.layers = [Layer(artifact, weights, c, i, self.context_length, buffers) for i in range(c.layers)]
        self.norm = weights.array("norm")
        self.embed = weights.rows("embed")
        self.output = make_output_layer(artifact, weights, output)
        angles = np.arange(self.context_length, dtype=np.float32)[:, None] * c.inv_freq()[None, :]
        angles = np.concatenate((angles, angles), axis=1)
        self.cos, self.sin = np.cos(angles), np.sin(angles)
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.reset()
        return self.forward(ids)

    def decode(self, token: int) -> np.ndarray:
        return self.forward([token])

    def forward(self, ids: list[int]) -> np.ndarray:
        """Append tokens at the current position; the logits after the last one."""
        return self.output(self.hidden(ids))

    def hidden(self, ids: list[int]) -> np.ndarray:
        """Append tokens at the current position; the final-normed hidden state of the last one."""
        if not ids:
            raise UserError("no tokens to process")
        if self.pos + len(ids) > self.context_length:
            raise UserError(f"{self.pos + len(ids)} tokens exceed the context of {self.context_length}")
        if min(ids) < 0 or max(ids) >= self.config.vocab:
            raise UserError(f"token ids must be in [0, {self.config.vocab}), got {min(ids)}..{max(ids)}")
        x = self.embed[ids]
        cos, sin = self.cos[self.pos : self.pos + len(ids)], self.sin[self.pos : self.pos + len(ids)]
        for layer in self.layers:
            x = layer(x, self.pos, cos, sin)
        self.pos += len(ids)
        return rms_norm(x[-1], self.norm, self.config.rms_eps)
