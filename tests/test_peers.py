"""``bench --peers``: finding the peers' builds, reading llama-bench's JSON, the ratio table.
A stand-in llama-bench (a script printing what the real one prints) replaces the peers' builds."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from bitnet_compile import peers
from bitnet_compile.errors import UserError
from bitnet_compile.model_bench import format_peers

FAKE_BENCH = """#!/usr/bin/env python3
import json, sys
a = dict(zip(sys.argv[1::2], sys.argv[2::2]))
p, n = int(a["-p"]), int(a["-n"])
print("log noise before the JSON", file=sys.stdout)
print(json.dumps([{"n_prompt": p, "n_gen": n, "avg_ts": (100.0 if p else 20.0) * int(a["-t"])}]))
"""


def _peers_dir(tmp_path: Path, shape: str = "large", tag: str = "i2_s") -> Path:
    bench = tmp_path / "bitnet" / "build" / "bin" / "llama-bench"
    bench.parent.mkdir(parents=True)
    bench.write_text(FAKE_BENCH)
    bench.chmod(bench.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / f"{shape}-{tag}.gguf").write_bytes(b"GGUF")
    return tmp_path


def test_peers_are_found_by_shape_and_measured(tmp_path):
    (peer,) = peers.available(_peers_dir(tmp_path), 1536)
    assert peer.name == "bitnet.cpp I2_S"
    assert peers.measure(peer, 2, 128, 1) == {"decode_tok_s": 40.0, "prompt_tok_s": 200.0}


def test_missing_peers_and_unknown_shapes_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="no peer is built"):
        peers.available(_peers_dir(tmp_path), 2560)  # only the large model exists
    with pytest.raises(UserError, match="hidden size"):
        peers.available(tmp_path, 96)


def test_a_failing_peer_is_a_one_line_error(tmp_path):
    (peer,) = peers.available(_peers_dir(tmp_path), 1536)
    peer.bench.write_text("#!/bin/sh\necho 'model load failed' >&2\nexit 1\n")
    with pytest.raises(UserError, match="llama-bench failed: model load failed"):
        peers.measure(peer, 1, 8, 1)
    peer.bench.write_text("#!/bin/sh\necho '[]'\n")
    with pytest.raises(UserError, match="unexpected llama-bench output"):
        peers.measure(peer, 1, 8, 1)


def test_the_ratio_table():
    table = [
        {
            "threads": 1,
            "this project": {"decode_tok_s": 30.0, "prompt_tok_s": 200.0},
            "bitnet.cpp I2_S": {"decode_tok_s": 20.0, "prompt_tok_s": 100.0},
        }
    ]
    text = format_peers(table)
    assert "| 1 | 30.0 / 200.0 | 20.0 / 100.0 | 1.50x / 2.00x |" in text
    assert json.dumps(table)  # the report stores it as it is
