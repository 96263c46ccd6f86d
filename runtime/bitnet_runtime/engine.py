"""Continuous batching: many generations on one model, decoded together.

One engine thread owns the model. Each turn of its loop it
1. drops cancelled requests (a client that went away) and frees their sequences;
2. admits waiting requests while a sequence slot is free (``max_seqs``);
3. prefills the next chunks of the oldest prompts still being read, ``chunk`` tokens at most
   in one pass (their linears one GEMM), so a long prompt never stalls the running streams
   for longer than one chunk, and many short ones are read together;
4. decodes one token of every sequence that has one pending: alone with the compiled decode
   step (exactly what ``run`` does), several at once with ``BatchDecode`` (every linear a
   GEMM over all of them, bit for bit the same results);
5. samples each sequence's next token with its own sampler and hands the text to the request.

Requests join and leave at these step boundaries. A request's ``emit`` is called on the
engine thread with each ``Delta`` and then one ``Done``; the server passes them to its
event loop. Nothing here knows about HTTP.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .batch_step import BatchDecode
from .errors import UserError
from .generate import TextStream
from .model import Model
from .model import Sequence as KVSequence
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class Delta:
    """One sampled token: the text it released (may be empty: held back for UTF-8 or a
    possible stop string), its id, and with logprobs its log-probability and the top ones."""

    text: str
    token: int | None  # None: the text held back until the end (UTF-8 or stop-string prefix), released
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Done:
    """The end of a request: finish_reason "stop", "length", "cancelled" or "error" (with message)."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    message: str = ""


@dataclass(eq=False)
class Request:
    """A generation as the engine runs it. ``logprobs``: None, or how many top alternatives
    to report per token (0: only the chosen token's)."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    emit: Callable[[Delta | Done], None]
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    ignore_eos: bool = False  # generate through end-of-sequence tokens (benchmarks, tests)
    cancelled: bool = False  # set from any thread; the engine drops the request at its next step
    arrived: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class _Running:
    request: Request
    seq: KVSequence
    sampler: Sampler
    text: TextStream
    budget: int
    prefilled: int = 0  # prompt tokens read so far
    pending: int | None = None  # the last sampled token, to decode next
    generated: int = 0


@dataclass
class EngineStats:
    """What /metrics reports: live gauges and totals the engine keeps."""

    waiting: int = 0
    running: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)
    tokens_per_second: float = 0.0  # generated tokens per second over the last decode step


class Engine:
    """The model's only user once started: ``submit`` from any thread, ``stop`` to end."""

    def __init__(self, model: Model, tokenizer: Tokenizer, max_seqs: int = 16, max_queue: int = 64, chunk: int = 64):
        if max_seqs < 1 or max_queue < 0 or chunk < 1:
            raise UserError("max_seqs and chunk must be at least 1 and max_queue at least 0")
        self.model, self.tokenizer = model, tokenizer
        self.max_seqs, self.max_queue, self.chunk = max_seqs, max_queue, chunk
        self.batch = BatchDecode(model) if model.compiled_step else None
        self.stats = EngineStats()
        self._free = model.sequences(max_seqs)[::-1]  # slot 0 first
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[_Running] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="bitnet-engine", daemon=True)
        self.error: str | None = None  # set when the loop died: the server then answers 503

    @property
    def context_length(self) -> int:
        return self.model.context_length

    def kv_bytes_per_token(self) -> int:
        c = self.model.config
        return c.layers * 2 * c.kv_heads * c.head_dim * 4

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, request: Request) -> None:
        """Queue a request. UserError when it cannot be served (the server's 400); QueueFull
        when the queue is at ``max_queue`` (429)."""
        n = len(request.prompt_ids)
        if n == 0:
            raise UserError("the prompt is empty")
        if n >= self.context_length:
            raise UserError(f"the prompt has {n} tokens; this server's context holds {self.context_length} per request")
        vocab = self.model.config.vocab
        if min(request.prompt_ids) < 0 or max(request.prompt_ids) >= vocab:
            raise UserError(f"token ids must be in [0, {vocab})")
        with self._wake:
            if len(self._waiting) >= self.max_queue + len(self._free):  # free slots admit at the next step
                raise QueueFull(f"the queue is full ({self.max_queue} waiting, {self.max_seqs} running): try again later")
            self._waiting.append(request)
            self.stats.waiting = len(self._waiting)
            self._wake.notify()

    # ------------------------------------------------------------------ the loop (engine thread)

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self._waiting and not self._running:
                        self._wake.wait()
                    if self._stopping:
                        break
                    self._admit()
                self._drop_cancelled()
                self._prefill_step()
                self._decode_step()
        except Exception as err:  # the server must answer 503, not hang its clients
            self.error = f"{type(err).__name__}: {err}"
            raise
        finally:  # nobody waits forever: whatever is left ends with an error
            message = self.error or "the server is shutting down"
            for r in list(self._running):
                self._finish(r, "error", message)
            with self._wake:
                waiting, self._waiting = list(self._waiting), collections.deque()
            for request in waiting:
                request.emit(Done("error", len(request.prompt_ids), 0, message))

    def _admit(self) -> None:
        while self._waiting and self._free:
            request = self._waiting.popleft()
            if request.cancelled:
                continue
            budget = min(request.max_tokens, self.context_length - len(request.prompt_ids))
            self._running.append(
                _Running(request, self._free.pop(), Sampler(request.sampling), TextStream(self.tokenizer, request.stop, None), budget)
            )
        self.stats.waiting, self.stats.running = len(self._waiting), len(self._running)

    def _drop_cancelled(self) -> None:
        for r in [r for r in self._running if r.request.cancelled]:
            self._finish(r, "cancelled")

    def _prefill_step(self) -> None:
        """The next chunk of the oldest prompts not yet read, in one pass, ``chunk`` tokens at
        most (at least one sequence's chunk); each prompt's first token when it ends. Chunks
        start at multiples of ``chunk`` whatever else runs, so a prompt is read the same way
        alone or beside others."""
        batch, tokens = [], 0
        for r in self._running:
            left = len(r.request.prompt_ids) - r.prefilled
            if left == 0:
                continue
            size = min(self.chunk - r.prefilled % self.chunk, left)
            if batch and tokens + size > self.chunk:
                break
            batch.append((r, r.request.prompt_ids[r.prefilled : r.prefilled + size]))
            tokens += size
        if not batch:
            return
        try:
            logits = self.model.forward_many([(r.seq, ids) for r, ids in batch])
        except UserError as err:  # NaN logits from a broken model: these requests end, the server goes on
            for r, _ in batch:
                self._finish(r, "error", str(err))
            return
        self.stats.prompt_tokens += tokens
        for (r, ids), row in zip(batch, logits):
            r.prefilled += len(ids)
            if r.prefilled < len(r.request.prompt_ids):
                continue
            if r.budget == 0:
                self._finish(r, "length")
            else:
                self._take(r, row)

    def _decode_step(self) -> None:
        ready = [r for r in self._running if r.pending is not None]
        if not ready:
            return
        start = time.perf_counter()
        tokens = [r.pending for r in ready]
        try:
            if len(ready) == 1 or self.batch is None:
                logits = [self.model.decode(t, r.seq) for r, t in zip(ready, tokens)]
            else:
                logits = self.batch([r.seq for r in ready], tokens)
        except UserError as err:
            for r in ready:
                self._finish(r, "error", str(err))
            return
        self.stats.steps += 1
        self.stats.batch_sizes[len(ready)] += 1
        self.stats.tokens_per_second = len(ready) / max(time.perf_counter() - start, 1e-9)
        for r, row in zip(ready, logits):
            self._take(r, row)

    def _take(self, r: _Running, logits: np.ndarray) -> None:
        """Sample r's next token from ``logits``, hand it on, and end r where it ends."""
        token = r.sampler.sample(logits)
        r.generated += 1
        self.stats.generated_tokens += 1
        logprob, top = _logprobs(logits, token, r.request.logprobs) if r.request.logprobs is not None else (None, ())
        if token in self.tokenizer.stop_ids and not r.request.ignore_eos:
            r.request.emit(Delta("", token, logprob, top))
            self._finish(r, "stop")
            return
        before = len(r.text.pieces)
        r.text.push(token)
        r.request.emit(Delta("".join(r.text.pieces[before:]), token, logprob, top))
        if r.text.stopped:
            self._finish(r, "stop")
        elif r.generated >= r.budget:
            self._finish(r, "length")
        else:
            r.pending = token

    def _finish(self, r: _Running, reason: str, message: str = "") -> None:
        if reason in ("stop", "length"):
            before = len(r.text.pieces)
            r.text.finish()
            tail = "".join(r.text.pieces[before:])
            if tail:
                r.request.emit(Delta(tail, None))
        r.request.emit(Done(reason, len(r.request.prompt_ids), r.generated, message))
        self._running.remove(r)
        r.seq.release()
        self._free.append(r.seq)
        self.stats.running = len(self._running)


class QueueFull(Exception):
    """The engine's queue is at its limit (HTTP 429)."""


def _logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """log softmax of the raw logits (as OpenAI reports them: before temperature and filters)
    for the chosen token, and the ``top`` most likely tokens with theirs."""
    z = np.asarray(logits, np.float64)
    z = z - z.max()
    log_total = math.log(float(np.exp(z).sum()))
    best: Sequence[int] = np.argpartition(-z, top - 1)[:top] if top else ()
    best = sorted(best, key=lambda i: -z[i])
    return float(z[token] - log_total), tuple((int(i), float(z[i] - log_total)) for i in best)
