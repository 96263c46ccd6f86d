"""A Hugging Face tokenizer and chat template read from a model directory, without transformers.

The device runtime must not pull in transformers (and torch with it), so this reproduces the
two things generation needs from ``AutoTokenizer``: encoding with the BOS token the model was
trained with, and ``apply_chat_template(..., tokenize=False)``. Both follow transformers 5:
``tokenizer.json`` is run by the ``tokenizers`` library and the chat template by a sandboxed
jinja2 environment configured like transformers' ``_cached_compile_jinja_template``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Iterator
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from bitnet_runtime.errors import UserError
from bitnet_runtime.model_config import read_json

# The named special tokens transformers hands to every chat template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Tokens that close an assistant turn in common chat formats; instruct models stop on them even
# where generation_config.json lists only the base model's end-of-text token.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")


class Tokenizer:
    """Text <-> token ids and chat rendering for one model, as transformers would do them."""

    def __init__(
        self,
        backend: HFTokenizer,
        config: dict[str, Any],
        model_config: dict[str, Any],
        chat_template: str | dict[str, str] | None,
        source: str = "<memory>",
    ) -> None:
        self.backend = backend
        self.source = source
        self.chat_template = chat_template
        self.special_tokens = _named_special_tokens(config)
        self.special_ids = _special_ids(backend, config, self.special_tokens)
        self.bos_id = self._token_id(self.special_tokens.get("bos_token"), model_config.get("bos_token_id"))
        self.add_bos = self.bos_id is not None and _adds_bos(backend, config, self.bos_id)
        self.stop_ids = self._stop_ids(model_config)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json, config.json and generation_config.json from ``path``."""
        root = Path(path)
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise UserError(f"{root} has no tokenizer.json: expected a Hugging Face model directory")
        try:
            backend = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise UserError(f"cannot read {tokenizer_file}: {exc}") from None
        config = read_json(root / "tokenizer_config.json", missing_ok=True)
        try:
            return cls(backend, config, _model_config(root), _chat_template(root, config), str(root))
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as err:  # fields of the wrong type
            raise UserError(f"{root / 'tokenizer_config.json'} is not usable: {type(err).__name__}: {err}") from None

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer knows, added tokens included (the model's vocab may be padded past it)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_bos``, the model's BOS token leads exactly once.

        The post-processor is bypassed and BOS is prepended by hand so that a text that already
        starts with the BOS token (a rendered chat, say) does not get a second one.
        """
        if not isinstance(text, str):
            raise UserError(f"text to encode must be a string, not {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # undecodable bytes from a terminal or file arrive as lone surrogates
            raise UserError(f"the text is not valid UTF-8 (an undecodable byte at character {err.start})") from None
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.add_bos and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Text of ``ids``; ids the tokenizer does not know (a padded vocab's tail) decode to nothing."""
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat template writes it, identical to transformers'
        ``apply_chat_template(messages, tokenize=False, add_generation_prompt=...)``.

        The text carries its own special tokens (the template writes BOS), so encode it with
        ``add_bos=False`` to get the ids transformers would.
        """
        if not messages:
            raise UserError("cannot render an empty conversation")
        chat = [_plain_message(message) for message in messages]
        variables = dict(messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **self.special_tokens)
        try:
            with _time_limit(TEMPLATE_SECONDS):
                text = "".join(_bounded(self._template.generate(**variables), TEMPLATE_CHARS))
        except jinja2.TemplateError as exc:
            raise UserError(f"the chat template of {self.source} rejected the conversation: {exc}") from None
        except _TemplateLimit as exc:
            raise UserError(f"the chat template of {self.source} {exc}") from None
        except (RecursionError, MemoryError) as exc:
            raise UserError(f"the chat template of {self.source} recursed too deeply or ran out of memory ({type(exc).__name__})") from None
        except Exception as exc:  # the template is the checkpoint's code: whatever it raises is its error, not ours
            raise UserError(f"the chat template of {self.source} failed: {type(exc).__name__}: {exc}") from None
        return text

    @cached_property
    def _template(self) -> jinja2.Template:
        """Compiled once, on first use, so that models without a template load fine for plain text."""
        template = self.chat_template
        if isinstance(template, dict):
            if "default" not in template:
                raise UserError(f"{self.source} has chat templates {sorted(template)} but none named 'default'")
            template = template["default"]
        if not template:
            raise UserError(f"{self.source} has no chat_template: it is not a chat model, use plain text generation")
        try:
            return _jinja_environment().from_string(template)
        except jinja2.TemplateSyntaxError as exc:
            raise UserError(f"the chat template of {self.source} does not compile: {exc}") from None

    def _token_id(self, token: str | None, fallback: Any) -> int | None:
        """The id of a named token, else the id the model config gives for it."""
        if token is not None and (found := self.backend.token_to_id(token)) is not None:
            return found
        return fallback if isinstance(fallback, int) else None

    def _stop_ids(self, model_config: dict[str, Any]) -> set[int]:
        """EOS ids from every place a checkpoint may declare them, plus the end-of-turn token."""
        ids: set[int | None] = set(_ids(model_config.get("eos_token_id")))
        ids.add(self._token_id(self.special_tokens.get("eos_token"), None))
        added = {token.content: i for i, token in self.backend.get_added_tokens_decoder().items()}
        ids.update(added.get(token) for token in END_OF_TURN_TOKENS)
        return {i for i in ids if isinstance(i, int)}


TEMPLATE_SECONDS = 10  # a chat template renders a conversation in milliseconds; a loop without end is stopped
TEMPLATE_CHARS = 8 << 20  # and may write at most this much


class _TemplateLimit(Exception):
    """A chat template ran past its time or size limit."""


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """SIGALRM after ``seconds`` in the main thread (where a signal can interrupt the render);
    elsewhere the sandbox's own limits (no range above 100000) are all there is."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def stop(signum, frame):
        raise _TemplateLimit(f"ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _bounded(pieces: Iterator[str], limit: int) -> Iterator[str]:
    total = 0
    for piece in pieces:
        total += len(piece)
        if total > limit:
            raise _TemplateLimit(f"wrote more than {limit} characters")
        yield piece


def _ids(value: Any) -> set[int]:
    """Token ids as configs write them: one int, a list of them, or nothing."""
    values = value if isinstance(value, list) else [value]
    return {v for v in values if isinstance(v, int) and not isinstance(v, bool)}


def _model_config(root: Path) -> dict[str, Any]:
    """config.json overlaid with generation_config.json (what transformers' generate reads wins),
    keeping the EOS ids of both: checkpoints declare their end-of-turn token in either."""
    model, generation = read_json(root / "config.json", missing_ok=True), read_json(root / "generation_config.json", missing_ok=True)
    eos = _ids(model.get("eos_token_id")) | _ids(generation.get("eos_token_id"))
    return {**model, **generation, "eos_token_id": sorted(eos)}


def _chat_template(root: Path, config: dict[str, Any]) -> str | dict[str, str] | None:
    """The chat template(s), where transformers looks: chat_template.jinja wins over tokenizer_config.json."""
    template_file = root / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # the older format for several named templates
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        if len(named) != len(template) or not all(isinstance(v, str) and isinstance(k, str) for k, v in named.items()):
            raise UserError("tokenizer_config.json's chat_template list must hold {name, template} strings")
        return named
    if template is not None and not isinstance(template, str):
        raise UserError(f"tokenizer_config.json's chat_template must be a string, not {type(template).__name__}")
    return template


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _named_special_tokens(config: dict[str, Any]) -> dict[str, str]:
    """bos_token, eos_token, ... as strings: the variables every chat template may read."""
    tokens = {name: _token_content(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
    return {name: token for name, token in tokens.items() if token is not None}


def _special_ids(backend: HFTokenizer, config: dict[str, Any], named: dict[str, str]) -> frozenset[int]:
    """Ids that decoding with ``skip_special`` drops: special added tokens from both files and the named ones."""
    ids = {i for i, token in backend.get_added_tokens_decoder().items() if token.special}
    decoder = config.get("added_tokens_decoder") or {}
    for key, entry in decoder.items() if isinstance(decoder, dict) else ():
        if isinstance(entry, dict) and entry.get("special") and str(key).isdigit():
            ids.add(int(key))
    ids.update(backend.token_to_id(token) for token in named.values())
    return frozenset(i for i in ids if i is not None)


def _adds_bos(backend: HFTokenizer, config: dict[str, Any], bos_id: int) -> bool:
    """Whether this model's prompts start with BOS, decided as transformers 5 decides it.

    With a tokenizer.json transformers ignores ``add_bos_token`` and keeps the file's
    post-processor (Llama-3's and Llama-2's both prepend BOS); only without one does the flag
    in tokenizer_config.json count.
    """
    if backend.post_processor is None:
        return bool(config.get("add_bos_token", False))
    with_special = backend.encode("a", add_special_tokens=True).ids
    plain = backend.encode("a", add_special_tokens=False).ids
    return with_special[:1] == [bos_id] and plain[:1] != [bos_id]


def _plain_message(message: Any) -> dict[str, Any]:
    """A message as transformers passes it to the template: a dict without its None-valued keys."""
    if not isinstance(message, dict):
        raise UserError(f"a chat message must be a dict with 'role' and 'content', not {message!r}")
    return {key: value for key, value in message.items() if value is not None}


def _raise_exception(message: str) -> None:
    """Lets templates reject a conversation (``{{ raise_exception('...') }}``), as in transformers."""
    raise jinja2.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' tojson: plain json.dumps, without jinja's HTML escaping."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    """Templates that write today's date (Llama 3.1's) call this."""
    return datetime.now().strftime(format)


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``, which transformers uses to mark assistant
    tokens for training masks: rendering only needs its body, written as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _jinja_environment() -> ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in; templates from the Hub are untrusted code."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env
