"""Fuzzing the runtime's boundaries with hypothesis: manifests, config.json, safetensors
headers, tokenizer configs and chat templates, prompts and sampling settings, each mutated at
random (a value replaced by any JSON value, or removed), and whole checkpoints (header
mutated, data bytes flipped, file cut short) loaded and run. The only allowed outcomes are
success or a UserError (the CLI's one-line ``error:``, exit 2); any other exception is a bug.
Derandomized, so a CI run is reproducible; about 3000 cases in all (pytest
--hypothesis-show-statistics shows which errors they hit)."""

from __future__ import annotations

import copy
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bitnet_runtime.errors import UserError  # noqa: E402

FUZZ = settings(
    max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def _paths(obj, prefix=()):
    """Every path to a value inside a JSON tree."""
    if prefix:
        yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield from _paths(value, (*prefix, key))


@st.composite
def mutated(draw, base: dict) -> dict:
    """``base`` with one to three values replaced by random JSON values or removed."""
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(data))))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON)
    return data


def _only_user_errors(action) -> None:
    try:
        action()
        event("ran")
    except UserError as err:
        event("error: " + re.sub(r"/\S+", "PATH", str(err))[:50])  # pytest --hypothesis-show-statistics: what the cases hit


# ----------------------------------------------------------------------------- manifest


def _manifest_json() -> dict:
    from test_manifest import _manifest

    return _manifest().to_json()


@FUZZ
@given(mutated(_manifest_json()))
def test_fuzzed_manifests(data):
    """With the digest made to match, so the typed checks behind it are what is exercised."""
    from bitnet_runtime.manifest import Manifest, digest_of

    data["digest"] = digest_of(data)
    _only_user_errors(lambda: Manifest.from_json(data))


@FUZZ
@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_fuzzed_manifest_files(tmp_path_factory, raw):
    from bitnet_runtime.manifest import read_manifest

    d = tmp_path_factory.mktemp("m")
    (d / "manifest.json").write_bytes(raw)
    _only_user_errors(lambda: read_manifest(d))


# ----------------------------------------------------------------------------- config.json


def _config_json() -> dict:
    from bitnet_compile.dummy_models import PRESETS, model_config

    return model_config(PRESETS["tiny"])


@FUZZ
@given(mutated(_config_json()))
def test_fuzzed_configs(tmp_path_factory, cfg):
    from bitnet_runtime.model_config import load_config

    d = tmp_path_factory.mktemp("c")
    (d / "config.json").write_text(json.dumps(cfg))

    def load():
        config = load_config(d)
        config.linear_shapes()
        assert np.isfinite(config.inv_freq()).all()

    _only_user_errors(load)


# ----------------------------------------------------------------------------- safetensors


def _safetensors(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


BASE_HEADER = {
    "__metadata__": {"format": "pt"},
    "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "b": {"dtype": "U8", "shape": [4], "data_offsets": [24, 28]},
    "c": {"dtype": "BF16", "shape": [2], "data_offsets": [28, 32]},
}


@FUZZ
@given(mutated(BASE_HEADER), st.integers(0, 40))
def test_fuzzed_safetensors_headers(tmp_path_factory, header, data_size):
    from bitnet_runtime.safetensors_file import SafetensorsFile

    path = tmp_path_factory.mktemp("s") / "model.safetensors"
    path.write_bytes(_safetensors(header, bytes(range(data_size))))

    def read():
        f = SafetensorsFile(path)
        for name in f.entries:
            f.tensor(name)

    _only_user_errors(read)


# ----------------------------------------------------------------------------- tokenizer, chat template, prompts


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from bitnet_compile.dummy_models import PRESETS, build_tokenizer, model_config, tokenizer_config

    d = tmp_path_factory.mktemp("tok")
    p = PRESETS["tiny"]
    build_tokenizer(p.vocab_size).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(p)))
    (d / "config.json").write_text(json.dumps(model_config(p)))
    return d


def _tokenizer_config() -> dict:
    from bitnet_compile.dummy_models import PRESETS, tokenizer_config

    return tokenizer_config(PRESETS["tiny"])


@FUZZ
@given(mutated(_tokenizer_config()))
def test_fuzzed_tokenizer_configs(tokenizer_dir, tmp_path_factory, cfg):
    import shutil

    from bitnet_runtime.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("t")
    for name in ("tokenizer.json", "config.json"):
        shutil.copy(tokenizer_dir / name, d / name)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))

    def use():
        tok = Tokenizer.from_dir(d)
        tok.decode(tok.encode("hello world"))
        tok.render_chat([{"role": "user", "content": "hi"}])

    _only_user_errors(use)


@FUZZ
@given(st.text(max_size=40) | st.text(alphabet=st.characters(codec=None), max_size=10))
def test_fuzzed_prompts(tokenizer_dir, text):
    from bitnet_runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tokenizer_dir)
    _only_user_errors(lambda: tok.decode(tok.encode(text)))


@FUZZ
@given(
    st.floats() | st.integers(-5, 10**6) | st.text(max_size=3),
    st.floats() | st.integers(-5, 10**6),
    st.floats() | st.integers(-5, 10**6),
    st.lists(st.floats(width=32), min_size=1, max_size=20),
)
def test_fuzzed_sampling(temperature, top_k, top_p, logits):
    from bitnet_runtime.sampling import Sampler, SamplingParams

    def sample():
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
        values = np.array(logits, np.float32)
        if not np.isfinite(values).all():
            return  # the model stops with an error before sampling non-finite logits
        token = Sampler(params).sample(values)
        assert 0 <= token < len(logits)

    _only_user_errors(sample)


# ----------------------------------------------------------------------------- whole checkpoints


def _split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    size = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


@st.composite
def mutated_checkpoint(draw, raw: bytes) -> bytes:
    """A whole model.safetensors changed as a broken download or a bad export would change it:
    its header mutated (names, dtypes, shapes, offsets), bytes of its data flipped (weights,
    scales, norms: NaN, Inf and huge values among them), or the file cut short."""
    header, data = _split_safetensors(raw)
    kind = draw(st.sampled_from(["header", "flip", "truncate"]))
    if kind == "header":
        return _safetensors(draw(mutated(header)), data)
    if kind == "truncate":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return _safetensors(header, bytes(data))


CHECKPOINT_FUZZ = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


@CHECKPOINT_FUZZ
@given(st.data())
def test_fuzzed_checkpoints_through_the_api(cli_model, tmp_path_factory, data):
    """The tiny model with its safetensors file mutated, loaded (converted, every array
    checked) and run for a few tokens through the Python API: it runs, or it is a UserError
    (NaN or Inf in norms and logits included), never another exception."""
    import os
    import shutil
    from unittest import mock

    from bitnet_runtime.api import LLM
    from bitnet_runtime.sampling import SamplingParams

    work = tmp_path_factory.mktemp("ckpt")
    model = Path(shutil.copytree(cli_model / "model", work / "model"))
    path = model / "model.safetensors"
    path.write_bytes(data.draw(mutated_checkpoint(path.read_bytes())))
    greedy = SamplingParams(temperature=0)
    with mock.patch.dict(os.environ, {"BITNET_CACHE": str(cli_model / "cache")}):
        _only_user_errors(lambda: LLM(model, cli_model / "art", echo=lambda line: None).generate("hello", 3, greedy))


# ----------------------------------------------------------------------------- whole commands


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    """A tiny dummy model and its artifact, made once, for the command-line fuzz."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("cli-fuzz")
    env = _cli_env(root)
    for args in (["dummy", "tiny", "-o", str(root / "model")], ["-m", str(root / "model"), "-o", str(root / "art")]):
        done = subprocess.run([sys.executable, "-m", "bitnet_compile", *args], capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr
    return root


def _cli_env(root: Path) -> dict:
    import os

    return dict(os.environ, BITNET_CACHE=str(root / "cache"), TVM_NUM_THREADS="1")


CLI_FUZZ = settings(max_examples=16, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@CLI_FUZZ
@given(st.sampled_from(["config.json", "tokenizer_config.json", "manifest.json", "model.safetensors"]), st.data())
def test_fuzzed_files_through_the_device_command(cli_model, tmp_path_factory, name, data):
    """``bitnet-runtime run`` on a copy of the model and artifact with one file mutated:
    exit 0, or exit 2 with one ``error:`` line, within a time limit."""
    import shutil
    import subprocess
    import sys

    from bitnet_runtime.manifest import digest_of

    work = tmp_path_factory.mktemp("case")
    model, art = Path(shutil.copytree(cli_model / "model", work / "model")), Path(shutil.copytree(cli_model / "art", work / "art"))
    path = (art if name == "manifest.json" else model) / name
    if name == "model.safetensors":
        path.write_bytes(data.draw(mutated_checkpoint(path.read_bytes())))
    else:
        mutated_json = data.draw(mutated(json.loads(path.read_text())))
        if name == "manifest.json" and data.draw(st.booleans()):
            mutated_json["digest"] = digest_of(mutated_json)  # a deliberate edit: the typed checks must hold
        path.write_text(json.dumps(mutated_json))
    cmd = [sys.executable, "-m", "bitnet_runtime", "run", "-a", str(art), "-m", str(model), "-p", "hello", "-n", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_cli_env(cli_model), timeout=120, cwd=work)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0 or (done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: ")), done.stderr
