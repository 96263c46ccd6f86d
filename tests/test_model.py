"""Full models on compiled kernels against transformers' own implementation.

Every supported checkpoint format is built tiny, in its exact upstream layout, by
``checkpoints``; transformers loads the same directory as the reference. Tolerance: logits
agree to within 1e-3 of the largest reference logit (float32 throughout; differences come
only from summation order), and greedy generation agrees token for token over 32 tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

import checkpoints as C  # noqa: E402

from bitnet_compile import models  # noqa: E402
from bitnet_compile.artifact import build  # noqa: E402
from bitnet_compile.target import parse_target  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
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


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
    """Conversion caches of these tests live and die with the session."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BITNET_CACHE", str(tmp_path_factory.mktemp("bitnet-cache")))
    yield
    mp.undo()


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
    build(parse_target("llvm -mcpu=native"), list(linears.values()), out, model_name="zoo", output_layer=(shapes[0].vocab, shapes[0].hidden))
    return out


def _reference_dir(zoo, name: str) -> Path:
    return zoo["1bitllm-reference"] if name == "1bitllm" else zoo[name]


@pytest.fixture(scope="session")
def references(zoo) -> dict:
    return {name: C.reference_model(_reference_dir(zoo, name)) for name in FORMATS}


def _llm(zoo, artifact_dir, name, **kw):
    from bitnet_runtime.api import LLM

    return LLM(zoo[name], artifact_dir, echo=lambda line: None, **kw)


@pytest.mark.parametrize("name", FORMATS)
def test_logits_match_reference_prefill_and_decode(zoo, artifact_dir, references, name):
    want = C.reference_logits(references[name], PROMPT)
    tol = 1e-3 * np.abs(want).max()
    model = _llm(zoo, artifact_dir, name).model
    np.testing.assert_allclose(model.prefill(PROMPT), want[-1], rtol=0, atol=tol)
    model.prefill(PROMPT[:3])  # then one token at a time through the KV cache
    for i in range(3, len(PROMPT)):
        np.testing.assert_allclose(model.decode(PROMPT[i]), want[i], rtol=0, atol=tol, err_msg=f"position {i}")


@pytest.mark.parametrize("name", FORMATS)
def test_greedy_generation_matches_reference(zoo, artifact_dir, references, name):
    want = C.reference_greedy(references[name], PROMPT, 32)
    assert len(set(want)) >= 2, "the reference continuation is degenerate: the test would prove little"
    llm = _llm(zoo, artifact_dir, name)
    from bitnet_runtime.sampling import SamplingParams

    llm.tokenizer.stop_ids.clear()  # the reference ignores EOS too
    assert llm.generate(PROMPT, 32, SamplingParams()).token_ids == want


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
