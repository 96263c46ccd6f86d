"""The command line as a user meets it: verbatim target strings, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, run_without_tvm

from bitnet_runtime.manifest import read_manifest


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bitnet_compile", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_help_and_the_parser_do_not_import_the_compiler():
    """Every subcommand's options are built before any command runs, so none of them may pull
    in TVM and the kernel templates (that once made `bitnet-compile --help` take 12 s)."""
    for args in ([], ["tune"], ["schedules"], ["compile"]):
        done = run_without_tvm(f"from bitnet_compile.cli import main\nmain({[*args, '--help']!r})")
        assert done.returncode == 0 and "usage: bitnet-compile" in done.stdout, (args, done.stderr)


def test_compile_native_verbatim_then_verify(tmp_path):
    out = tmp_path / "art"
    result = cli("--target", "llvm -mcpu=native", "--shapes", "64x128,33x20", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert f"wrote {out / 'manifest.json'}" in result.stdout
    assert "compiling" in result.stderr and "kernel family" in result.stderr
    manifest = read_manifest(out)
    assert manifest.model is None and len(manifest.linears) == 2
    verified = cli("verify", str(out), "-t", "1")
    assert verified.returncode == 0, verified.stderr
    assert f"{len(manifest.kernels)} passed, 0 failed" in verified.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--target", "hexagon", "--shapes", "8x8"], "is a stub"),
        (["--target", "cuda", "-f", "lut", "--shapes", "8x8"], "kernel family lut needs"),
        (["--target", "llvm -mcpu=notacpu", "--shapes", "8x8"], "notacpu"),
        (["--target", "x86-avx2", "--shapes", "0x8"], "bad shape"),
        (["--target", "x86-avx2", "--shapes", "8by8"], "bad shape"),
        (["--target", "x86-avx2", "--model", "no/such-model"], "no/such-model"),
        (["--target", "x86-avx2", "--model", "not-a-model"], "unknown model"),
        (["verify", "/nonexistent/artifact"], "does not exist"),
        (["--target", "x86-avx2", "--family", "dot2", "--shapes", "8x8"], "needs"),
        (["--target", "x86-avx2", "--family", "nope", "--shapes", "8x8"], "unknown kernel family"),
    ],
)
def test_user_mistakes_are_one_line_errors(args, message):
    result = cli(*args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_model_config_json_gives_its_linears(tmp_path):
    from bitnet_compile import models

    cfg = tmp_path / "config.json"
    fields = {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "vocab_size": 100,
    }
    cfg.write_text(json.dumps({"model_type": "bitnet", "quantization_config": {"quant_method": "bitnet"}, **fields}))
    shapes = [(lin.name, lin.n, lin.k) for lin in models.resolve(str(tmp_path)).linears()]
    assert shapes == [("qkv", 128, 64), ("o", 64, 64), ("gate_up", 192, 64), ("down", 64, 96)]
    two_b = {(lin.n, lin.k) for lin in models.resolve("microsoft/bitnet-b1.58-2B-4T").linears()}
    assert two_b == {(3840, 2560), (2560, 2560), (13824, 2560), (2560, 6912)}


def test_targets_command_lists_every_preset() -> None:
    done = cli("targets", "-v")
    assert done.returncode == 0, done.stderr
    for name in ("native", "arm-neon", "cuda", "metal", "hexagon", "intel-npu", "apple-ane"):
        assert f"\n{name} " in done.stdout
    assert "runs here" in done.stdout and "stub" in done.stdout
