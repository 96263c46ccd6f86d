"""Tiny checkpoints in the exact upstream formats, built by the tests themselves.

Each writer makes a random full-precision model with transformers' own classes, then stores
it the way the real repositories do: tensor names, dtypes (bfloat16), config.json fields and,
for packed formats, transformers' own ``pack_weights``. The reference each test compares
against is transformers loading that directory (``reference_model``), never our reading of it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # transformers' BitLinear is torch.compile'd; eager is enough

import numpy as np

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=128,
)
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _torch():
    import torch

    return torch


def _random_state(model_cls, config, seed: int) -> dict:
    """A random state dict with well-separated logits, norms near 1, and
    linears large enough (std 0.2) that the layers, not the embedding alone, pick the next token."""
    torch = _torch()
    torch.manual_seed(seed)
    model = model_cls(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    for name, value in state.items():
        if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            # a tied embedding as large as the layers' outputs would make every token predict itself
            std = 0.2 if config.tie_word_embeddings else 1.0
            state[name] = std * torch.randn(value.shape, generator=gen)
        elif value.ndim == 1:
            state[name] = 1 + 0.2 * torch.randn(value.shape, generator=gen)
        elif name.endswith("_proj.weight"):
            state[name] = 0.2 * torch.randn(value.shape, generator=gen)
    return state


def _absmean(weight):
    w = weight.float()
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * scale).round().clamp(-1, 1), scale


def _packed(state: dict, linear_class: str, dtype: str = "bfloat16") -> dict:
    """Linear weights as transformers' pack_weights stores them, with the class's weight_scale;
    every other tensor in ``dtype``."""
    torch = _torch()
    from transformers.integrations.bitnet import pack_weights

    out = {}
    for name, value in state.items():
        if name.endswith("_proj.weight"):
            ternary, scale = _absmean(value)
            out[name] = pack_weights(ternary.to(torch.int8).clone())
            ws = 1.0 / scale if linear_class == "autobitlinear" else scale
            out[name.replace(".weight", ".weight_scale")] = ws.reshape(1).to(torch.bfloat16)
        else:
            out[name] = value.to(getattr(torch, dtype))
    return out


def _save(model_dir: Path, state: dict, config: dict, shards: int = 1) -> Path:
    from safetensors.torch import save_file

    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if shards == 1:
        save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = sorted(state)
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: state[n] for n in part}, str(model_dir / file), metadata={"format": "pt"})
            weight_map |= {n: file for n in part}
        (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    (model_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 2]}))
    return model_dir


def bitnet(
    model_dir: Path,
    seed: int = 0,
    mode: str = "offline",
    linear_class: str = "autobitlinear",
    shards: int = 1,
    dtype: str = "bfloat16",
    **overrides,
) -> Path:
    """microsoft/bitnet-b1.58-2B-4T (mode offline: packed) or its -bf16 variant (online); the
    float tensors (embedding, norms, online linears) in ``dtype`` (the hub's are bfloat16)."""
    from transformers import BitNetConfig, BitNetForCausalLM

    fields = (
        dict(TINY, hidden_act="relu2", tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, rope_theta=500000.0)
        | overrides
    )
    state = _random_state(BitNetForCausalLM, BitNetConfig(**fields), seed)
    if fields.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    state = _packed(state, linear_class, dtype) if mode == "offline" else {k: v.to(getattr(_torch(), dtype)) for k, v in state.items()}
    quant = {"quant_method": "bitnet", "linear_class": linear_class, "quantization_mode": mode}
    config = {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet", **fields, "quantization_config": quant}
    return _save(model_dir, state, config, shards)


def llama_bitlinear(model_dir: Path, seed: int = 0, use_rms_norm: bool = False, rope_scaling: dict | None = None) -> Path:
    """HF1BitLLM/Llama3-8B-1.58 and Falcon3-*-1.58bit: Llama with packed BitLinear layers."""
    torch = _torch()
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(TINY, hidden_act="silu", tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, rope_theta=10000.0)
    if rope_scaling:
        fields["rope_scaling"] = rope_scaling
    state = _packed(_random_state(LlamaForCausalLM, LlamaConfig(**fields), seed), "bitlinear")
    quant = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline", "modules_to_not_convert": ["lm_head"]}
    if use_rms_norm:
        quant |= {"use_rms_norm": True, "rms_norm_eps": 1e-5}
        gen = torch.Generator().manual_seed(seed + 2)
        for name in [n for n in state if n.endswith("_proj.weight")]:
            state[name.replace(".weight", ".rms_norm.weight")] = (1 + 0.2 * torch.randn(state[name].shape[1], generator=gen)).to(
                torch.bfloat16
            )
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **fields, "quantization_config": quant}
    return _save(model_dir, state, config)


def onebit_llm(model_dir: Path, seed: int = 0) -> Path:
    """1bitLLM/bitnet_b1_58-large: float16 full-precision weights, sub-norms inner_attn_ln /
    ffn_layernorm, SiLU, an untied lm_head, and no quantization_config (remote code)."""
    torch = _torch()
    from transformers import BitNetConfig, BitNetForCausalLM

    fields = dict(TINY, hidden_act="silu", tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, rope_theta=10000.0)
    state = _random_state(BitNetForCausalLM, BitNetConfig(**fields), seed)
    renamed = {
        k.replace("attn_sub_norm", "inner_attn_ln").replace("ffn_sub_norm", "ffn_layernorm"): v.to(torch.float16) for k, v in state.items()
    }
    config = {"architectures": ["BitnetForCausalLM"], "model_type": "llama", **fields, "weight_bits": 1, "input_bits": 8}
    return _save(model_dir, renamed, config)


def onebit_llm_as_bitnet(src: Path, dst: Path) -> Path:
    """The same weights renamed to transformers' BitNet class (online absmean, as 1bitLLM's
    BitLinear does), so transformers can serve as the reference for the 1bitLLM format."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    state = load_file(str(src / "model.safetensors"))
    state = {k.replace("inner_attn_ln", "attn_sub_norm").replace("ffn_layernorm", "ffn_sub_norm"): v for k, v in state.items()}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config |= {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet"}
    config["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def tokenizer(model_dir: Path, vocab_size: int = TINY["vocab_size"]) -> Path:
    """A byte-level BPE tokenizer.json with Llama-3 special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    text = ["the quick brown fox jumps over the lazy dog", "hello world, ternary weights are small", "tok tok tok"] * 20
    tok.train_from_iterator(text, trainer)
    bos = tok.token_to_id(SPECIAL[0])
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIAL[0]} $A", special_tokens=[(SPECIAL[0], bos)])
    tok.save(str(model_dir / "tokenizer.json"))
    config = {
        "bos_token": SPECIAL[0],
        "eos_token": SPECIAL[1],
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return model_dir


def reference_model(model_dir: Path):
    """transformers' own implementation of the checkpoint, in float32 on the CPU."""
    torch = _torch()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    for tensor in [*model.parameters(), *model.buffers()]:  # the quantizer leaves some in bfloat16
        if tensor.is_floating_point():
            tensor.data = tensor.data.float()
    return model.eval()


def reference_logits(model, ids: list[int]) -> np.ndarray:
    """Logits of every position of one forward pass over ``ids``: [len(ids), vocab]."""
    torch = _torch()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def reference_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    torch = _torch()
    with torch.no_grad():
        prompt = torch.tensor([ids])  # an explicit mask: generate would take BOS (id 0 = pad here) for padding
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()
