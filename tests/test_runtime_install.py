"""The device story for real: a virtual environment with only ``pip install ./runtime``
(numpy + apache-tvm-ffi, no apache-tvm) verifies a copied artifact."""

from __future__ import annotations

import json
import subprocess
import venv

import pytest
from conftest import REPO

from bitnet_compile import artifact
from bitnet_compile.models import Linear
from bitnet_compile.target import parse_target
from bitnet_runtime.manifest import read_manifest


@pytest.fixture(scope="module")
def runtime_python(tmp_path_factory):
    env_dir = tmp_path_factory.mktemp("device-venv")
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(REPO / "runtime")], capture_output=True, text=True, timeout=600
    )
    if install.returncode != 0:
        pytest.skip(f"cannot install the runtime's dependencies here (no package index?): {install.stderr[-300:]}")
    return python


def test_runtime_only_environment_has_no_tvm(runtime_python):
    probe = subprocess.run([str(runtime_python), "-c", "import tvm"], capture_output=True, text=True, cwd="/")
    assert probe.returncode != 0 and "No module named 'tvm'" in probe.stderr


def test_runtime_only_environment_verifies_an_artifact(runtime_python, tmp_path):
    """With the runtime's own command, from a directory holding a numpy.py that must not run."""
    out = tmp_path / "artifact"
    artifact.build(parse_target("llvm -mcpu=native"), [Linear("x", 72, 100)], out)
    trap = tmp_path / "cwd"
    trap.mkdir()
    (trap / "numpy.py").write_text("raise SystemExit('the numpy.py of the current directory ran')\n")
    result = subprocess.run(
        [str(runtime_python.parent / "bitnet-runtime"), "verify", str(out), "--threads", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=trap,
    )
    assert result.returncode == 0, result.stderr
    assert f"{len(read_manifest(out).kernels)} passed, 0 failed" in result.stdout


def test_runtime_only_environment_runs_a_model(runtime_python, tmp_path):
    """The whole edge story: a checkpoint and an artifact compiled elsewhere, text generated
    with the runtime alone."""
    from bitnet_compile import models
    from bitnet_compile.dummy_models import write_dummy_model

    model = write_dummy_model("tiny", tmp_path / "model", progress=False)
    shape = models.from_model_dir(model)
    out = tmp_path / "artifact"
    artifact.build(parse_target("llvm -mcpu=native"), shape.linears(), out, output_layer=(shape.vocab, shape.hidden))
    result = subprocess.run(
        [str(runtime_python), "-m", "bitnet_runtime", "run", "-a", str(out), "-m", str(model), "-p", "hello", "-n", "5", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
        env={"BITNET_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["ids"]) == 5
