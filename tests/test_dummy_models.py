"""Dummy BitNet checkpoints: exact 2B-4T layout, readable by safetensors and transformers, seeded, streamed."""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # transformers' BitNet layers are wrapped in torch.compile

import numpy as np
import pytest

from bitnet_compile import dummy_models as dm
from bitnet_compile.errors import UserError

TINY = dm.PRESETS["tiny"]
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _torch():
    torch = pytest.importorskip("torch")
    try:
        torch._dynamo.config.disable = True  # in case torch was imported before the variable was set
    except AttributeError:
        pass
    return torch


def _transformers():
    _torch()
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load BitNet-quantized models")
    return pytest.importorskip("transformers")


def expected_tiny() -> dict[str, tuple[str, tuple[int, ...]]]:
    """Names, dtypes and shapes of the tiny preset, written out by hand."""
    h, f, q, kv, vocab = 64, 128, 4 * 16, 2 * 16, 512
    out = {"model.embed_tokens.weight": ("BF16", (vocab, h)), "model.norm.weight": ("BF16", (h,))}
    dims = {
        "q_proj": (q, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, q),
        "gate_proj": (f, h),
        "up_proj": (f, h),
        "down_proj": (h, f),
    }
    for i in range(2):
        pre = f"model.layers.{i}."
        out[pre + "input_layernorm.weight"] = ("BF16", (h,))
        out[pre + "post_attention_layernorm.weight"] = ("BF16", (h,))
        out[pre + "self_attn.attn_sub_norm.weight"] = ("BF16", (q,))
        out[pre + "mlp.ffn_sub_norm.weight"] = ("BF16", (f,))
        for proj in PROJ:
            o, k = dims[proj.split(".")[1]]
            out[pre + proj + ".weight"] = ("U8", (o // 4, k))
            out[pre + proj + ".weight_scale"] = ("BF16", (1,))
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return dm.write_dummy_model("tiny", tmp_path_factory.mktemp("tiny") / "model", seed=7, progress=False)


def _header(path: Path) -> tuple[int, dict]:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def _load(path: Path) -> dict[str, bytes]:
    """Each tensor's stored bytes, found through the header (numpy cannot hold bfloat16)."""
    n, header = _header(path)
    header.pop("__metadata__", None)
    data = path.read_bytes()[8 + n :]
    return {name: data[e["data_offsets"][0] : e["data_offsets"][1]] for name, e in header.items()}


def test_presets_are_data_with_sources():
    assert {"tiny", "125m", "350m", "1b", "1.5b", "2.7b", "3.8b", "7b", "13b", "30b", "70b", "100b", "2b-4t", "large"} <= set(dm.PRESETS)
    p = dm.PRESETS["2b-4t"]
    assert (
        p.hidden_size,
        p.num_hidden_layers,
        p.num_attention_heads,
        p.num_key_value_heads,
        p.head_dim,
        p.intermediate_size,
        p.vocab_size,
        p.hidden_act,
        p.rope_theta,
        p.rms_norm_eps,
        p.tie_word_embeddings,
        p.max_position_embeddings,
    ) == (2560, 30, 20, 5, 128, 6912, 128256, "relu2", 500000.0, 1e-5, True, 4096)
    large = dm.PRESETS["large"]
    assert (
        large.hidden_size,
        large.num_hidden_layers,
        large.num_attention_heads,
        large.num_key_value_heads,
        large.intermediate_size,
        large.vocab_size,
    ) == (1536, 24, 16, 16, 4096, 32002)
    big = dm.PRESETS["100b"]
    assert (big.hidden_size, big.intermediate_size, big.num_hidden_layers, big.num_attention_heads) == (8192, 45568, 72, 64)
    assert all(p.source for p in dm.PRESETS.values())
    assert dm.resolve_preset("7B") is dm.PRESETS["7b"]


def test_bad_preset_lists_presets(tmp_path):
    with pytest.raises(UserError, match="unknown dummy model preset 'nope'.*tiny.*100b, 2b-4t, large"):
        dm.write_dummy_model("nope", tmp_path / "m")
    with pytest.raises(UserError, match="layers"):
        dm.write_dummy_model("tiny", tmp_path / "m", layers=0)
    assert not (tmp_path / "m").exists()


def test_tiny_has_exactly_the_expected_tensors(tiny_dir):
    torch = _torch()
    from safetensors import safe_open

    expected = expected_tiny()
    path = tiny_dir / "model.safetensors"
    n, header = _header(path)
    assert n % 8 == 0 and header.pop("__metadata__") == {"format": "pt"}
    assert path.stat().st_size == 8 + n + max(e["data_offsets"][1] for e in header.values())
    dtypes = {"BF16": torch.bfloat16, "U8": torch.uint8}
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(expected)
        for name, (dtype, shape) in expected.items():
            t = f.get_tensor(name)
            assert t.dtype == dtypes[dtype] and tuple(t.shape) == shape, name
    assert sorted(p.name for p in tiny_dir.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["architectures"] == ["BitNetForCausalLM"] and cfg["model_type"] == "bitnet"
    assert cfg["hidden_act"] == "relu2" and cfg["num_hidden_layers"] == 2 and cfg["num_key_value_heads"] == 2
    assert cfg["quantization_config"] == {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}


def test_values_are_the_seeded_ternary_weights_packed_like_transformers(tiny_dir):
    torch = _torch()
    from safetensors import safe_open

    bitnet = _transformers().integrations.bitnet
    with safe_open(str(tiny_dir / "model.safetensors"), framework="pt") as f:
        for i in range(2):
            for proj in PROJ:
                name = f"model.layers.{i}.{proj}.weight"
                packed = f.get_tensor(name)
                ref = dm.reference_tensor("tiny", name, seed=7)
                assert set(np.unique(ref)) <= {-1, 0, 1}
                assert np.array_equal(bitnet.unpack_weights(packed, dtype=torch.float32).numpy(), ref), name
                assert torch.equal(bitnet.pack_weights(torch.from_numpy(ref.astype(np.int64))), packed), name
                scale = f.get_tensor(name + "_scale").float().item()
                assert 1.0 <= scale <= 3.0
        norm = f.get_tensor("model.layers.0.mlp.ffn_sub_norm.weight").float().numpy()
        assert np.array_equal(norm, dm.reference_tensor("tiny", "model.layers.0.mlp.ffn_sub_norm.weight", seed=7))
        assert abs(norm.mean() - 1) < 0.05 and norm.min() > 0.5
        emb = f.get_tensor("model.embed_tokens.weight").float().numpy()
        assert 0.015 < emb.std() < 0.025
    # the zero fraction of bitnet.cpp's absmean-quantized Gaussian weights (0.31)
    big = dm.reference_tensor("1b", "model.layers.0.mlp.down_proj.weight")
    assert abs((big == 0).mean() - 0.3125) < 0.002 and abs((big == 1).mean() - (big == -1).mean()) < 0.002


def test_transformers_loads_and_runs_it(tiny_dir):
    torch = _torch()
    transformers = _transformers()
    model = transformers.BitNetForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    layer = model.model.layers[1]
    for proj in PROJ:
        module = layer.get_submodule(proj)
        name = f"model.layers.1.{proj}.weight"
        assert type(module).__name__ == "AutoBitLinear"
        assert np.array_equal(module.weight.detach().float().numpy(), dm.reference_tensor("tiny", name, seed=7))
        assert module.weight_scale.float().item() == dm.reference_tensor("tiny", name + "_scale", seed=7)[0]
    assert np.array_equal(
        model.model.embed_tokens.weight.detach().float().numpy(), dm.reference_tensor("tiny", "model.embed_tokens.weight", seed=7)
    )
    model = model.to(torch.float32)  # embedding and norms stay bf16 as stored; .float() is refused
    ids = torch.tensor([[502, 72, 101, 108]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 4, 512) and torch.isfinite(logits).all()


def test_tokenizer_and_chat_template(tiny_dir):
    transformers = _transformers()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    assert len(tok) == TINY.vocab_size
    ids = dm.special_token_ids(TINY.vocab_size)
    assert tok.convert_tokens_to_ids("<|begin_of_text|>") == ids["<|begin_of_text|>"] == 502
    assert tok.convert_tokens_to_ids("<|eot_id|>") == ids["<|eot_id|>"] == 511
    text = "Hello wörld, 3.14 — 🚀\n\ttabs"
    enc = tok(text)["input_ids"]
    assert enc[0] == 502 and max(enc) < TINY.vocab_size
    assert tok.decode(enc, skip_special_tokens=True) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    chat = tok.apply_chat_template(messages, add_generation_prompt=True)
    chat = chat["input_ids"] if not isinstance(chat, list) else chat
    assert chat[0] == 502 and chat.count(502) == 1 and chat.count(511) == 2
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 502, "eos_token_id": [503, 511]}


def test_llama3_special_ids_for_the_2b4t_vocabulary():
    assert dm.special_token_ids(128256) == {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eot_id|>": 128009,
    }
    tok = dm.build_tokenizer(128256)
    assert tok.get_vocab_size(with_added_tokens=True) == 128256
    assert tok.id_to_token(128255) == "<|reserved_special_token_250|>"
    assert tok.decode(tok.encode("any text, ünïcode 😀").ids, skip_special_tokens=True) == "any text, ünïcode 😀"
    cfg = dm.model_config(dm.PRESETS["2b-4t"])
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["rope_theta"], cfg["max_position_embeddings"]) == (128000, 128001, 500000.0, 4096)


def test_seeded_reproducible_and_layers_override(tiny_dir, tmp_path):
    again = dm.write_dummy_model("tiny", tmp_path / "again", seed=7, progress=False)
    assert (again / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    other = dm.write_dummy_model("tiny", tmp_path / "other", seed=8, progress=False)
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()
    short = dm.write_dummy_model("tiny", tmp_path / "short", seed=7, layers=1, progress=False)
    assert json.loads((short / "config.json").read_text())["num_hidden_layers"] == 1
    full, cut = _load(tiny_dir / "model.safetensors"), _load(short / "model.safetensors")
    assert set(cut) == {n for n in expected_tiny() if ".layers.1." not in n}
    for name, value in cut.items():
        assert value == full[name], name


def test_streaming_keeps_memory_far_below_one_layer(tmp_path):
    preset = dm.PRESETS["1b"]
    layer_f32 = 4 * sum(o * k for o, k in dm.projection_shapes(preset).values())
    tracemalloc.start()
    try:
        out = dm.write_dummy_model("1b", tmp_path / "1b", layers=1, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < layer_f32 / 8, f"peak {peak / 2**20:.1f} MiB vs one layer {layer_f32 / 2**20:.0f} MiB"
    specs = dm.tensor_specs(preset.with_layers(1))
    n, _ = _header(out / "model.safetensors")
    assert (out / "model.safetensors").stat().st_size == 8 + n + sum(s.nbytes for s in specs)


def test_sharded_output_has_a_correct_index(tiny_dir, tmp_path):
    out = dm.write_dummy_model("tiny", tmp_path / "sharded", seed=7, progress=False, max_shard_size=30_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert not (out / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(expected_tiny())
    total = 0
    for shard in shards:
        _, header = _header(out / shard)
        header.pop("__metadata__")
        assert {n for n, s in index["weight_map"].items() if s == shard} == set(header)
        total += sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
    assert index["metadata"]["total_size"] == total
    merged = {}
    for shard in shards:
        merged.update(_load(out / shard))
    assert merged == _load(tiny_dir / "model.safetensors")
    torch = _torch()
    transformers = _transformers()
    model = transformers.BitNetForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert np.array_equal(
        model.model.layers[1].mlp.down_proj.weight.detach().numpy(),
        dm.reference_tensor("tiny", "model.layers.1.mlp.down_proj.weight", seed=7),
    )
    # rewriting unsharded into the same directory removes the shards and the index
    dm.write_dummy_model("tiny", out, seed=7, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny_dir.iterdir())


def test_refuses_when_the_disk_is_too_small(tmp_path, monkeypatch):
    real = dm.shutil.disk_usage
    monkeypatch.setattr(dm.shutil, "disk_usage", lambda p: real(p)._replace(free=10 << 20))
    with pytest.raises(UserError, match=r"not enough disk space .*'2b-4t'.*needs 1\.\d GiB at .*only 10\.0 MiB free"):
        dm.write_dummy_model("2b-4t", tmp_path / "big", progress=False)
    assert not (tmp_path / "big").exists()


def test_a_crash_leaves_no_complete_looking_file(tmp_path, monkeypatch):
    real = dm.tensor_chunks
    seen = []

    def failing(spec, seed):
        seen.append(spec.name)
        if len(seen) > 5:
            raise OSError("disk on fire")
        yield from real(spec, seed)

    monkeypatch.setattr(dm, "tensor_chunks", failing)
    with pytest.raises(OSError, match="disk on fire"):
        dm.write_dummy_model("tiny", tmp_path / "m", progress=False)
    assert list((tmp_path / "m").iterdir()) == []
