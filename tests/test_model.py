"""Full models on compiled kernels against transformers' own implementation.

Every supported checkpoint format is built tiny, in its exact upstream layout, by
``checkpoints``; transformers loads the same directory as the reference. Tolerance: logits
agree to within 1e-3 of the largest reference logit (float32 throughout; differences come
only from summation order), and greedy generation agrees token for token over 32 tokens.
Both ways of decoding are held to it: the compiled decode step (one call per token, an
artifact compiled for the model) and the kernels one by one (an artifact without a step).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

import checkpoints as C  # noqa: E402
from conftest import isolated_cache  # noqa: E402

from bitnet_compile import models  # noqa: E402
from bitnet_compile.artifact import build  # noqa: E402
from bitnet_compile.target import parse_target  # noqa: E402

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
FORMATS = {
    "bitnet-packed": lambda d: C.bitnet(d),  # microsoft/bitnet-b1.58-2B-4T
    "bitnet-bf16-online": lambda d: C.bitnet(d, mode="online"),  # microsoft/bitnet-b1.58-2B-4T-bf16
    "bitnet-bitlinear-class": lambda d: C.bitnet(d, linear_class="bitlinear"),
    "bitnet-sharded": lambda d: C.bitnet(d, shards=3, seed=3),
    "llama-bitlinear": lambda d: C.llama_bitlinear(d, rope_scaling=LLAMA3_ROPE),  # HF1BitLLM Llama3-8B-1.58
    "llama-bitlinear-rms-norm": lambda d: C.llama_bitlinear(d, use_rms_norm=True, seed=4),
    "1bitllm": lambda d: C.onebit_llm(d),  # 1bitLLM/bitnet_b1_58-large
}
PROMPT = [0, 17, 33, 5, 101, 250, 7, 64, 9]


cache_dir = pytest.fixture(scope="session", autouse=True)(isolated_cache)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    dirs = {name: C.tokenizer(make(root / name)) for name, make in FORMATS.items()}
    dirs["1bitllm-reference"] = C.onebit_llm_as_bitnet(dirs["1bitllm"], root / "1bitllm-reference")
    return dirs


@pytest.fixture(scope="session")
def artifact_dir(zoo, tmp_path_factory) -> Path:
    """One artifact for every format: the union of their linear shapes, one output layer."""
    shapes = [models.from_model_dir(d) for d in zoo.values()]
    linears = {(lin.n, lin.k): lin for s in shapes for lin in s.linears()}
    out = tmp_path_factory.mktemp("artifact")
    build(
        parse_target("llvm -mcpu=native"), list(linears.values()), out, model_name="zoo", output_layer=(shapes[0].vocab, shapes[0].hidden)
    )
    return out


@pytest.fixture(scope="session")
def step_artifacts(zoo, tmp_path_factory) -> dict[str, Path]:
    """Per model, an artifact compiled for it alone, with its decode step (models of the same
    shapes and decoder share one)."""
    built, out = {}, {}
    for name, model_dir in zoo.items():
        shape = models.from_model_dir(model_dir)
        key = (shape.linear_shapes, shape.vocab, shape.decoder)
        if key not in built:
            built[key] = tmp_path_factory.mktemp("step-artifact")
            output = (shape.vocab, shape.hidden)
            build(
                parse_target("llvm -mcpu=native"), shape.linears(), built[key], model_name=name, output_layer=output, decoder=shape.decoder
            )
        out[name] = built[key]
    return out


def _artifact(request, name: str, decoding: str) -> Path:
    """The artifact for ``decoding``: "step" (compiled decode step) or "kernels" (one by one)."""
    if decoding == "kernels":
        return request.getfixturevalue("artifact_dir")
    if models.from_model_dir(request.getfixturevalue("zoo")[name]).decoder is None:
        pytest.skip("the decode step does not cover per-projection input norms")
    return request.getfixturevalue("step_artifacts")[name]


def _reference_dir(zoo, name: str) -> Path:
    return zoo["1bitllm-reference"] if name == "1bitllm" else zoo[name]


@pytest.fixture(scope="session")
def references(zoo) -> dict:
    return {name: C.reference_model(_reference_dir(zoo, name)) for name in FORMATS}


def _llm(zoo, artifact_dir, name, **kw):
    from bitnet_runtime.api import LLM

    return LLM(zoo[name], artifact_dir, echo=lambda line: None, **kw)


@pytest.mark.parametrize("decoding", ["step", "kernels"])
@pytest.mark.parametrize("name", FORMATS)
def test_logits_match_reference_prefill_and_decode(request, zoo, references, name, decoding):
    want = C.reference_logits(references[name], PROMPT)
    tol = 1e-3 * np.abs(want).max()
    model = _llm(zoo, _artifact(request, name, decoding), name).model
    assert (model.step is not None) == (decoding == "step")
    np.testing.assert_allclose(model.prefill(PROMPT), want[-1], rtol=0, atol=tol)
    model.prefill(PROMPT[:3])  # then one token at a time through the KV cache
    for i in range(3, len(PROMPT)):
        np.testing.assert_allclose(model.decode(PROMPT[i]), want[i], rtol=0, atol=tol, err_msg=f"position {i}")


@pytest.mark.parametrize("decoding", ["step", "kernels"])
@pytest.mark.parametrize("name", FORMATS)
def test_greedy_generation_matches_reference(request, zoo, references, name, decoding):
    want = C.reference_greedy(references[name], PROMPT, 32)
    assert len(set(want)) >= 2, "the reference continuation is degenerate: the test would prove little"
    llm = _llm(zoo, _artifact(request, name, decoding), name)
    from bitnet_runtime.sampling import SamplingParams

    llm.tokenizer.stop_ids.clear()  # the reference ignores EOS too
    assert llm.generate(PROMPT, 32, SamplingParams()).token_ids == want


def test_decode_step_runs_without_the_compiler(zoo, step_artifacts):
    """The device runtime alone (tvm blocked) runs the compiled decode step, and its logits
    are the kernel-by-kernel path's."""
    from conftest import run_without_tvm

    code = (
        "import numpy as np\nfrom bitnet_runtime.api import LLM\n"
        f"m = LLM({str(zoo['bitnet-packed'])!r}, {str(step_artifacts['bitnet-packed'])!r}, echo=lambda line: None).model\n"
        "assert m.step is not None\n"
        f"m.prefill({PROMPT[:4]!r}); step = [m.decode(t) for t in {PROMPT[4:]!r}]\n"
        f"m.compiled_step = False; m.prefill({PROMPT[:4]!r}); kernels = [m.decode(t) for t in {PROMPT[4:]!r}]\n"
        "print(max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(step, kernels)))\n"
    )
    result = run_without_tvm(code)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.split()[-1]) < 1e-5


def test_second_start_uses_the_conversion_cache(zoo, artifact_dir):
    lines = []
    from bitnet_runtime.api import LLM

    LLM(zoo["bitnet-packed"], artifact_dir, echo=lines.append)
    LLM(zoo["bitnet-packed"], artifact_dir, echo=lines.append)
    assert "using converted weights" in lines[-1]


def test_int8_output_layer_agrees_with_f16(zoo, artifact_dir):
    exact = _llm(zoo, artifact_dir, "llama-bitlinear").model
    quantized = _llm(zoo, artifact_dir, "llama-bitlinear", output="i8").model
    h = exact.hidden(PROMPT)
    a, b = exact.output(h), quantized.output(h)
    assert np.argmax(a) == np.argmax(b)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


def test_text_generation_end_to_end(zoo, artifact_dir):
    llm = _llm(zoo, artifact_dir, "bitnet-packed")
    pieces = []
    result = llm.generate("the quick brown fox", 12, on_text=pieces.append)
    assert result.prompt_ids[0] == llm.tokenizer.bos_id and len(result.token_ids) <= 12
    assert "".join(pieces) == result.text


# ---- bad input: every case is one clear UserError, never a crash ----


def _copy(zoo, tmp_path, name="bitnet-packed") -> Path:
    import shutil

    return Path(shutil.copytree(zoo[name], tmp_path / "model"))


def _fails(zoo, artifact_dir, model_dir, message: str) -> None:
    from bitnet_runtime.api import LLM
    from bitnet_runtime.errors import UserError

    with pytest.raises(UserError, match=message):
        LLM(model_dir, artifact_dir, echo=lambda line: None).generate("hello", 4)


def _edit_json(path: Path, **changes) -> None:
    import json

    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_missing_model_directory(zoo, artifact_dir, tmp_path):
    _fails(zoo, artifact_dir, tmp_path / "nope", "neither a directory nor a hub id")


def test_directory_without_config(zoo, artifact_dir, tmp_path):
    _fails(zoo, artifact_dir, tmp_path, "has no config.json")


def test_missing_weights(zoo, artifact_dir, tmp_path):
    d = _copy(zoo, tmp_path)
    (d / "model.safetensors").unlink()
    _fails(zoo, artifact_dir, d, "no weights in")


def test_truncated_safetensors(zoo, artifact_dir, tmp_path):
    d = _copy(zoo, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    _fails(zoo, artifact_dir, d, "truncated")


def test_corrupted_safetensors_header(zoo, artifact_dir, tmp_path):
    d = _copy(zoo, tmp_path)
    data = bytearray((d / "model.safetensors").read_bytes())
    data[8:40] = b"\xff" * 32
    (d / "model.safetensors").write_bytes(bytes(data))
    _fails(zoo, artifact_dir, d, "corrupted")


def test_missing_shard(zoo, artifact_dir, tmp_path):
    d = _copy(zoo, tmp_path, "bitnet-sharded")
    next(d.glob("model-00002-*.safetensors")).unlink()
    _fails(zoo, artifact_dir, d, "shard")


def test_shape_mismatch_reported_by_the_reader(zoo, tmp_path):
    from bitnet_runtime import checkpoint
    from bitnet_runtime.errors import UserError
    from bitnet_runtime.model_config import load_config
    from bitnet_runtime.safetensors_file import Checkpoint

    d = _copy(zoo, tmp_path)
    _edit_json(d / "config.json", intermediate_size=128)
    config = load_config(d)
    with pytest.raises(UserError, match="config.json implies"):
        checkpoint.group_weights(Checkpoint(d), config, 0, config.linear_groups()[2])


def test_invalid_packed_value(zoo, tmp_path):
    from bitnet_runtime import checkpoint
    from bitnet_runtime.errors import UserError

    with pytest.raises(UserError, match="corrupted"):
        checkpoint.unpack_rows(np.full((2, 4), 0xFF, np.uint8), 8)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "unsupported architecture"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act"),
        ({"quantization_config": {"quant_method": "gptq"}}, "unsupported quant_method"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "unsupported rope scaling"),
        ({"num_key_value_heads": 3}, "inconsistent sizes"),
    ],
)
def test_unsupported_configs(zoo, artifact_dir, tmp_path, change, message):
    d = _copy(zoo, tmp_path)
    _edit_json(d / "config.json", **change)
    _fails(zoo, artifact_dir, d, message)


def test_missing_tokenizer(zoo, artifact_dir, tmp_path):
    d = _copy(zoo, tmp_path)
    (d / "tokenizer.json").unlink()
    _fails(zoo, artifact_dir, d, "tokenizer.json")


def test_prompt_longer_than_the_context(zoo, artifact_dir):
    from bitnet_runtime.errors import UserError

    llm = _llm(zoo, artifact_dir, "bitnet-packed", context=8)
    with pytest.raises(UserError, match="context holds only 8"):
        llm.generate(list(range(1, 12)), 4)


def test_hub_id_offline_and_not_cached_names_the_id(zoo, artifact_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _fails(zoo, artifact_dir, "someone/bitnet-model", "someone/bitnet-model: HF_HUB_OFFLINE is set")


def test_hub_id_from_the_cache_offline(zoo, artifact_dir, tmp_path):
    """A snapshot in huggingface_hub's cache layout is found by its id with the hub offline
    (a fresh process: huggingface_hub reads its cache location once, at import)."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--someone--bitnet-model"
    shutil.copytree(zoo["bitnet-packed"], repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    cmd = [
        sys.executable,
        "-m",
        "bitnet_compile.cli",
        "run",
        "-m",
        "someone/bitnet-model",
        "-a",
        str(artifact_dir),
        "-p",
        "hello",
        "-n",
        "4",
        "--json",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["ids"]) == 4


def test_artifact_for_another_model(zoo, tmp_path):
    from bitnet_runtime.errors import UserError

    other = tmp_path / "artifact"
    build(parse_target("llvm -mcpu=native"), [models.Linear("x", 16, 16)], other)
    with pytest.raises(UserError, match="compile the artifact for this model"):
        _llm(zoo, other, "bitnet-packed")


def test_conversion_key_ignores_knobs_that_do_not_change_the_packing():
    from dataclasses import replace

    from bitnet_runtime.manifest import LinearEntry
    from bitnet_runtime.weights import _packing

    entry = LinearEntry("x", 64, 64, 64, 64, "dot2-v1", {"token_tile": 8}, {})
    assert _packing(entry) == _packing(replace(entry, layout_params={"token_tile": 4}))
    lut = LinearEntry("x", 64, 64, 64, 64, "lut4-v1", {"rows": 64, "kblock": 16}, {})
    assert _packing(lut) != _packing(replace(lut, layout_params={"rows": 64, "kblock": 32}))
    # the key of format 2's dict entries: converted weights in the cache stay valid
    assert _packing(lut) == {"n": 64, "k": 64, "n_padded": 64, "k_padded": 64, "layout": "lut4-v1", "params": {"rows": 64, "kblock": 16}}


def test_row_reader_reads_rows_without_mapping(tmp_path):
    from bitnet_runtime.weights import RowReader

    matrix = np.random.default_rng(0).standard_normal((37, 24)).astype(np.float16)
    np.save(tmp_path / "m.npy", matrix)
    rows = RowReader(tmp_path / "m.npy")
    np.testing.assert_array_equal(rows[[5, 0, 36, 5]], matrix[[5, 0, 36, 5]])


def test_interrupted_conversion_is_redone(zoo, artifact_dir, tmp_path, monkeypatch):
    """A crash mid-conversion (here: in the second layer) leaves nothing that is used later."""
    from bitnet_runtime import checkpoint, weights
    from bitnet_runtime.api import LLM

    monkeypatch.setenv("BITNET_CACHE", str(tmp_path / "cache"))
    d = _copy(zoo, tmp_path)
    real = checkpoint.group_weights
    calls = []

    def crash(ckpt, config, layer, group):
        calls.append(layer)
        if layer == 1:
            raise KeyboardInterrupt
        return real(ckpt, config, layer, group)

    monkeypatch.setattr(checkpoint, "group_weights", crash)
    with pytest.raises(KeyboardInterrupt):
        LLM(d, artifact_dir, echo=lambda line: None)
    monkeypatch.setattr(checkpoint, "group_weights", real)
    lines = []
    result = LLM(d, artifact_dir, echo=lines.append).generate(PROMPT, 4)
    assert "converting" in lines[0] and len(result.token_ids) == 4
    converted = [p for p in (tmp_path / "cache" / "converted").iterdir() if p.is_dir()]
    assert len(converted) == 1 and (converted[0] / weights.META_FILE).is_file()


def _converted_dirs(cache: Path) -> list[Path]:
    return [p for p in (cache / "converted").iterdir() if p.is_dir()]


def test_a_checkpoint_replaced_with_the_same_size_and_mtime_converts_again(zoo, artifact_dir, tmp_path, monkeypatch):
    """cp -p / rsync -a keep name, size and mtime: the content hash still tells the files apart."""
    from bitnet_runtime.api import LLM

    monkeypatch.setenv("BITNET_CACHE", str(tmp_path / "cache"))
    d = _copy(zoo, tmp_path)
    LLM(d, artifact_dir, echo=lambda line: None)
    weights_file = d / "model.safetensors"
    st = weights_file.stat()
    other = C.bitnet(tmp_path / "other", seed=11)  # same shapes, other weights
    assert (other / "model.safetensors").stat().st_size == st.st_size
    shutil.copyfile(other / "model.safetensors", weights_file)
    os.utime(weights_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    lines = []
    LLM(d, artifact_dir, echo=lines.append)
    assert "converting" in lines[0] and len(_converted_dirs(tmp_path / "cache")) == 2


def test_damaged_converted_weights_are_converted_again(zoo, artifact_dir, tmp_path, monkeypatch):
    from bitnet_runtime import weights
    from bitnet_runtime.api import LLM

    monkeypatch.setenv("BITNET_CACHE", str(tmp_path / "cache"))
    d = _copy(zoo, tmp_path)
    want = LLM(d, artifact_dir, echo=lambda line: None).generate(PROMPT, 4).token_ids
    (converted,) = _converted_dirs(tmp_path / "cache")
    target = converted / "layers.0.qkv.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x55
    target.write_bytes(bytes(data))
    weights._VERIFIED.clear()  # as a new process would
    lines = []
    got = LLM(d, artifact_dir, echo=lines.append).generate(PROMPT, 4).token_ids
    assert "damaged (layers.0.qkv.npy does not match its sha256): converting again" in lines[0]
    assert got == want


def test_a_failed_conversion_leaves_nothing_and_is_one_line(zoo, artifact_dir, tmp_path, monkeypatch):
    from bitnet_runtime import weights
    from bitnet_runtime.api import LLM
    from bitnet_runtime.errors import UserError

    monkeypatch.setenv("BITNET_CACHE", str(tmp_path / "cache"))
    d = _copy(zoo, tmp_path)
    real = weights._save

    def full(directory, name, array):
        if name.startswith("layers.1."):
            raise OSError(28, "No space left on device")
        return real(directory, name, array)

    monkeypatch.setattr(weights, "_save", full)
    with pytest.raises(UserError, match="No space left on device"):
        LLM(d, artifact_dir, echo=lambda line: None)
    assert _converted_dirs(tmp_path / "cache") == []
    monkeypatch.setattr(weights.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(UserError, match="not enough disk space"):
        LLM(d, artifact_dir, echo=lambda line: None)


def test_partial_conversions_of_dead_processes_are_swept(zoo, artifact_dir, tmp_path, monkeypatch):
    from bitnet_runtime.api import LLM

    monkeypatch.setenv("BITNET_CACHE", str(tmp_path / "cache"))
    stale = tmp_path / "cache" / "converted" / "0123abcd.partial-999999999"
    stale.mkdir(parents=True)
    (stale / "layers.0.qkv.npy").write_bytes(b"half")
    LLM(_copy(zoo, tmp_path), artifact_dir, echo=lambda line: None)
    assert not stale.exists()
