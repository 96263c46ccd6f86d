"""Dummy BitNet b1.58 checkpoints for benchmarking, in the Hugging Face layout of microsoft/bitnet-b1.58-2B-4T.

Like bitnet.cpp's ``utils/generate-dummy-bitnet-model.py`` (same model shapes), but the output is a
directory the real-model loader reads unchanged:

- ``config.json``: ``BitNetForCausalLM`` / ``model_type: bitnet`` / ``hidden_act: relu2`` with the
  offline ``autobitlinear`` quantization config of the 2B-4T repository;
- ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards of at most 5 GB plus
  ``model.safetensors.index.json``): bf16 embedding and norms; every q/k/v/o/gate/up/down
  projection as ``.weight`` uint8 ``[out/4, in]`` (2 bits per weight, packed along the output rows
  in four contiguous blocks: bits 2i..2i+1 of ``packed[r, c]`` hold ``W[r + i*out/4, c] + 1``,
  exactly ``transformers.integrations.bitnet.pack_weights``) and ``.weight_scale`` bf16 ``[1]``;
- ``generation_config.json``, and a byte-level BPE tokenizer (``tokenizer.json`` +
  ``tokenizer_config.json``) with exactly ``vocab_size`` ids, Llama-3 special tokens and a
  Llama-3-style chat template, so a dummy model runs end to end.

The safetensors files are written by hand and streamed: the header is computed from the shapes
first, then each tensor is generated and written in chunks of at most a few MiB, so memory
stays at a few MiB whatever the model size (a 100B preset never holds even one layer). Every file
is written under a temporary name and renamed when complete; ``config.json`` comes last, so an
interrupted run never leaves a directory that looks like a model.

Values are reproducible: each tensor draws from its own generator seeded by ``(seed, tensor name)``,
so a short version of a preset (``layers=``) holds exactly the first layers of the full one
(the values also depend on the chunk sizes below: changing those changes every checkpoint).
Ternary weights are -1 / 0 / +1 with probabilities 88/256, 80/256, 88/256 (P(0) = 0.3125, about
what bitnet.cpp's generator gets by absmean-quantizing Gaussian weights: P(|z| < 0.5 E|z|) = 0.31);
``weight_scale`` is uniform in [1, 3] (the 2B-4T -bf16 master weights are of order 1); norm
weights are 1 + 0.05 N(0, 1); the embedding is N(0, 0.02^2) (``initializer_range``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct
import sys
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

# --------------------------------------------------------------------------------------------
# Presets (data only)
# --------------------------------------------------------------------------------------------

_BITNET_CPP = (
    "bitnet.cpp utils/generate-dummy-bitnet-model.py (microsoft/BitNet): hidden/intermediate/layers/heads "
    "from its model_config table; KV heads = heads (its set_params); vocab 32002 (its generate_tensors "
    "embedding rows); rope_theta 10000 / 2048 positions / eps 1e-5 from the bitnet_b1_58-large "
    "config.json it is run against"
)
_2B_4T = "microsoft/bitnet-b1.58-2B-4T config.json"
_LARGE = (
    "1bitLLM/bitnet_b1_58-large config.json (hidden 1536, 24 layers, 16 heads, FFN 4096, vocab 32002, "
    "rope_theta 10000, 2048 positions, tied embeddings); written in the 2B-4T format with relu2"
)


@dataclass(frozen=True)
class DummyPreset:
    """The shape and hyper-parameters of one dummy model; ``source`` says where they come from."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    hidden_act: str = "relu2"
    source: str = ""

    def __post_init__(self) -> None:
        problems = []
        if min(self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.num_attention_heads, self.num_key_value_heads) < 1:
            problems.append("sizes must be positive")
        elif self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads")
        elif self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"{self.num_attention_heads} heads are not a multiple of {self.num_key_value_heads} KV heads")
        else:
            for what, n in (
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("KV width", self.num_key_value_heads * self.head_dim),
            ):
                if n % 4:
                    problems.append(f"{what} {n} is not a multiple of 4 (2-bit packing along output rows)")
        if self.vocab_size < _MIN_VOCAB:
            problems.append(f"vocab_size {self.vocab_size} is below {_MIN_VOCAB} (256 bytes + 10 special tokens)")
        if problems:
            raise UserError(f"bad dummy model preset {self.name!r}: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def with_layers(self, layers: int) -> DummyPreset:
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise UserError(f"layers must be a positive integer, got {layers!r}")
        return dataclasses.replace(self, num_hidden_layers=layers)


_MIN_VOCAB = 266

PRESETS: dict[str, DummyPreset] = {
    p.name: p
    for p in (
        # Test-sized: GQA (4 heads, 2 KV heads) like 2B-4T, every shape a multiple of 4.
        DummyPreset("tiny", 64, 128, 2, 4, 2, 512, max_position_embeddings=256, rope_theta=500000.0, source="bitnet-compile test preset"),
        DummyPreset("125m", 768, 3072, 11, 12, 12, 32002, source=_BITNET_CPP),
        DummyPreset("350m", 1024, 3072, 24, 16, 16, 32002, source=_BITNET_CPP),
        DummyPreset("1b", 2048, 3584, 24, 32, 32, 32002, source=_BITNET_CPP),
        DummyPreset("1.5b", 1536, 9216, 28, 32, 32, 32002, source=_BITNET_CPP),
        DummyPreset("2.7b", 3072, 7680, 24, 32, 32, 32002, source=_BITNET_CPP),
        DummyPreset("3.8b", 3840, 8192, 24, 32, 32, 32002, source=_BITNET_CPP),
        DummyPreset("7b", 4096, 12032, 32, 32, 32, 32002, source=_BITNET_CPP),
        DummyPreset("13b", 5120, 13824, 40, 40, 40, 32002, source=_BITNET_CPP),
        DummyPreset("30b", 6656, 16384, 60, 52, 52, 32002, source=_BITNET_CPP),
        DummyPreset("70b", 8192, 24576, 80, 64, 64, 32002, source=_BITNET_CPP),
        DummyPreset("100b", 8192, 45568, 72, 64, 64, 32002, source=_BITNET_CPP),
        DummyPreset("2b-4t", 2560, 6912, 30, 20, 5, 128256, max_position_embeddings=4096, rope_theta=500000.0, source=_2B_4T),
        DummyPreset("large", 1536, 4096, 24, 16, 16, 32002, source=_LARGE),
    )
}


def resolve_preset(preset: str | DummyPreset) -> DummyPreset:
    """A preset by name (case-insensitive) or a ``DummyPreset`` as is."""
    if isinstance(preset, DummyPreset):
        return preset
    found = PRESETS.get(str(preset).lower())
    if found is None:
        raise UserError(f"unknown dummy model preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return found


# --------------------------------------------------------------------------------------------
# Tensor list and safetensors layout
# --------------------------------------------------------------------------------------------

_ITEMSIZE = {"BF16": 2, "U8": 1}
TERNARY_PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors dtype: "BF16" or "U8"
    shape: tuple[int, ...]
    kind: str  # "embed" | "norm" | "packed" | "scale"
    logical: tuple[int, ...] = ()  # [out, in] of a packed ternary weight

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _ITEMSIZE[self.dtype]


def projection_shapes(p: DummyPreset) -> dict[str, tuple[int, int]]:
    """``[out, in]`` of each ternary projection of one layer."""
    q, kv = p.num_attention_heads * p.head_dim, p.num_key_value_heads * p.head_dim
    h, f = p.hidden_size, p.intermediate_size
    return {
        "self_attn.q_proj": (q, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q),
        "mlp.gate_proj": (f, h),
        "mlp.up_proj": (f, h),
        "mlp.down_proj": (h, f),
    }


def tensor_specs(preset: str | DummyPreset) -> list[TensorSpec]:
    """Every tensor of the checkpoint, in file order (embedding, layers 0.., final norm[, lm_head])."""
    p = resolve_preset(preset)
    h = p.hidden_size
    specs = [TensorSpec("model.embed_tokens.weight", "BF16", (p.vocab_size, h), "embed")]
    proj = projection_shapes(p)
    for i in range(p.num_hidden_layers):
        pre = f"model.layers.{i}."
        specs.append(TensorSpec(pre + "input_layernorm.weight", "BF16", (h,), "norm"))
        for name in TERNARY_PROJECTIONS[:4]:
            specs += _projection(pre + name, proj[name])
        # normalizes the attention output before o_proj: heads * head_dim wide
        specs.append(TensorSpec(pre + "self_attn.attn_sub_norm.weight", "BF16", (p.num_attention_heads * p.head_dim,), "norm"))
        specs.append(TensorSpec(pre + "post_attention_layernorm.weight", "BF16", (h,), "norm"))
        for name in TERNARY_PROJECTIONS[4:]:
            specs += _projection(pre + name, proj[name])
        specs.append(TensorSpec(pre + "mlp.ffn_sub_norm.weight", "BF16", (p.intermediate_size,), "norm"))
    specs.append(TensorSpec("model.norm.weight", "BF16", (h,), "norm"))
    if not p.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", "BF16", (p.vocab_size, h), "embed"))
    return specs


def _projection(name: str, shape: tuple[int, int]) -> list[TensorSpec]:
    out, inp = shape
    return [
        TensorSpec(name + ".weight", "U8", (out // 4, inp), "packed", logical=shape),
        TensorSpec(name + ".weight_scale", "BF16", (1,), "scale"),
    ]


def plan_shards(specs: list[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Greedy split in file order, as huggingface does: a shard holds at most ``max_shard_size``
    tensor bytes unless one tensor alone is bigger."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def safetensors_header(specs: list[TensorSpec]) -> bytes:
    """The 8-byte length plus the JSON header, padded with spaces to a multiple of 8 bytes."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


# --------------------------------------------------------------------------------------------
# Values, generated in chunks
# --------------------------------------------------------------------------------------------

CHUNK_VALUES = 1 << 19  # float values per chunk (2 MiB as float32)
CHUNK_WEIGHTS = 1 << 21  # ternary weights per chunk (2 MiB of random bytes)
# random byte -> 2-bit code (weight + 1): 0..87 -> -1, 88..167 -> 0, 168..255 -> +1
_ZERO_FROM, _PLUS_FROM = 88, 168
EMBED_STD = 0.02
NORM_STD = 0.05
SCALE_RANGE = (1.0, 3.0)


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return np.random.default_rng([int(seed), *struct.unpack("<II", digest)])


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even (finite inputs)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits >> 16) & 1
    rounded += 0x7FFF
    rounded += bits
    rounded >>= 16
    return rounded.astype("<u2")


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


def _float_chunks(spec: TensorSpec, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """float32 values of a bf16 tensor (before rounding), in chunks of CHUNK_VALUES."""
    total = spec.nbytes // 2
    for start in range(0, total, CHUNK_VALUES):
        n = min(CHUNK_VALUES, total - start)
        if spec.kind == "embed":
            v = rng.standard_normal(n, dtype=np.float32)
            v *= EMBED_STD
        elif spec.kind == "norm":
            v = rng.standard_normal(n, dtype=np.float32)
            v *= NORM_STD
            v += 1.0
        elif spec.kind == "scale":
            v = rng.uniform(*SCALE_RANGE, size=n).astype(np.float32)
        else:
            raise AssertionError(spec.kind)
        yield v


def ternary_code_chunks(out_features: int, in_features: int, rng: np.random.Generator) -> Iterator[tuple[int, int, np.ndarray]]:
    """The 2-bit codes (weight + 1, uint8 0..2) of a ternary ``[out, in]`` weight, as
    ``(r0, r1, codes[4, r1 - r0, in])``: ``codes[i, j]`` is row ``r0 + j + i * out / 4`` of W.
    This order is the packed layout, so a chunk packs into ``packed[r0:r1]`` directly."""
    rows = out_features // 4
    step = max(1, CHUNK_WEIGHTS // (4 * in_features))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        u = rng.integers(0, 256, size=(4, r1 - r0, in_features), dtype=np.uint8)
        codes = (u >= _ZERO_FROM).view(np.uint8)
        codes += (u >= _PLUS_FROM).view(np.uint8)
        yield r0, r1, codes


def _pack_codes(codes: np.ndarray) -> np.ndarray:
    packed = codes[0].copy()
    for i in (1, 2, 3):
        shifted = codes[i] << (2 * i)
        packed |= shifted
    return packed


def tensor_chunks(spec: TensorSpec, seed: int) -> Iterator[np.ndarray]:
    """The stored bytes of one tensor, as little-endian numpy chunks in file order."""
    rng = tensor_rng(seed, spec.name)
    if spec.kind == "packed":
        for _, _, codes in ternary_code_chunks(*spec.logical, rng):
            yield _pack_codes(codes)
    else:
        for values in _float_chunks(spec, rng):
            yield _bf16_bits(values)


def reference_tensor(preset: str | DummyPreset, name: str, seed: int = 0) -> np.ndarray:
    """What the generator means a tensor to hold, built whole (small models only): a ternary
    projection weight as int8 ``[out, in]`` (unpacked), any other tensor as float32 (bf16 values)."""
    specs = {s.name: s for s in tensor_specs(preset)}
    if name not in specs:
        raise KeyError(name)
    spec = specs[name]
    rng = tensor_rng(seed, name)
    if spec.kind == "packed":
        out, inp = spec.logical
        w = np.empty((out, inp), dtype=np.int8)
        rows = out // 4
        for r0, r1, codes in ternary_code_chunks(out, inp, rng):
            for i in range(4):
                w[i * rows + r0 : i * rows + r1] = codes[i].astype(np.int8) - 1
        return w
    values = np.concatenate(list(_float_chunks(spec, rng)))
    return bf16_to_float32(_bf16_bits(values)).reshape(spec.shape)


# --------------------------------------------------------------------------------------------
# Config files and tokenizer
# --------------------------------------------------------------------------------------------

# Llama-3 layout of the special-token block (offsets from its first id, 128000 in Llama 3)
_SPECIAL_OFFSETS = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|start_header_id|>": 6, "<|end_header_id|>": 7, "<|eot_id|>": 9}

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def special_tokens(vocab_size: int) -> list[str]:
    """The special tokens, which take the last ids: 256 of them (Llama-3 names and offsets) when the
    vocabulary has room for 256 more regular tokens, else the first 10 of that layout."""
    count = 256 if vocab_size >= 768 else 10
    names, reserved = [], 0
    by_offset = {v: k for k, v in _SPECIAL_OFFSETS.items()}
    for offset in range(count):
        if offset in by_offset:
            names.append(by_offset[offset])
        else:
            names.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return names


def special_token_ids(vocab_size: int) -> dict[str, int]:
    names = special_tokens(vocab_size)
    base = vocab_size - len(names)
    return {name: base + _SPECIAL_OFFSETS[name] for name in _SPECIAL_OFFSETS}


def _byte_alphabet() -> list[str]:
    """GPT-2 byte-level alphabet: the character standing for each byte 0..255."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _merges(count: int, alphabet: list[str]) -> list[tuple[str, str]]:
    """``count`` deterministic BPE merges: breadth first, every token so far (starting from a
    space or a letter/digit) extended by a letter or digit, so words compress a little."""
    space = alphabet[ord(" ")]
    tails = list("etaoinshrdlcumwfgypbvkjxqz") + list("ETAOINSHRDLCUMWFGYPBVKJXQZ") + list("0123456789")
    queue = deque([space] + tails)
    merges: list[tuple[str, str]] = []
    while len(merges) < count:
        head = queue.popleft()
        for tail in tails:
            if len(merges) == count:
                break
            merges.append((head, tail))
            queue.append(head + tail)
    return merges


def build_tokenizer(vocab_size: int, model_max_length: int = 4096):
    """A byte-level BPE ``tokenizers.Tokenizer`` with exactly ``vocab_size`` ids (any text encodes)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    specials = special_tokens(vocab_size)
    regular = vocab_size - len(specials)
    alphabet = _byte_alphabet()
    merges = _merges(regular - 256, alphabet)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    assert len(vocab) == regular
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    ids = special_token_ids(vocab_size)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, ids[bos])]),
        ]
    )
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    assert tok.token_to_id("<|eot_id|>") == ids["<|eot_id|>"]
    return tok


def tokenizer_config(p: DummyPreset) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": p.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }


def model_config(p: DummyPreset) -> dict:
    """``config.json`` in the form of microsoft/bitnet-b1.58-2B-4T's."""
    ids = special_token_ids(p.vocab_size)
    return {
        "architectures": ["BitNetForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|begin_of_text|>"],
        "eos_token_id": ids["<|end_of_text|>"],
        "hidden_act": p.hidden_act,
        "hidden_size": p.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": p.intermediate_size,
        "max_position_embeddings": p.max_position_embeddings,
        "model_type": "bitnet",
        "num_attention_heads": p.num_attention_heads,
        "num_hidden_layers": p.num_hidden_layers,
        "num_key_value_heads": p.num_key_value_heads,
        "rms_norm_eps": p.rms_norm_eps,
        "rope_theta": float(p.rope_theta),
        "tie_word_embeddings": p.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": p.vocab_size,
        "quantization_config": {
            "quant_method": "bitnet",
            "linear_class": "autobitlinear",
            "quantization_mode": "offline",
        },
    }


def generation_config(p: DummyPreset) -> dict:
    ids = special_token_ids(p.vocab_size)
    return {"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

MAX_SHARD_SIZE = 5_000_000_000  # huggingface's default max_shard_size "5GB"
_DISK_MARGIN = 64 << 20  # tokenizer + config files + slack


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _progress_bar(total: int, progress: bool, desc: str):
    if not (progress and sys.stderr.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _write_shard(path: Path, specs: list[TensorSpec], seed: int, on_bytes: Callable[[int], None]) -> None:
    with open(path, "wb") as f:
        f.write(safetensors_header(specs))
        for spec in specs:
            written = 0
            for chunk in tensor_chunks(spec, seed):
                f.write(chunk.data)
                written += chunk.nbytes
                on_bytes(chunk.nbytes)
            if written != spec.nbytes:
                raise AssertionError(f"{spec.name}: wrote {written} bytes, expected {spec.nbytes}")


def _stale_outputs(out_dir: Path) -> list[Path]:
    names = {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    found = []
    for entry in out_dir.iterdir():
        n = entry.name
        if n in names or (n.startswith("model-") and n.endswith(".safetensors") and "-of-" in n):
            found.append(entry)
    return found


def write_dummy_model(
    preset_name_or_preset: str | DummyPreset,
    out_dir: Path,
    seed: int = 0,
    layers: int | None = None,
    progress: bool = True,
    *,
    max_shard_size: int = MAX_SHARD_SIZE,
) -> Path:
    """Write a dummy checkpoint of a preset into ``out_dir`` (created if missing) and return it.

    ``layers`` keeps only the first layers of the preset (same values as the full model's);
    ``max_shard_size`` (bytes of tensor data per file) splits big models into shards with an index.
    Files this writes that already exist in ``out_dir`` are replaced (stale shards removed).
    """
    p = resolve_preset(preset_name_or_preset)
    if layers is not None:
        p = p.with_layers(layers)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    if max_shard_size < 1:
        raise UserError(f"max_shard_size must be positive, got {max_shard_size!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a directory")

    specs = tensor_specs(p)
    shards = plan_shards(specs, max_shard_size)
    names = shard_names(len(shards))
    weight_bytes = sum(len(safetensors_header(s)) + sum(t.nbytes for t in s) for s in shards)
    need = weight_bytes + _DISK_MARGIN
    where = _existing_parent(out_dir)
    free = shutil.disk_usage(where).free
    if out_dir.is_dir():  # files this replaces free their space
        free += sum(f.stat().st_size for f in _stale_outputs(out_dir) if f.is_file())
    if free < need:
        raise UserError(
            f"not enough disk space for dummy model {p.name!r} ({p.num_hidden_layers} layers): "
            f"needs {_fmt_bytes(need)} at {where}, only {_fmt_bytes(free)} free"
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in _stale_outputs(out_dir):
        stale.unlink()

    temps: dict[str, Path] = {}

    def temp(name: str) -> Path:
        temps[name] = out_dir / f".{name}.partial-{os.getpid()}"
        return temps[name]

    bar = _progress_bar(sum(t.nbytes for t in specs), progress, f"{p.name} -> {out_dir.name}")
    try:
        for name, shard in zip(names, shards):
            _write_shard(temp(name), shard, int(seed), bar.update if bar else (lambda n: None))
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for t in specs)},
                "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard},
            }
            _write_json(temp("model.safetensors.index.json"), index)
        build_tokenizer(p.vocab_size).save(str(temp("tokenizer.json")))
        _write_json(temp("tokenizer_config.json"), tokenizer_config(p))
        _write_json(temp("generation_config.json"), generation_config(p))
        _write_json(temp("config.json"), model_config(p))
        # weights first, index after its shards, config.json last: only a finished directory loads
        for name, path in temps.items():
            os.replace(path, out_dir / name)
    except BaseException:
        for path in temps.values():
            path.unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return out_dir


def preset_table() -> str:
    """The presets' shapes as text, for ``bitnet-compile dummy --help``."""
    rows = [f"  {'name':7} {'hidden':>6} {'ffn':>6} {'layers':>6} {'heads':>5} {'kv':>3} {'vocab':>6}"]
    for p in PRESETS.values():
        rows.append(
            f"  {p.name:7} {p.hidden_size:6} {p.intermediate_size:6} {p.num_hidden_layers:6} "
            f"{p.num_attention_heads:5} {p.num_key_value_heads:3} {p.vocab_size:6}"
        )
    return "\n".join(rows)
