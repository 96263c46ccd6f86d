"""Tokenizer, chat template, sampling and generation of the device runtime, on tokenizers built
here with the ``tokenizers`` library and checked against transformers where it is the reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from bitnet_runtime.errors import UserError
from bitnet_runtime.generate import ChatSession, GenerationResult, generate
from bitnet_runtime.sampling import Sampler, SamplingParams
from bitnet_runtime.tokenizer import Tokenizer

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
BOS, EOS, _, _, EOT = range(len(SPECIALS))
# Llama 3's template, spread over lines so that trim_blocks / lstrip_blocks matter, plus a
# raise_exception branch and a namespace.
LLAMA3_TEMPLATE = """{% set ns = namespace(count=0) %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role: ' + message['role']) }}
    {% endif %}
    {% set header = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' %}
    {% set content = header + message['content'] | trim + '<|eot_id|>' %}
    {% if loop.index0 == 0 %}
        {% set content = bos_token + content %}
    {% endif %}
    {% set ns.count = ns.count + 1 %}
    {{- content -}}
{% endfor %}
{% if tools is not none %}{{ tools | tojson }}{% endif %}
{% if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
{% endif %}"""
CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog",
    "Hello there! How are you today? I am fine, thank you.",
    "héllo wörld, café crème",
    "system user assistant",
]
# Not in the corpus: byte-level BPE splits these characters into one token per UTF-8 byte.
RARE = "日本語 🙂"
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "hello there "},
    {"role": "assistant", "content": "hello world", "reasoning": None},
    {"role": "user", "content": "café 日本"},
]


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> Path:
    """A Llama-3-style model directory: byte-level BPE whose post-processor prepends BOS."""
    root = tmp_path_factory.mktemp("llama3")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIALS[BOS]} $A",
        pair=f"{SPECIALS[BOS]} $A {SPECIALS[BOS]} $B",
        special_tokens=[(SPECIALS[BOS], BOS)],
    )
    tok.save(str(root / "tokenizer.json"))
    added = {str(i): {"content": s, "special": True, "lstrip": False, "rstrip": False} for i, s in enumerate(SPECIALS)}
    _write_json(
        root / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": SPECIALS[BOS],
            "eos_token": {"__type": "AddedToken", "content": SPECIALS[EOS], "special": True},
            "chat_template": LLAMA3_TEMPLATE,
            "added_tokens_decoder": added,
        },
    )
    _write_json(root / "config.json", {"bos_token_id": BOS, "eos_token_id": EOS})
    _write_json(root / "generation_config.json", {"bos_token_id": BOS, "eos_token_id": [EOS, EOT]})
    return root


@pytest.fixture(scope="module")
def llama2_dir(tmp_path_factory) -> Path:
    """A Llama-2-style (SentencePiece) directory: characters plus byte fallback, '▁' for spaces,
    a decoder that strips the leading space, a post-processor that prepends <s>."""
    root = tmp_path_factory.mktemp("llama2")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for char in sorted(set("▁" + "".join(CORPUS))):
        vocab.setdefault(char, len(vocab))
    merges = [("▁", "h"), ("▁h", "e"), ("l", "l"), ("▁he", "ll"), ("▁hell", "o")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in ("<unk>", "<s>", "</s>")])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.save(str(root / "tokenizer.json"))
    _write_json(
        root / "tokenizer_config.json",
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True},
    )
    _write_json(root / "config.json", {"bos_token_id": 1, "eos_token_id": 2})
    return root


@pytest.fixture(scope="module")
def llama3(llama3_dir) -> Tokenizer:
    return Tokenizer.from_dir(llama3_dir)


@pytest.fixture(scope="module")
def llama2(llama2_dir) -> Tokenizer:
    return Tokenizer.from_dir(llama2_dir)


@pytest.fixture(scope="module")
def reference(llama3_dir, llama2_dir):
    """transformers' AutoTokenizer on the same files, the reference for encode and chat rendering."""
    transformers = pytest.importorskip("transformers")
    return {
        "llama3": transformers.AutoTokenizer.from_pretrained(llama3_dir),
        "llama2": transformers.AutoTokenizer.from_pretrained(llama2_dir),
    }


TEXTS = ["hello world", "Hello there! How are you?", " leading  and double  spaces ", "héllo " + RARE, "a\nb\n\n"]


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("style", ["llama3", "llama2"])
def test_encode_decode_round_trip(style, request):
    tok = request.getfixturevalue(style)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, add_bos=False)) == text


@pytest.mark.parametrize("style", ["llama3", "llama2"])
def test_encode_matches_transformers_with_bos_once(style, request, reference):
    tok = request.getfixturevalue(style)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == reference[style](text)["input_ids"]
        assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
        assert tok.encode(text, add_bos=False) == ids[1:]


def test_bos_not_doubled_when_text_starts_with_it(llama3):
    ids = llama3.encode("<|begin_of_text|>hello")
    assert ids[:2] == [BOS, llama3.encode("hello", add_bos=False)[0]]
    assert ids.count(BOS) == 1


def test_bos_follows_tokenizer_config_without_post_processor(tmp_path, llama3_dir):
    backend = HFTokenizer.from_file(str(llama3_dir / "tokenizer.json"))
    backend.post_processor = None
    backend.save(str(tmp_path / "tokenizer.json"))
    for add_bos in (True, False):
        _write_json(tmp_path / "tokenizer_config.json", {"bos_token": SPECIALS[BOS], "add_bos_token": add_bos})
        assert (Tokenizer.from_dir(tmp_path).encode("hello")[0] == BOS) is add_bos


def test_decode_skips_special_tokens(llama3):
    ids = llama3.encode("hello") + [EOT]
    assert llama3.decode(ids) == "hello"
    assert llama3.decode(ids, skip_special=False) == "<|begin_of_text|>hello<|eot_id|>"


def test_stop_ids_hold_every_eos_and_end_of_turn(llama3, llama2, llama2_dir, tmp_path):
    assert llama3.stop_ids == {EOS, EOT}
    assert llama2.stop_ids == {2}
    for name in ("tokenizer.json", "config.json"):
        (tmp_path / name).write_bytes((llama2_dir / name).read_bytes())
    _write_json(tmp_path / "generation_config.json", {"eos_token_id": 0})
    assert Tokenizer.from_dir(tmp_path).stop_ids == {0, 2}  # config.json's EOS is kept


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_chat_matches_transformers(llama3, reference, add_generation_prompt):
    expected = reference["llama3"].apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=add_generation_prompt)
    rendered = llama3.render_chat(CONVERSATION, add_generation_prompt=add_generation_prompt)
    assert rendered == expected
    assert rendered.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.")
    encoded = reference["llama3"].apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt)
    assert llama3.encode(rendered, add_bos=False) == encoded["input_ids"]


def test_chat_template_from_jinja_file_wins(tmp_path, llama3_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((llama3_dir / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert Tokenizer.from_dir(tmp_path).render_chat([{"role": "user", "content": "hi"}]) == "[hi]"


def test_chat_template_errors_are_user_errors(llama3, llama2):
    with pytest.raises(UserError, match="unknown role: robot"):
        llama3.render_chat([{"role": "robot", "content": "beep"}])
    with pytest.raises(UserError, match="empty conversation"):
        llama3.render_chat([])
    with pytest.raises(UserError, match="no chat_template"):
        llama2.render_chat([{"role": "user", "content": "hi"}])


def test_missing_tokenizer_json_names_the_directory(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path}.*tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------- sampling


def _logits(vocab: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, vocab).astype(np.float32)


def test_greedy_is_argmax():
    sampler = Sampler(SamplingParams())
    for seed in range(20):
        assert sampler.sample(_logits(seed=seed)) == int(np.argmax(_logits(seed=seed)))


def test_seed_makes_sampling_reproducible():
    params = SamplingParams(temperature=1.0, seed=7)
    draws = [[Sampler(params).sample(_logits(seed=s)) for s in range(30)] for _ in range(2)]
    assert draws[0] == draws[1]
    other = [Sampler(SamplingParams(temperature=1.0, seed=8)).sample(_logits(seed=s)) for s in range(30)]
    assert other != draws[0]


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6)])
def test_single_token_filters_are_greedy(params):
    sampler = Sampler(params)
    for seed in range(20):
        assert sampler.sample(_logits(seed=seed)) == int(np.argmax(_logits(seed=seed)))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_frequencies(temperature):
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    sampler = Sampler(SamplingParams(temperature=temperature, seed=0))
    draws = np.array([sampler.sample(np.log(probs).astype(np.float32)) for _ in range(20000)])
    expected = probs ** (1 / temperature) / (probs ** (1 / temperature)).sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / draws.size, expected, atol=0.015)


def test_top_k_and_top_p_keep_the_expected_tokens():
    logits = np.log(np.array([0.05, 0.5, 0.15, 0.3])).astype(np.float32)
    ids, probs = Sampler(SamplingParams(temperature=1.0, top_k=2)).distribution(logits)
    assert sorted(ids.tolist()) == [1, 3]
    np.testing.assert_allclose(probs.sum(), 1.0)
    ids, _ = Sampler(SamplingParams(temperature=1.0, top_p=0.8)).distribution(logits)
    assert sorted(ids.tolist()) == [1, 3]  # 0.5 + 0.3 reaches 0.8
    ids, _ = Sampler(SamplingParams(temperature=1.0, top_p=0.81)).distribution(logits)
    assert sorted(ids.tolist()) == [1, 2, 3]


@pytest.mark.parametrize(
    "vocab,scale,params",
    [
        (50, 3.0, SamplingParams(temperature=0.7, top_k=10, top_p=0.9)),
        (50, 3.0, SamplingParams(temperature=1.3, top_p=0.5)),
        (5000, 8.0, SamplingParams(temperature=1.0, top_p=0.95)),  # nucleus among the first 1024
        (5000, 0.1, SamplingParams(temperature=1.0, top_p=0.95)),  # flat: needs the full sort
    ],
)
def test_distribution_matches_transformers_warpers(vocab, scale, params):
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(1).normal(0, scale, vocab).astype(np.float32)
    scores = TemperatureLogitsWarper(params.temperature)(None, torch.from_numpy(logits)[None].double())
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    scores = TopPLogitsWarper(params.top_p)(None, scores)
    expected = torch.softmax(scores, dim=-1)[0].numpy()
    ids, probs = Sampler(params).distribution(logits)
    assert sorted(ids.tolist()) == np.flatnonzero(expected).tolist()
    np.testing.assert_allclose(probs, expected[ids], rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_sampling_params_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        SamplingParams(**kwargs)


# ---------------------------------------------------------------- generation


class ScriptedModel:
    """A deterministic stand-in model whose logits make greedy decoding follow ``script``."""

    def __init__(self, script: list[int], vocab: int, context_length: int = 256) -> None:
        self.script = script
        self.vocab = vocab
        self.context_length = context_length
        self.prompts: list[list[int]] = []
        self.fed: list[int] = []

    def reset(self) -> None:
        self.fed = []

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.prompts.append(list(ids))
        return self._logits()

    def decode(self, token_id: int) -> np.ndarray:
        self.fed.append(token_id)
        return self._logits()

    def _logits(self) -> np.ndarray:
        logits = np.zeros(self.vocab, dtype=np.float32)
        logits[self.script[min(len(self.fed), len(self.script) - 1)]] = 10.0
        return logits


def _run(tok: Tokenizer, script: list[int], max_new_tokens: int = 100, **kwargs) -> tuple[GenerationResult, list[str]]:
    pieces: list[str] = []
    model = ScriptedModel(script, tok.vocab_size)
    result = generate(model, tok, tok.encode("hello"), max_new_tokens, on_text=pieces.append, **kwargs)
    assert "".join(pieces) == result.text
    assert all(pieces) and not any("\ufffd" in piece for piece in pieces)
    assert model.fed == result.token_ids[:-1]  # every token but the last was fed back
    return result, pieces


def test_stops_at_end_of_turn(llama3):
    result, _ = _run(llama3, llama3.encode("hello world", add_bos=False) + [EOT] + llama3.encode("junk", add_bos=False))
    assert result.text == "hello world"
    assert result.finish_reason == "stop"
    assert result.token_ids[-1] == EOT
    assert result.decode_steps == len(result.token_ids) - 1


def test_stops_at_max_new_tokens(llama3):
    script = llama3.encode("the quick brown fox jumps over the lazy dog", add_bos=False)
    result, _ = _run(llama3, script, max_new_tokens=4)
    assert result.finish_reason == "length"
    assert result.token_ids == script[:4]
    assert result.text == llama3.decode(script[:4])
    assert result.prompt_ids == llama3.encode("hello")
    assert result.prefill_tokens_per_second >= 0 and result.decode_tokens_per_second >= 0


def test_stop_string_truncates_and_is_never_streamed(llama3):
    script = llama3.encode("hello world, the quick brown fox", add_bos=False)
    result, pieces = _run(llama3, script, stop_strings=["brown fox", ", the"])
    assert result.text == "hello world"
    assert result.finish_reason == "stop"
    assert len(result.token_ids) < len(script)
    assert not any("," in piece for piece in pieces)
    assert _run(llama3, script, stop_strings=", the")[0].text == "hello world"  # one string, not its characters


def test_unfinished_stop_string_prefix_is_released_at_the_end(llama3):
    script = llama3.encode("hello world", add_bos=False) + [EOS]
    result, _ = _run(llama3, script, stop_strings=["worlds"])
    assert result.text == "hello world" and result.finish_reason == "stop"
    result, _ = _run(llama3, script[:-1], max_new_tokens=len(script) - 1, stop_strings=["worlds"])
    assert result.text == "hello world" and result.finish_reason == "length"


@pytest.mark.parametrize("style", ["llama3", "llama2"])
def test_streaming_splits_multibyte_characters_correctly(style, request):
    tok = request.getfixturevalue(style)
    text = "héllo " + RARE + " wörld, café!"
    script = tok.encode(text, add_bos=False)
    assert any("\ufffd" in tok.decode([i]) for i in script)  # some character spans several tokens
    result, pieces = _run(tok, script + [2 if style == "llama2" else EOS])
    assert result.text == text == tok.decode(script)
    assert len(pieces) > 1


def test_special_tokens_inside_the_output_are_not_shown(llama2):
    script = llama2.encode("hello", add_bos=False) + [1] + llama2.encode("world", add_bos=False) + [2]
    result, _ = _run(llama2, script)
    assert result.text == "hello world" == llama2.decode(script)


def test_stop_string_spanning_a_multibyte_split(llama3):
    script = llama3.encode("hello " + RARE + " world", add_bos=False) + [EOS]
    result, _ = _run(llama3, script, stop_strings=["本語"])
    assert result.text == "hello 日"


def test_context_clips_the_new_tokens(llama3):
    prompt = llama3.encode("hello world")
    model = ScriptedModel(llama3.encode("the quick brown fox jumps", add_bos=False), llama3.vocab_size, len(prompt) + 3)
    result = generate(model, llama3, prompt, 100, SamplingParams())
    assert len(result.token_ids) == 3 and result.finish_reason == "length"


def test_prompt_errors_are_user_errors(llama3):
    prompt = llama3.encode("hello world, the quick brown fox")
    model = ScriptedModel([EOS], llama3.vocab_size, context_length=len(prompt) - 1)
    with pytest.raises(UserError, match=f"{len(prompt)} tokens.*{len(prompt) - 1}"):
        generate(model, llama3, prompt, 10, SamplingParams())
    with pytest.raises(UserError, match="empty"):
        generate(model, llama3, [], 10, SamplingParams())
    with pytest.raises(UserError, match="max_new_tokens"):
        generate(model, llama3, prompt[:2], -1, SamplingParams())
    with pytest.raises(UserError, match="stop strings"):
        generate(model, llama3, prompt[:2], 5, SamplingParams(), stop_strings=[""])


def test_zero_new_tokens_skips_the_model(llama3):
    model = ScriptedModel([EOS], llama3.vocab_size)
    result = generate(model, llama3, llama3.encode("hello"), 0, SamplingParams())
    assert result.token_ids == [] and result.text == "" and result.finish_reason == "length"
    assert model.prompts == []


def test_chat_session_renders_the_whole_history_each_turn(llama3, llama2):
    answer = llama3.encode("hello world", add_bos=False) + [EOT]
    model = ScriptedModel(answer, llama3.vocab_size)
    chat = ChatSession(model, llama3, SamplingParams(), system_prompt="You are terse.")
    streamed: list[str] = []
    assert chat.send("hello there", on_text=streamed.append).text == "hello world" == "".join(streamed)
    chat.send("café 日本")
    history = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "café 日本"},
    ]
    assert model.prompts[1] == llama3.encode(llama3.render_chat(history), add_bos=False)
    assert model.prompts[1].count(BOS) == 1
    assert chat.messages == [*history, {"role": "assistant", "content": "hello world"}]
    chat.clear()
    assert chat.messages == history[:1]
    with pytest.raises(UserError, match="no chat_template"):
        ChatSession(ScriptedModel([2], llama2.vocab_size), llama2).send("hi")
