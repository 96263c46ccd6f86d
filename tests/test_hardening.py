"""Bad inputs at the runtime's boundaries (issue 13): each a one-line error that names the
problem, never a traceback, a hang or silently wrong output. Config fields typed and ranged,
safetensors headers and sharded indexes checked (types, overlaps, paths confined to the model
directory, regular files only), NaN/Inf caught, thread counts capped, tiny temperatures."""

from __future__ import annotations

import json
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
from bitnet_runtime.errors import UserError  # noqa: E402

cache_dir = pytest.fixture(scope="module", autouse=True)(isolated_cache)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny float32 BitNet checkpoint (numpy can rewrite every tensor of it)."""
    return C.tokenizer(C.bitnet(tmp_path_factory.mktemp("hardening") / "m", dtype="float32"))


@pytest.fixture(scope="module")
def artifact_dir(model, tmp_path_factory) -> Path:
    shape = models.from_model_dir(model)
    out = tmp_path_factory.mktemp("artifact")
    build(parse_target("llvm -mcpu=native"), shape.linears(), out, output_layer=(shape.vocab, shape.hidden), decoder=shape.decoder)
    return out


@pytest.fixture
def copy(model, tmp_path) -> Path:
    return Path(shutil.copytree(model, tmp_path / "copy"))


def _llm(model_dir: Path, artifact_dir: Path, output: str = "f16"):
    from bitnet_runtime.api import LLM

    return LLM(model_dir, artifact_dir, output=output, echo=lambda line: None)


def _edit_config(d: Path, **changes) -> None:
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"hidden_size": "64"}, "hidden_size must be an integer"),
        ({"num_hidden_layers": True}, "num_hidden_layers must be an integer"),
        ({"intermediate_size": 12.5}, "intermediate_size must be an integer"),
        ({"max_position_embeddings": 0}, "max_position_embeddings must be an integer >= 1"),
        ({"rope_theta": 0}, "rope_theta must be a finite number > 0"),
        ({"rope_theta": "1e4"}, "rope_theta must be a finite number"),
        ({"rms_norm_eps": -1e-5}, "rms_norm_eps must be a finite number > 0"),
        ({"rope_parameters": [1, 2]}, "rope_parameters must be a JSON object"),
    ],
)
def test_config_fields_are_typed_and_ranged(copy, changes, message):
    from bitnet_runtime.model_config import load_config

    _edit_config(copy, **changes)
    with pytest.raises(UserError, match=message):
        load_config(copy)


def test_a_rope_theta_too_small_for_float32_is_an_error(copy):
    """Positive, so it passes the range check, but theta ** (i / d) underflows to 0 and the
    frequencies to Inf: every rotation would be NaN (found by the config fuzz)."""
    from bitnet_runtime.model_config import load_config

    _edit_config(copy, rope_theta=1.3e-232)
    with pytest.raises(UserError, match="non-finite rotary frequencies"):
        load_config(copy).inv_freq()


def _rewrite(path: Path, edit) -> None:
    """Apply ``edit`` to the header of a safetensors file (data unchanged)."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size :])


def _first(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _overlap(header: dict) -> None:
    names = [k for k in header if k != "__metadata__"]
    a, b = (header[n] for n in names[:2])
    if a["data_offsets"][1] - a["data_offsets"][0] == b["data_offsets"][1] - b["data_offsets"][0]:
        b["data_offsets"] = list(a["data_offsets"])
    else:  # same size needed: copy a's entry under b's name at a's offsets
        header[names[1]] = dict(a)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda h: h[_first(h)].update(data_offsets=["0", "4"]), "non-negative integers"),
        (lambda h: h[_first(h)].update(shape=[-1, 4]), "non-negative integers"),
        (lambda h: h[_first(h)].update(data_offsets=[0, 2**70]), "corrupted|truncated"),
        (lambda h: h[_first(h)].update(dtype=7), "bad header entry"),
        (_overlap, "overlap"),
    ],
)
def test_safetensors_headers_are_checked(copy, edit, message):
    from bitnet_runtime.safetensors_file import SafetensorsFile

    _rewrite(copy / "model.safetensors", edit)
    with pytest.raises(UserError, match=message):
        SafetensorsFile(copy / "model.safetensors")


def test_a_fifo_named_safetensors_is_refused_not_waited_on(copy):
    from bitnet_runtime.safetensors_file import Checkpoint

    (copy / "model.safetensors").unlink()
    os.mkfifo(copy / "model.safetensors")
    with pytest.raises(UserError, match="not a regular file"):
        Checkpoint(copy)


@pytest.fixture
def sharded(tmp_path) -> Path:
    return C.bitnet(tmp_path / "sharded", shards=2, dtype="float32")


def _edit_index(d: Path, edit) -> None:
    path = d / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


def _move_to_other_shard(weight_map: dict) -> None:
    name = next(iter(weight_map))
    weight_map[name] = next(v for v in weight_map.values() if v != weight_map[name])


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.update({next(iter(m)): "../outside.safetensors"}), "outside the model directory"),
        (lambda m: m.update({next(iter(m)): "/etc/passwd"}), "outside the model directory"),
        (_move_to_other_shard, "which does not hold it"),
        (lambda m: m.update({next(iter(m)): 3}), "weight_map must map"),
    ],
)
def test_sharded_index_is_confined_and_believed(sharded, edit, message):
    from bitnet_runtime.safetensors_file import Checkpoint

    _edit_index(sharded, edit)
    with pytest.raises(UserError, match=message):
        Checkpoint(sharded)


def _set_tensor(d: Path, name: str, change) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    change(tensors[name])
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_a_nan_norm_is_an_error_at_load(copy, artifact_dir):
    _set_tensor(copy, "model.layers.0.input_layernorm.weight", lambda t: t.__setitem__(3, np.nan))
    with pytest.raises(UserError, match="input_norm weights hold NaN or Inf"):
        _llm(copy, artifact_dir)


@pytest.mark.parametrize("decoding", ["step", "kernels"])
def test_overflowing_activations_stop_generation_with_an_error(model, artifact_dir, decoding):
    """A weight scale at float32's limit (set after the load-time checks, as a broken
    checkpoint's huge weights would act) overflows the residual stream: the logits are not
    finite, and decoding stops with an error instead of picking a token from NaNs."""
    m = _llm(model, artifact_dir).model
    if decoding == "kernels":
        m.compiled_step = False
    m.prefill([0, 1, 2])
    m.layers[0].linears["o"][0].weight_scale[...] = np.float32(3e38)  # the array both paths read
    with pytest.raises(UserError, match="NaN or Inf logits"):
        m.decode(5)


def test_a_tiny_temperature_picks_the_top_token():
    from bitnet_runtime.sampling import Sampler, SamplingParams

    logits = np.array([0.5, 3.0, -1.0, 2.9], np.float32)
    for temperature in (1e-40, 1e-50, 1e-30):
        assert Sampler(SamplingParams(temperature=temperature, seed=1)).sample(logits) == 1


def test_thread_counts_above_the_cores_are_capped(capsys, monkeypatch):
    from bitnet_runtime import services

    monkeypatch.setenv("TVM_NUM_THREADS", os.environ.get("TVM_NUM_THREADS", "1"))
    monkeypatch.setattr(services, "_services_present", lambda: False)
    services.set_num_threads(1000)
    assert os.environ["TVM_NUM_THREADS"] == str(os.cpu_count())
    assert "warning: 1000 threads asked for" in capsys.readouterr().err


@pytest.mark.parametrize(
    "template,message",
    [
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran longer than 1 s"),
        ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "wrote more than"),
        ("{{ messages[0].content.__class__.__mro__ }}", "rejected the conversation|failed"),  # the sandbox
        ("{{ 1 / 0 }}", "failed: ZeroDivisionError"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed too deeply|failed"),
    ],
)
def test_chat_templates_run_sandboxed_and_bounded(model, tmp_path, monkeypatch, template, message):
    from bitnet_runtime import tokenizer as T

    monkeypatch.setattr(T, "TEMPLATE_SECONDS", 1)
    d = Path(shutil.copytree(model, tmp_path / "chat"))
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": template}))
    tok = T.Tokenizer.from_dir(d)
    with pytest.raises(UserError, match=message):
        tok.render_chat([{"role": "user", "content": "hi"}])


# ----------------------------------------------------------------------------- full and read-only disks


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (root only), unmounted afterwards; ``remount(ro=True)`` makes it read-only."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")

    def remount(ro: bool) -> None:
        subprocess.run(["mount", "-o", f"remount,{'ro' if ro else 'rw'}", str(mount)], check=True)

    yield mount, remount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_during_conversion_is_one_line_and_leaves_nothing(model, artifact_dir, small_disk, monkeypatch):
    from bitnet_runtime import weights

    mount, _ = small_disk
    monkeypatch.setenv("BITNET_CACHE", str(mount))
    monkeypatch.setattr(weights, "_needed_bytes", lambda ckpt, config: 0)  # past the free-space check, into a real ENOSPC
    with pytest.raises(UserError, match="No space left on device"):
        _llm(model, artifact_dir)
    assert [p for p in (mount / "converted").iterdir() if p.is_dir()] == []


def test_the_free_space_check_refuses_before_writing(model, artifact_dir, small_disk, monkeypatch):
    mount, _ = small_disk
    monkeypatch.setenv("BITNET_CACHE", str(mount))
    with pytest.raises(UserError, match="not enough disk space"):
        _llm(model, artifact_dir)


def test_a_read_only_cache_is_one_line(model, artifact_dir, small_disk, monkeypatch):
    mount, remount = small_disk
    remount(ro=True)
    monkeypatch.setenv("BITNET_CACHE", str(mount))
    with pytest.raises(UserError, match="Read-only file system"):
        _llm(model, artifact_dir)


def test_artifacts_on_a_full_or_read_only_disk(small_disk):
    from bitnet_compile import artifact
    from bitnet_compile.models import Linear

    mount, remount = small_disk
    with pytest.raises(UserError, match="cannot write .* No space left on device"):
        artifact.build(parse_target("llvm -mcpu=native"), [Linear("x", 64, 64)], mount / "art")
    assert [p.name for p in (mount / "art").iterdir()] == []
    remount(ro=True)
    with pytest.raises(UserError, match="cannot create the artifact directory .*Read-only file system"):
        artifact.build(parse_target("llvm -mcpu=native"), [Linear("x", 64, 64)], mount / "other")


@pytest.mark.parametrize("edit", [lambda p: p.pop("token_tile"), lambda p: p.update(token_tile=0), lambda p: p.update(token_tile=-4)])
def test_a_manifest_without_a_usable_layout_param_is_one_line(model, artifact_dir, tmp_path, edit):
    """Found by the CLI fuzz: a linear whose layout_params lost token_tile was a KeyError at
    the first prompt (and 0 would divide by zero)."""
    from bitnet_runtime.manifest import digest_of

    art = Path(shutil.copytree(artifact_dir, tmp_path / "art"))
    data = json.loads((art / "manifest.json").read_text())
    if "token_tile" not in data["linears"][0]["layout_params"]:
        pytest.skip("this host's family has no token_tile (not dot2)")
    edit(data["linears"][0]["layout_params"])
    data["digest"] = digest_of(data)
    (art / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="manifest is corrupted: .* layout_params need a positive token_tile"):
        _llm(model, art).model.prefill([0, 1, 2])


@pytest.mark.parametrize("role", ["quantize", "gemm"])
def test_a_manifest_linear_without_one_of_its_kernels_is_one_line(model, artifact_dir, tmp_path, role):
    """Found by the CLI fuzz: a linear whose kernels lost a role was a KeyError at load."""
    from bitnet_runtime.manifest import digest_of

    art = Path(shutil.copytree(artifact_dir, tmp_path / "art"))
    data = json.loads((art / "manifest.json").read_text())
    del data["linears"][0]["kernels"][role]
    data["digest"] = digest_of(data)
    (art / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=f"manifest is corrupted: .* names no {role} kernel"):
        _llm(model, art)


@pytest.mark.parametrize("decoding", ["step", "kernels"])
def test_a_manifest_that_disagrees_with_its_library_is_one_line(model, artifact_dir, tmp_path, decoding):
    """A deliberate edit (digest recomputed) that pads a linear differently from the compiled
    kernels: TVM's argument check fires, as one line pointing at verify."""
    from bitnet_runtime.manifest import digest_of

    art = Path(shutil.copytree(artifact_dir, tmp_path / "art"))
    data = json.loads((art / "manifest.json").read_text())
    data["linears"][1]["n_padded"] += 16
    data["digest"] = digest_of(data)
    (art / "manifest.json").write_text(json.dumps(data))
    m = _llm(model, art).model
    if decoding == "kernels":
        m.compiled_step = False
    with pytest.raises(UserError, match="does not match its manifest; check it with bitnet-runtime verify"):
        m.prefill([0, 1, 2])
        m.decode(3)
