"""The benchmark's own kernels (int8 baseline, bandwidth reader) against numpy, and a tiny
end-to-end ``bench`` run through its worker subprocesses."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from conftest import HOST, compile_module

from bitnet_compile import bench
from bitnet_compile.errors import UserError
from bitnet_compile.ops import bandwidth, int8_matmul
from bitnet_runtime.memory import aligned_copy, aligned_zeros

NATIVE_ISA = "avx512" if {"avx512f", "avx512bw"} <= HOST else "avx2"
pytestmark = pytest.mark.skipif("avx2" not in HOST, reason="bench kernels are compiled for an x86 host with AVX2")

INT8_SHAPES = [(3, 5), (65, 131), (96, 64)]  # odd N and K (K padded to LANES), and an exact fit


@pytest.fixture(scope="module")
def int8_module():
    funcs = {}
    for n, k in INT8_SHAPES:
        for gemv in (True, False):
            name = f"{'gemv' if gemv else 'gemm'}_{n}_{k}"
            funcs[name] = int8_matmul.build_primfunc(name, n, int8_matmul.padded_k(k), gemv)
    return compile_module(funcs, NATIVE_ISA)


@pytest.mark.parametrize("n,k", INT8_SHAPES)
def test_int8_matmul_exact(int8_module, n, k):
    rng = np.random.default_rng(n * 1000 + k)
    w = rng.integers(-1, 2, (n, k), dtype=np.int8)
    k8 = int8_matmul.padded_k(k)
    w8 = aligned_zeros((n, k8), np.int8)
    w8[:, :k] = w
    for tokens in (1, 3):
        q = rng.integers(-128, 128, (tokens, k), dtype=np.int8)
        q[0] = -128  # the extreme: |a * w| = 128 at every position
        q8 = aligned_zeros((tokens, k8), np.int8)
        q8[:, :k] = q
        out = aligned_zeros((tokens, n), np.int32)
        int8_module[f"{'gemv' if tokens == 1 else 'gemm'}_{n}_{k}"](q8, w8, out)
        np.testing.assert_array_equal(out, int8_matmul.reference(q, w))


def test_int8_rejects_unpadded_k():
    with pytest.raises(ValueError, match="multiple"):
        int8_matmul.build_primfunc("f", 4, 33, gemv=True)


def test_bandwidth_kernel_matches_reference():
    chunks, steps, lanes = bandwidth.shape_for(3 << 20, chunks=8)
    mod = compile_module({"bw": bandwidth.build_primfunc("bw", chunks, steps)}, NATIVE_ISA)
    rng = np.random.default_rng(1)
    buf = aligned_copy(rng.integers(0, 2**32, (chunks, steps, lanes), dtype=np.uint32))  # sums wrap
    out = aligned_zeros((chunks, lanes), np.uint32)
    mod["bw"](buf, out)
    np.testing.assert_array_equal(out, bandwidth.reference(buf))


def test_stream_bytes_bounds():
    from bitnet_compile import measure

    assert measure.stream_bytes(0) == measure.MIN_STREAM_BYTES
    assert measure.stream_bytes(300 << 20) == 600 << 20
    assert measure.stream_bytes(4 << 30) == measure.MAX_STREAM_BYTES


def _args(tmp_path, **over) -> argparse.Namespace:
    args = dict(target="llvm -mcpu=native", model="2b-4t", tokens=3, repeat=2, json=tmp_path / "out" / "bench.json",
                shapes="64x96,33x37", stream_mib=16, threads=(1, 2))  # fmt: skip
    return argparse.Namespace(**(args | over))


def test_bench_runs_end_to_end(tmp_path, capsys):
    assert bench.run(_args(tmp_path)) == 0
    printed = capsys.readouterr().out
    assert "## bitnet-compile bench" in printed
    assert "| layer | N x K | threads | kernel | weights MB | cache us | DRAM us |" in printed
    assert "| 33x37 | 33x37 | 1 | lut |" in printed and "| 33x37 | 33x37 | 1 | int8 |" in printed
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert report["runs"][0]["threads"] == 1 and report["tokens"] == 3 and "lut" in report["families"]
    kinds = report["runs"][0]["linears"][1]["kernels"]
    assert set(kinds) == {*report["families"], "int8"}
    assert kinds["lut"]["weight_bytes"] == kinds["lut"]["n_padded"] * kinds["lut"]["k_padded"] // 4
    assert all(r["bandwidth"]["gb_per_s"] > 0 for r in report["runs"])


@pytest.mark.parametrize("over,match", [({"tokens": 0}, "--tokens"), ({"repeat": 0}, "--repeat"), ({"shapes": "12y3"}, "bad shape")])
def test_bench_user_errors(tmp_path, over, match):
    with pytest.raises(UserError, match=match):
        bench.run(_args(tmp_path, **over))
