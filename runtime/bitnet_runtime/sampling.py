"""Choosing the next token from a model's logits: greedy, or temperature / top-k / top-p sampling.

The filters run in the order transformers' ``generate`` applies its logits warpers
(temperature, then top-k, then top-p), so the same settings draw from the same distribution
here as there. Temperature must precede top-p: it reshapes the probabilities top-p sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bitnet_runtime.errors import UserError

# Top-p first looks for its nucleus among this many most likely tokens, which nearly always
# hold it: sorting them is far cheaper than sorting a 128k vocabulary every step.
NUCLEUS_SEARCH = 1024


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature=0`` is greedy decoding (top_k and top_p are then moot);
    ``top_k=0`` and ``top_p=1.0`` switch those filters off; ``seed=None`` draws a fresh seed."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"temperature must be a number >= 0 (0 means greedy), not {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise UserError(f"top_k must be an integer >= 0 (0 switches it off), not {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1] (1 switches it off), not {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise UserError(f"seed must be an integer >= 0 or None, not {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """Temperature 0, or one too small for float32 to divide by (below its smallest normal)."""
        return self.temperature < float(np.finfo(np.float32).tiny)


class Sampler:
    """Draws tokens for one generation; its random stream is fixed by ``params.seed``."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def sample(self, logits: np.ndarray) -> int:
        """The next token id for float logits of shape [vocab]."""
        logits = np.asarray(logits)
        if logits.ndim != 1 or logits.size == 0:
            raise ValueError(f"expected logits of shape [vocab], got {logits.shape}")
        if self.params.greedy:
            return int(np.argmax(logits))
        ids, probs = self.distribution(logits)
        return int(ids[self._draw(probs)])

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The token ids sampling may pick and their probabilities (summing to 1), after
        temperature, top-k and top-p; for inspection, e.g. against transformers' warpers."""
        if self.params.greedy:
            return np.array([int(np.argmax(logits))]), np.ones(1)
        # float32 keeps exp vectorized over a 128k vocabulary. The maximum is subtracted before
        # the division: a tiny temperature then sends the others to -inf (probability 0), where
        # dividing first overflowed to inf - inf = NaN.
        scores = np.asarray(logits, dtype=np.float32)
        scores = (scores - scores.max()) / np.float32(self.params.temperature)
        ids = _top_k(scores, self.params.top_k)
        probs = _softmax(scores if ids is None else scores[ids])
        if self.params.top_p < 1:
            ids, probs = _top_p(ids, probs, self.params.top_p)
        return (np.arange(probs.size) if ids is None else ids), probs

    def _draw(self, probs: np.ndarray) -> int:
        """Inverse-CDF draw; clipped because rounding can leave the last cumulative sum below u."""
        cumulative = np.cumsum(probs)
        index = np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right")
        return min(int(index), probs.size - 1)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _softmax(scores: np.ndarray) -> np.ndarray:
    """Shifted by the maximum so that exp never overflows, whatever the temperature."""
    weights = np.exp(scores - scores.max())
    return weights / weights.sum(dtype=np.float64)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray | None:
    """Ids of the k highest scores (None: all of them); ties with the k-th are kept, as
    transformers keeps them."""
    if k == 0 or k >= scores.size:
        return None
    kth = np.partition(scores, scores.size - k)[scores.size - k]
    return np.flatnonzero(scores >= kth)


def _top_p(ids: np.ndarray | None, probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The nucleus: the fewest most likely tokens whose probability reaches top_p (at least one),
    renormalized. ``ids`` maps positions in probs to token ids (None: they are the same)."""
    order = _descending(probs, top_p)
    cumulative = np.cumsum(probs[order])
    nucleus = order[: min(int(np.searchsorted(cumulative, top_p, side="left")) + 1, order.size)]
    kept = probs[nucleus]
    return (nucleus if ids is None else ids[nucleus]), kept / kept.sum()


def _descending(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of probs from most to least likely, as far as the nucleus needs."""
    if probs.size > NUCLEUS_SEARCH:
        head = np.argpartition(probs, probs.size - NUCLEUS_SEARCH)[probs.size - NUCLEUS_SEARCH :]
        if probs[head].sum() >= top_p:
            return head[np.argsort(-probs[head], kind="stable")]
    return np.argsort(-probs, kind="stable")
