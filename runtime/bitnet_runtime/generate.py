"""Text generation and chat on any model that can prefill a prompt and decode one token at a time.

Streaming is the delicate part: a token can end in the middle of a UTF-8 character, and the
text decoded so far can be the start of a stop string that must never be shown. ``on_text``
therefore only ever receives text that no later token can change, and the pieces it gets
concatenate to exactly ``GenerationResult.text``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from bitnet_runtime.errors import UserError
from bitnet_runtime.sampling import Sampler, SamplingParams
from bitnet_runtime.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class LanguageModel(Protocol):
    """What generation needs from a model; the KV cache lives inside it."""

    context_length: int

    def reset(self) -> None:
        """Forget every token seen, so that the next prefill starts a new sequence."""

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Run the whole prompt as one batch; float32 logits [vocab] of its last token."""

    def decode(self, token_id: int) -> np.ndarray:
        """Append one token; float32 logits [vocab] for the token after it."""


@dataclass
class GenerationResult:
    """One generation. ``token_ids`` holds every sampled token, a final stop token included;
    ``text`` leaves stop tokens and stop strings out."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (stop token or stop string) | "length" (max_new_tokens or context full)
    prefill_seconds: float
    decode_seconds: float

    @property
    def decode_steps(self) -> int:
        """Model decode calls: the first token comes from the prefill's logits, the last is never fed back."""
        return max(len(self.token_ids) - 1, 0)

    @property
    def prefill_tokens_per_second(self) -> float:
        return len(self.prompt_ids) / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


class _Detokenizer:
    """Incremental decoding over a sliding window of ids, so that each step decodes a few tokens
    rather than the whole output.

    Text is released when the window's decoding grows past that of its already released head
    and does not end in a replacement character (an incomplete UTF-8 sequence the next token may
    finish). Decoding the window with its head, rather than the new ids alone, keeps what
    decoders do at the start of a text (SentencePiece's stripped leading space) in the head.
    Special tokens never enter the window: a window of only skipped tokens would decode to
    nothing and let that start-of-text handling eat a real space.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.head = 0  # the window starts here
        self.released = 0  # ids[head:released] is text already released

    def push(self, token_id: int) -> str:
        """Add a token; the text that became final (possibly none)."""
        if token_id in self.tokenizer.special_ids:
            return ""
        self.ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """Everything still held back, at the end of generation."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        known = self.tokenizer.decode(self.ids[self.head : self.released], skip_special=False)
        text = self.tokenizer.decode(self.ids[self.head :], skip_special=False)
        if not final and (len(text) <= len(known) or text.endswith(REPLACEMENT_CHAR)):
            return ""
        self.head, self.released = self.released, len(self.ids)
        return text[len(known) :]


class _StopStrings:
    """Holds back text that might be the start of a stop string, and finds whole ones.

    By induction no stop string can begin in text already released: any released tail that
    was a stop string's prefix would have been held back, so searching the held text suffices.
    """

    def __init__(self, stop_strings: Sequence[str] | str) -> None:
        if isinstance(stop_strings, str):  # one stop string, not one per character
            stop_strings = (stop_strings,)
        if any(not isinstance(s, str) or not s for s in stop_strings):
            raise UserError(f"stop strings must be non-empty strings, got {list(stop_strings)!r}")
        self.stop_strings = tuple(stop_strings)
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add decoded text; returns the text now safe to show and whether a stop string was found."""
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            released, self.held = self.held[: min(hits)], ""
            return released, True
        keep = self._partial_match_length()
        released, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return released, False

    def flush(self) -> str:
        """The held text, once no more text can complete a stop string."""
        released, self.held = self.held, ""
        return released

    def _partial_match_length(self) -> int:
        """Length of the longest tail of the held text that starts some stop string."""
        longest = 0
        for stop in self.stop_strings:
            for length in range(min(len(stop) - 1, len(self.held)), longest, -1):
                if self.held.endswith(stop[:length]):
                    longest = length
                    break
        return longest


class TextStream:
    """Detokenizer, stop-string filter and callback in one: the text as the user sees it."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] | str, on_text: Callable[[str], None] | None):
        self.detokenizer = _Detokenizer(tokenizer)
        self.stops = _StopStrings(stop_strings)
        self.on_text = on_text
        self.pieces: list[str] = []
        self.stopped = False  # a stop string was found: nothing more is shown

    def push(self, token_id: int) -> None:
        """Add a sampled token that is not a stop token."""
        self._feed(self.detokenizer.push(token_id))

    def finish(self) -> None:
        """Release what is still held back: no more tokens will come."""
        if not self.stopped:
            self._feed(self.detokenizer.flush())
        if not self.stopped:
            self._emit(self.stops.flush())

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def _feed(self, text: str) -> None:
        released, self.stopped = self.stops.feed(text)
        self._emit(released)

    def _emit(self, piece: str) -> None:
        if piece:
            self.pieces.append(piece)
            if self.on_text is not None:
                self.on_text(piece)


def generate(
    model: LanguageModel,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: SamplingParams | Sampler = SamplingParams(),
    stop_strings: Sequence[str] | str = (),
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` after the prompt, fewer when the context fills up.

    Stops at a stop token of the tokenizer, at a stop string (the text ends before it) or at the
    token limit. A ``Sampler`` rather than ``SamplingParams`` continues its random stream across calls.
    """
    prompt_ids = [int(i) for i in prompt_ids]
    budget = _token_budget(len(prompt_ids), max_new_tokens, model.context_length)
    sampler = sampling if isinstance(sampling, Sampler) else Sampler(sampling)
    stream = TextStream(tokenizer, stop_strings, on_text)
    token_ids: list[int] = []
    start = time.perf_counter()
    model.reset()
    logits = model.prefill(prompt_ids) if budget > 0 else None
    prefilled = time.perf_counter()
    while len(token_ids) < budget:
        token = sampler.sample(logits)
        token_ids.append(token)
        if token in tokenizer.stop_ids:
            break
        stream.push(token)
        if stream.stopped:
            break
        if len(token_ids) < budget:
            logits = model.decode(token)
    stream.finish()
    ended_on_stop_token = bool(token_ids) and token_ids[-1] in tokenizer.stop_ids
    return GenerationResult(
        prompt_ids=prompt_ids,
        token_ids=token_ids,
        text=stream.text,
        finish_reason="stop" if stream.stopped or ended_on_stop_token else "length",
        prefill_seconds=prefilled - start,
        decode_seconds=time.perf_counter() - prefilled,
    )


def _token_budget(prompt_length: int, max_new_tokens: int, context_length: int) -> int:
    """How many tokens may be generated: max_new_tokens, clipped to what the context has left."""
    if prompt_length == 0:
        raise UserError("the prompt is empty: generation needs at least one token (a BOS token will do)")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be an integer >= 0, not {max_new_tokens!r}")
    if prompt_length > context_length:
        raise UserError(f"the prompt has {prompt_length} tokens but the model's context holds only {context_length}")
    return min(max_new_tokens, context_length - prompt_length)


class ChatSession:
    """A conversation with a chat model: keeps the message history and renders it with the
    model's chat template each turn.

    Every turn re-prefills the whole rendered conversation instead of reusing the KV cache of
    the previous turns. That costs prompt time but is always right: templates may render past
    turns differently once a new one follows (some drop an assistant's reasoning), and the
    cache never has to match the text token for token.
    """

    def __init__(
        self,
        model: LanguageModel,
        tokenizer: Tokenizer,
        sampling: SamplingParams = SamplingParams(),
        system_prompt: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.sampler = Sampler(sampling)  # one random stream for the whole conversation
        self.system_prompt = system_prompt
        self.messages: list[dict[str, str]] = []
        self.clear()

    def clear(self) -> None:
        """Start over, keeping only the system prompt."""
        self.messages = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]

    def send(
        self,
        text: str,
        max_new_tokens: int = 512,
        stop_strings: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Add a user message, generate the assistant's answer and add it to the history.

        A turn that fails (a conversation grown past the context, say) leaves the history as it was.
        """
        messages = [*self.messages, {"role": "user", "content": text}]
        # The rendered text writes its own BOS, as transformers' apply_chat_template relies on.
        prompt_ids = self.tokenizer.encode(self.tokenizer.render_chat(messages), add_bos=False)
        result = generate(self.model, self.tokenizer, prompt_ids, max_new_tokens, self.sampler, stop_strings, on_text)
        self.messages = [*messages, {"role": "assistant", "content": result.text}]
        return result
