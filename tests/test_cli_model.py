"""The model commands as a user runs them: dummy -> run / chat / bench, in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    return dict(os.environ, BITNET_CACHE=str(tmp_path_factory.mktemp("cache")), TVM_NUM_THREADS="2")


def cli(env: dict, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bitnet_compile.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, input=stdin, timeout=600)


@pytest.fixture(scope="module")
def model(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("dummy") / "tiny"
    result = cli(env, "dummy", "tiny", "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_run_json_gives_ids_and_text(env, model):
    result = cli(env, "run", "-m", str(model), "-p", "hello world", "-n", "6", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert len(out["ids"]) <= 6 and out["prompt_ids"] and isinstance(out["text"], str)
    assert "compiling the kernels" in result.stderr  # first use compiles the artifact ...
    again = cli(env, "run", "-m", str(model), "-p", "hello world", "-n", "6", "--json")
    assert "using artifact" in again.stderr and "using converted weights" in again.stderr  # ... then reuses it
    assert json.loads(again.stdout)["ids"] == out["ids"]  # greedy is deterministic


def test_run_streams_text_and_reports_speed(env, model):
    result = cli(env, "run", "-m", str(model), "-p", "hello", "-n", "5", "--temp", "0.7", "--top-k", "20", "--top-p", "0.9", "-s", "3")
    assert result.returncode == 0, result.stderr
    assert "tok/s" in result.stderr.splitlines()[-1]


def test_chat_reads_turns_from_stdin(env, model):
    result = cli(env, "chat", "-m", str(model), "-n", "4", "--system", "be brief", stdin="hi\n/clear\nhello again\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("generated") == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "-m", "/no/such/dir", "-p", "x"], "/no/such/dir"),
        (["run", "-m", "{model}", "-p", "x", "--temp", "-1"], "temperature"),
        (["run", "-m", "{model}", "-p", "x y z", "-c", "2"], "context holds only 2"),
        (["run", "-m", "{model}", "-p", "abc\udcff", "-n", "2"], "not valid UTF-8"),  # the byte 0xff on the command line
        (["run", "-m", "{model}", "-p", "x", "-n", "2", "--temp", "1e-40"], None),  # greedy, not an error
        (["dummy", "nope", "-o", "/tmp/x"], "preset"),
    ],
)
def test_user_mistakes_are_one_line_errors(env, model, args, message):
    result = cli(env, *[a.format(model=model) for a in args])
    if message is None:
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        return
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_bench_reports_every_figure(env, model, tmp_path):
    report = tmp_path / "bench.json"
    result = cli(
        env, "bench", "-m", str(model), "-t", "1,2", "--tokens", "8", "--repeat", "1", "--decode", "step,kernels", "--json", str(report)
    )
    assert result.returncode == 0, result.stderr
    every = json.loads(report.read_text())["runs"]
    assert [(r["decode"], r["threads"], r["format"]) for r in every] == [
        (mode, t, fmt) for mode in ("step", "kernels") for fmt in ("f16", "i8") for t in (1, 2)
    ]
    step, runs = every[:4], every[4:]
    assert all(r["calls_per_token"] == 1 and r["launches_per_token"] > 4 for r in step)  # one call, the kernels inside it
    assert all(r["calls_per_token"] == r["launches_per_token"] for r in runs)  # kernel by kernel: every launch a call
    for r in runs:
        assert r["decode_tok_s"] > 0 and r["prompt_tok_s"] > 0 and r["peak_rss_bytes"] > 0 and r["bandwidth_gb_s"] > 0
        assert 0 < r["fraction_of_limit"] and r["bytes_per_token"] > 0
        assert r["host_s_per_token"] > 0, r  # the old measure went negative (the prompt's kernel time subtracted)
    launches = {r["format"]: r["launches_per_token"] for r in runs}
    assert launches["i8"] == launches["f16"] + 2  # the int8 output layer is quantize, GEMV, dequantize; f16 one GEMV
    assert launches["f16"] == int(launches["f16"]) and launches["f16"] >= 4
    assert 0 <= runs[-1]["top1_agreement"] <= 1
    assert "| threads | output layer | decode | decode tok/s |" in result.stdout
