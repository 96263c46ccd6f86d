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

import contextlib
import math
from collections.abc import Iterator

import numpy as np
from threadpoolctl import threadpool_limits

from .artifact import Artifact
from .decode_step import DecodeStep, scores_buffer
from .errors import UserError
from .linear import BitLinear
from .memory import aligned_copy, lazy_zeros, release_pages
from .model_config import ModelConfig
from .output_layer import make_output_layer
from .reference import ACTIVATIONS, attend, rms_norm, rotate
from .weights import ModelWeights


@contextlib.contextmanager
def _library_matches_manifest() -> Iterator[None]:
    """TVM's own argument checks ("... on argument #0 when calling: ...") as a one-line error:
    they fire when a manifest (edited, digest and all) disagrees with the library it names."""
    try:
        yield
    except (ValueError, TypeError) as err:
        if "when calling" not in str(err):
            raise
        first = str(err).splitlines()[0]
        raise UserError(
            f"a kernel refused its arguments ({first}): the artifact's library does not match its manifest; check it with bitnet-runtime verify"
        ) from None


def finite(weights: ModelWeights, name: str) -> np.ndarray:
    """A norm's weights, checked once at load: the kernels quantize a NaN to a finite int8, so a
    NaN norm would otherwise turn into wrong text, not an error."""
    array = weights.array(name)
    if not np.isfinite(array).all():
        raise UserError(f"the checkpoint's {name} weights hold NaN or Inf: the model is broken")
    return array


class KVCache:
    """Keys and values of one layer of one sequence, head-major [kv_heads, context, head_dim]
    as the compiled kernels read them: views of the sequence's slot in its pool's arrays."""

    def __init__(self, k: np.ndarray, v: np.ndarray):
        self.k, self.v = k, v

    def store(self, k: np.ndarray, v: np.ndarray, pos: int) -> None:
        self.k[:, pos : pos + k.shape[0]] = k.transpose(1, 0, 2)
        self.v[:, pos : pos + v.shape[0]] = v.transpose(1, 0, 2)

    def attend(self, q: np.ndarray, pos: int) -> np.ndarray:
        """Causal attention of queries q [T, heads, d] at positions pos.. over the cache: [T, heads*d]."""
        return attend(q, self.k, self.v, pos)

    def release(self) -> None:
        """Give the filled pages back to the OS (a finished sequence's slot in the server)."""
        release_pages(self.k)
        release_pages(self.v)


class KVPool:
    """The KV caches of up to ``slots`` sequences: per layer one key and one value array
    [slots, kv_heads, context, head_dim], allocated once for the whole context (pages are
    mapped only as positions fill, so a long context costs memory only when it is used).
    One array for all sequences is what lets the decode kernels take any set of them in one
    call, each row naming its slot."""

    def __init__(self, config: ModelConfig, context: int, slots: int):
        shape = (slots, config.kv_heads, context, config.head_dim)
        self.k = [lazy_zeros(shape, np.float32) for _ in range(config.layers)]
        self.v = [lazy_zeros(shape, np.float32) for _ in range(config.layers)]
        self.sequences = [Sequence(self, slot) for slot in range(slots)]


class Sequence:
    """One sequence's state: its slot in a ``KVPool`` (a KV cache per layer) and its position.
    ``run`` and ``chat`` use the model's own; the server decodes many at once, each in its
    own slot of one pool (``Model.sequences``)."""

    def __init__(self, pool: KVPool, slot: int):
        self.pool, self.slot = pool, slot
        self.caches = [KVCache(k[slot], v[slot]) for k, v in zip(pool.k, pool.v)]
        self.pos = 0
        self.step: DecodeStep | None = None  # the compiled decode step bound to this slot, on first use

    def release(self) -> None:
        self.pos = 0
        for cache in self.caches:
            cache.release()


class Layer:
    """One decoder layer: its ternary linears and norms (its KV cache is the sequence's)."""

    def __init__(self, artifact: Artifact, weights: ModelWeights, config: ModelConfig, index: int, buffers: dict):
        self.c = config
        prefix = f"layers.{index}."
        self.linears = {}
        for g in config.linear_groups():
            shared = buffers.setdefault(g.name, {})  # every layer's outputs are consumed before the next layer runs
            layer = BitLinear.from_packed(
                artifact, g.n, g.k, weights.array(prefix + g.name), weights.array(prefix + g.name + ".scale"), shared
            )
            norm = finite(weights, prefix + g.name + ".norm") if config.quant.use_rms_norm else None
            self.linears[g.name] = (layer, norm)
        self.input_norm, self.post_norm = (finite(weights, prefix + name) for name in ("input_norm", "post_norm"))
        self.sub_norms = tuple(finite(weights, prefix + name) for name in ("attn_sub_norm", "ffn_sub_norm")) if config.sub_norms else None
        self.act = ACTIVATIONS[config.act]
        self.eps, self.quant_eps = (
            aligned_copy(np.array([config.rms_eps], np.float32)),
            aligned_copy(np.array([config.quant.rms_norm_eps], np.float32)),
        )

    def _linear(self, name: str, x: np.ndarray, norm: np.ndarray | None = None, eps: np.ndarray | None = None) -> np.ndarray:
        """The BitLinear ``name`` of x, or of RMSNorm(x) with weight ``norm``: the norm is then
        part of the BitLinear's input quantization (one rmsnorm_quantize kernel)."""
        layer, own_norm = self.linears[name]
        if own_norm is not None:  # use_rms_norm: the BitLinear normalizes its own input, after the layer's norm
            if norm is not None:
                x = rms_norm(x, norm, float(eps[0]))
            norm, eps = own_norm, self.quant_eps
        return layer.forward(x) if norm is None else layer.forward_normed(x, norm, eps)

    def _qkv(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(q|k side by side [T, heads + kv_heads, d], so one rotary call serves both; v [T, kv_dim])
        of the input-normed x."""
        c, norm = self.c, (self.input_norm, self.eps)
        if "qkv" in self.linears:
            y = self._linear("qkv", x, *norm)
            return y[:, : c.q_dim + c.kv_dim].reshape(x.shape[0], -1, c.head_dim), y[:, c.q_dim + c.kv_dim :]
        qk = np.concatenate((self._linear("q", x, *norm), self._linear("k", x, *norm)), axis=1)
        return qk.reshape(x.shape[0], -1, c.head_dim), self._linear("v", x, *norm)

    def _gate_up(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(gate, up) of the post-attention-normed x."""
        norm = (self.post_norm, self.eps)
        if "gate_up" in self.linears:
            y = self._linear("gate_up", x, *norm)
            return y[:, : self.c.ffn], y[:, self.c.ffn :]
        return self._linear("gate", x, *norm), self._linear("up", x, *norm)

    def _sub_norm(self, i: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        return (self.sub_norms[i], self.eps) if self.sub_norms else (None, None)

    def step_arrays(self, k_cache: np.ndarray, v_cache: np.ndarray) -> dict[str, np.ndarray]:
        """This layer's arrays by ``decode_step.layer_params`` name: what the compiled decode
        step reads (the caches: the layer's arrays of a ``KVPool``)."""
        arrays = {"input_norm": self.input_norm, "post_norm": self.post_norm, "k_cache": k_cache, "v_cache": v_cache}
        for name in ("qkv", "o", "gate_up", "down"):
            linear = self.linears[name][0]
            arrays[name], arrays[f"{name}_scale"] = linear.packed, linear.weight_scale
        if self.sub_norms:
            arrays["attn_sub_norm"], arrays["ffn_sub_norm"] = self.sub_norms
        return arrays

    def __call__(self, x: np.ndarray, segments: list[tuple[KVCache, int, int]], cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """x: the rows of one or more sequences, ``segments`` (cache, position, rows) in order:
        the linears run once over all rows, attention per sequence over its own cache."""
        c = self.c
        qk, v = self._qkv(x)
        qk = rotate(qk, cos, sin)
        v = v.reshape(x.shape[0], c.kv_heads, c.head_dim)
        parts, row = [], 0
        for cache, pos, rows in segments:
            cache.store(qk[row : row + rows, c.heads :], v[row : row + rows], pos)
            parts.append(cache.attend(qk[row : row + rows, : c.heads], pos))
            row += rows
        a = parts[0] if len(parts) == 1 else np.concatenate(parts)
        x = x + self._linear("o", a, *self._sub_norm(0))
        gate, up = self._gate_up(x)
        return x + self._linear("down", self.act(gate) * up, *self._sub_norm(1))


class Model:
    """A loaded model: ``prefill(ids)`` then ``decode(id)`` repeatedly, each returning the
    float32 logits of the last token; ``reset()`` starts a new sequence. Each takes an optional
    ``Sequence`` (default: the model's own), so one model serves many sequences."""

    def __init__(self, artifact: Artifact, weights: ModelWeights, output: str = "f16", context: int | None = None):
        # numpy's BLAS (attention) would start a thread per core beside the kernels' pool on the
        # same cores: measured, a 128-token prompt ran at 30 tok/s with it and 50 without.
        threadpool_limits(1, user_api="blas")
        c = self.config = weights.config
        self.artifact, self.weights = artifact, weights
        self.context_length = min(context or c.max_positions, c.max_positions)
        buffers: dict = {}
        self.layers = [Layer(artifact, weights, c, i, buffers) for i in range(c.layers)]
        self.norm = finite(weights, "norm")
        self.embed = weights.rows("embed")
        self.output = make_output_layer(artifact, weights, output)
        angles = np.arange(self.context_length, dtype=np.float32)[:, None] * c.inv_freq()[None, :]
        angles = np.concatenate((angles, angles), axis=1)
        self.cos, self.sin = aligned_copy(np.cos(angles)), aligned_copy(np.sin(angles))
        self.compiled_step = artifact.manifest.program is not None  # False: decode kernel by kernel
        self.seq = self.sequence()
        if self.compiled_step:
            self._check_program()
            self.seq.step = self._decode_step(self.seq)

    @property
    def step(self) -> DecodeStep | None:
        """The compiled decode step of the model's own sequence (None: decoding kernel by kernel)."""
        return self.seq.step if self.compiled_step else None

    def sequence(self) -> Sequence:
        """A new, empty sequence (KV caches for the whole context, mapped as they fill)."""
        return self.sequences(1)[0]

    def sequences(self, count: int) -> list[Sequence]:
        """``count`` new, empty sequences in one ``KVPool``: what ``BatchDecode`` takes."""
        return KVPool(self.config, self.context_length, count).sequences

    @property
    def pos(self) -> int:
        return self.seq.pos

    def _check_program(self) -> None:
        c, d = self.config, self.artifact.manifest.program.decoder
        have = (d.layers, d.hidden, d.heads, d.kv_heads, d.head_dim, d.ffn, d.act, d.sub_norms)
        if have != (c.layers, c.hidden, c.heads, c.kv_heads, c.head_dim, c.ffn, c.act, c.sub_norms is not None):
            raise UserError("the artifact's decode step was compiled for another model: compile the artifact for this model")

    def _decode_step(self, seq: Sequence) -> DecodeStep:
        """The artifact's compiled decode step, bound to this model's arrays and the sequence's
        caches (decode_step.py)."""
        c, program = self.config, self.artifact.manifest.program
        d = program.decoder
        layers = [layer.step_arrays(k, v) for layer, k, v in zip(self.layers, seq.pool.k, seq.pool.v)]
        scores = scores_buffer(1, c.kv_heads, c.heads // c.kv_heads, self.context_length)
        head = (self.norm, *self.output.step_arrays)
        return DecodeStep(self.artifact.module, self.output.step_format, c.hidden, seq.slot, self.cos, self.sin, scores,
                          self.layers[0].eps, layers, head, d.sub_norms, program.kernel_calls[self.output.step_format])  # fmt: skip

    def reset(self, seq: Sequence | None = None) -> None:
        (seq or self.seq).pos = 0

    def prefill(self, ids: list[int], seq: Sequence | None = None) -> np.ndarray:
        self.reset(seq)
        return self.forward(ids, seq)

    def decode(self, token: int, seq: Sequence | None = None) -> np.ndarray:
        """The logits after ``token``: one call of the compiled decode step where the artifact
        has one, else the layers kernel by kernel."""
        seq = seq or self.seq
        if not self.compiled_step:
            return self.forward([token], seq)
        self._check([token], seq)
        if seq.step is None:
            seq.step = self._decode_step(seq)
        with _library_matches_manifest():
            out = seq.step(self.embed[[token]][0], seq.pos)
        seq.pos += 1
        return self._finite(self.output.from_step(out), seq)

    def forward(self, ids: list[int], seq: Sequence | None = None) -> np.ndarray:
        """Append tokens at the sequence's position; the logits after the last one."""
        return self.forward_many([(seq or self.seq, ids)])[0]

    def forward_many(self, batch: list[tuple[Sequence, list[int]]]) -> np.ndarray:
        """``forward`` of several sequences in one pass (the server's prompt chunks): the
        logits [len(batch), vocab] after each one's tokens, each row what ``forward`` gives."""
        with _library_matches_manifest():
            logits = self.output.batch(self.hidden_many(batch))
        for row, (seq, _) in zip(logits, batch):
            self._finite(row, seq)
        return logits

    def _finite(self, logits: np.ndarray, seq: Sequence) -> np.ndarray:
        """The logits, once they are finite: a NaN or Inf anywhere in a step reaches them (the
        residual stream carries it), and fluent text from broken numbers is worse than an error.
        One sum over the vocabulary: a NaN or Inf makes it non-finite."""
        if not math.isfinite(float(np.add.reduce(logits, dtype=np.float64))):
            raise UserError(
                f"the model computed NaN or Inf logits at position {seq.pos}: its weights or config are broken "
                "(NaN or huge values in the checkpoint, or a bad rope_theta / rms_norm_eps)"
            )
        return logits

    def _check(self, ids: list[int], seq: Sequence) -> None:
        if not ids:
            raise UserError("no tokens to process")
        if seq.pos + len(ids) > self.context_length:
            raise UserError(f"{seq.pos + len(ids)} tokens exceed the context of {self.context_length}")
        if min(ids) < 0 or max(ids) >= self.config.vocab:
            raise UserError(f"token ids must be in [0, {self.config.vocab}), got {min(ids)}..{max(ids)}")

    def hidden(self, ids: list[int], seq: Sequence | None = None) -> np.ndarray:
        """Append tokens at the sequence's position; the final-normed hidden state of the last one."""
        return self.hidden_many([(seq or self.seq, ids)])[0]

    def hidden_many(self, batch: list[tuple[Sequence, list[int]]]) -> np.ndarray:
        """``hidden`` of several sequences in one pass: [len(batch), hidden]."""
        for seq, ids in batch:
            self._check(ids, seq)
        x = self.embed[[i for _, ids in batch for i in ids]]
        cos = np.concatenate([self.cos[seq.pos : seq.pos + len(ids)] for seq, ids in batch])
        sin = np.concatenate([self.sin[seq.pos : seq.pos + len(ids)] for seq, ids in batch])
        ends = np.cumsum([len(ids) for _, ids in batch]) - 1
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite values are caught at the logits (_finite)
            for i, layer in enumerate(self.layers):
                x = layer(x, [(seq.caches[i], seq.pos, len(ids)) for seq, ids in batch], cos, sin)
            for seq, ids in batch:
                seq.pos += len(ids)
            return rms_norm(x[ends], self.norm, self.config.rms_eps)
