"""The OpenAI API's request and response shapes: what /v1/completions and
/v1/chat/completions accept (validated by pydantic: wrong types and ranges are a 400 with
the field named) and the JSON they answer, whole or as server-sent-event chunks.

Supported: max_tokens (max_completion_tokens), temperature, top_p, top_k and ignore_eos
(extensions, as in llama-server and vLLM), seed, stop (a string or up to 4), stream (with
stream_options.include_usage), logprobs (completions: the number of top alternatives;
chat: a boolean with top_logprobs), n = 1. Anything else OpenAI defines is accepted and
ignored when it cannot change the result (user, presence of metadata), and a 400 when it
would (n > 1, echo, best_of, logit_bias, tools): silently ignoring those gives answers the
client did not ask for.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .engine import Delta
from .sampling import SamplingParams
from .tokenizer import Tokenizer

MAX_STOP = 4
MAX_TOP_LOGPROBS = 20

NonNegativeInt = Annotated[int, Field(ge=0)]


class _Request(BaseModel):
    """What both endpoints share. Extra fields are allowed (clients send many), but the ones in
    ``UNSUPPORTED`` are refused when set to anything but their default."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: NonNegativeInt | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: NonNegativeInt = 0
    ignore_eos: bool = False
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1

    UNSUPPORTED: ClassVar[dict[str, Any]] = {
        "echo": False,
        "best_of": None,
        "logit_bias": None,
        "tools": None,
        "functions": None,
        "suffix": None,
    }

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of at most {MAX_STOP} of them")
        return value

    def unsupported(self) -> str | None:
        """The first field set that this server cannot honour, if any."""
        extra = self.model_extra or {}
        for name, default in self.UNSUPPORTED.items():
            if extra.get(name, default) not in (default, [], {}):
                return name
        return None

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed)

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]
    max_tokens: NonNegativeInt | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None

    def token_limit(self) -> int | None:
        return self.max_tokens

    def prompt_ids(self, tokenizer: Tokenizer) -> list[int]:
        """Text is tokenized with BOS; a list of token ids is used as it is."""
        if isinstance(self.prompt, list) and self.prompt and all(isinstance(p, int) for p in self.prompt):
            return list(self.prompt)
        texts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(texts) != 1:
            raise ValueError("prompt must be one string (a batch of prompts is several requests)")
        return tokenizer.encode(texts[0])

    def logprob_count(self) -> int | None:
        """None: no logprobs; else how many top alternatives per token."""
        return self.logprobs


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[_TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: NonNegativeInt | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    def prompt_ids(self, tokenizer: Tokenizer) -> list[int]:
        """The conversation through the model's own chat template (which writes its BOS)."""
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]
        return tokenizer.encode(tokenizer.render_chat(messages), add_bos=False)

    def logprob_count(self) -> int | None:
        """None: no logprobs; else how many top alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ----------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Shaper:
    """Builds one request's response objects, whole or chunk by chunk, for either endpoint."""

    def __init__(self, chat: bool, model: str, tokenizer: Tokenizer):
        self.chat, self.model, self.tokenizer = chat, model, tokenizer
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.offset = 0  # completions' text_offset

    def _envelope(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _token(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special=False)

    def logprobs(self, deltas: list[Delta]) -> dict | None:
        """The logprobs object of these tokens in the endpoint's own format."""
        scored = [d for d in deltas if d.token is not None and d.logprob is not None]
        if not scored:
            return None
        if self.chat:
            return {"content": [self._chat_logprob(d) for d in scored]}
        tokens = [self._token(d.token) for d in scored]
        offsets = []
        for t in tokens:
            offsets.append(self.offset)
            self.offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [d.logprob for d in scored],
            # a dict by token text, as OpenAI's format is: tokens that decode alike (byte pieces)
            # share one key, which keeps the most likely one's logprob
            "top_logprobs": [{self._token(i): lp for i, lp in reversed(d.top)} for d in scored],
            "text_offset": offsets,
        }

    def _chat_logprob(self, d: Delta) -> dict:
        def entry(token: int, logprob: float) -> dict:
            text = self._token(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return entry(d.token, d.logprob) | {"top_logprobs": [entry(i, lp) for i, lp in d.top]}

    def whole(self, text: str, deltas: list[Delta], finish_reason: str, prompt: int, completion: int) -> dict:
        logprobs = self.logprobs(deltas)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._envelope(False) | {"choices": [choice], "usage": usage(prompt, completion)}

    def chunk(self, text: str | None, deltas: list[Delta], finish_reason: str | None, first: bool = False) -> dict:
        logprobs = self.logprobs(deltas)
        if self.chat:
            delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        return self._envelope(True) | {"choices": [choice]}

    def usage_chunk(self, prompt: int, completion: int) -> dict:
        return self._envelope(True) | {"choices": [], "usage": usage(prompt, completion)}
