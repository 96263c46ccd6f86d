"""Artifacts end to end: built by the compiler, loaded and verified by the runtime in a process
where tvm cannot be imported, and refused cleanly when damaged or foreign."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import run_without_tvm

from bitnet_compile import artifact
from bitnet_compile.families import FAMILIES
from bitnet_compile.models import Linear
from bitnet_compile.target import parse_target
from bitnet_runtime import cpu
from bitnet_runtime.artifact import Artifact
from bitnet_runtime.errors import UserError
from bitnet_runtime.manifest import FORMAT_VERSION, digest_of, file_sha256, read_manifest

LINEARS = [Linear("a", 100, 36), Linear("b", 256, 512), Linear("c", 130, 1000)]
NATIVE = parse_target("llvm -mcpu=native")


def _family_params() -> list:
    """The CPU families (the GPU one has its own tests in test_gpu_artifacts.py)."""
    return [
        pytest.param(name, marks=pytest.mark.skipif(bool(fam.missing(NATIVE)), reason=f"host cannot run {name}"))
        for name, fam in FAMILIES.items()
        if not fam.isas <= {"cuda", "metal"}
    ]


@pytest.fixture(scope="module", params=_family_params())
def built(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"artifact-{request.param}")
    artifact.build(NATIVE, LINEARS, out, FAMILIES[request.param])
    return out


@pytest.fixture
def copy(built, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(built, dst)
    return dst


def test_manifest_describes_the_library(built):
    assert json.loads((built / "manifest.json").read_text())["format_version"] == FORMAT_VERSION
    manifest = read_manifest(built)
    assert manifest.library.sha256 == file_sha256(built / "kernels.so")
    family = manifest.family
    assert {e.layout for e in manifest.linears} == {FAMILIES[family].layout}
    ops = sorted(k.op for k in manifest.kernels)
    assert ops.count(f"{family}_gemv") == 3 and ops.count(f"{family}_gemm") == 3 and ops.count("quantize") == 3
    assert ops.count("lut_table") == (3 if family == "lut" else 0)
    gemv = next(k for k in manifest.kernels if k.op == f"{family}_gemv")
    assert gemv.knob_source == "default" and gemv.knobs
    assert set(manifest.required_cpu_features) <= cpu.host_cpu_features()
    assert [(e.n, e.k) for e in manifest.linears] == [(lin.n, lin.k) for lin in LINEARS]


def test_verify_runs_without_tvm(built):
    result = run_without_tvm(f"from bitnet_runtime.__main__ import main; raise SystemExit(main(['verify', {str(built)!r}]))")
    assert result.returncode == 0, result.stderr
    assert f"{len(read_manifest(built).kernels)} passed, 0 failed" in result.stdout


def test_bitlinear_without_tvm_matches_reference(built):
    code = textwrap.dedent(
        f"""
        import numpy as np
        from bitnet_runtime import reference, services
        from bitnet_runtime.artifact import Artifact
        from bitnet_runtime.linear import BitLinear
        services.set_num_threads(2)
        art = Artifact({str(built)!r})
        rng = np.random.default_rng(7)
        for n, k in [(100, 36), (256, 512), (130, 1000)]:
            w = rng.integers(-1, 2, (n, k)).astype(np.int8)
            layer = BitLinear(art, w, 0.75)
            kp = art.linear(n, k).k_padded
            for tokens in (1, 2, 9, 17):
                x = rng.standard_normal((tokens, k)).astype(np.float32)
                q, s = reference.quantize_activations(x, kp)
                want = reference.dequantize(reference.ternary_matmul(q[:, :k], w), s, 0.75)
                assert np.array_equal(layer(x), want), (n, k, tokens)
        print("OK")
        """
    )
    result = run_without_tvm(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK"


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _tamper(path, edit, redigest: bool = True):
    """Edit a manifest; ``redigest``: as a deliberate editor would, with its digest made to match."""
    data = json.loads(path.read_text())
    edit(data)
    if redigest:
        data["digest"] = digest_of(data)
    path.write_text(json.dumps(data))


def _outside(d, target):
    """kernels.so replaced by a symbolic link to a copy outside the artifact directory."""
    shutil.copyfile(d / "kernels.so", target)
    (d / "kernels.so").unlink()
    (d / "kernels.so").symlink_to(target)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: _flip_byte(d / "kernels.so"), "sha256"),
        (lambda d: (d / "kernels.so").unlink(), "missing"),
        (lambda d: (d / "libtvm_runtime.so").write_bytes(b"not a library"), "sha256"),
        (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
        (lambda d: (d / "manifest.json").write_text("{ not json"), "corrupted"),
        (lambda d: _tamper(d / "manifest.json", lambda m: m.update(format_version=99)), "format version"),
        (lambda d: _tamper(d / "manifest.json", lambda m: m.pop("kernels")), "kernels is missing"),
        (lambda d: _tamper(d / "manifest.json", lambda m: m["required_cpu_features"].append("avx10.9")), "lacks avx10.9"),
        (lambda d: _tamper(d / "manifest.json", lambda m: m["target"].update(arch="aarch64")), "aarch64"),
        (lambda d: _tamper(d / "manifest.json", lambda m: m["required_cpu_features"].clear(), redigest=False), "digest does not match"),
        (lambda d: _tamper(d / "manifest.json", lambda m: m.pop("digest"), redigest=False), "digest does not match"),
        (lambda d: _tamper(d / "manifest.json", lambda m: m["library"].update(file="../kernels.so")), "not the name of a file"),
        (lambda d: _tamper(d / "manifest.json", lambda m: m["library"].update(file=str(d / "kernels.so"))), "not the name of a file"),
        (lambda d: _tamper(d / "manifest.json", lambda m: m["library"].update(sha256="x" * 64)), "not a sha256"),
        (lambda d: _outside(d, d.parent / "elsewhere.so"), "leads outside the artifact"),
        (lambda d: ((d / "kernels.so").unlink(), os.mkfifo(d / "kernels.so")), "not a regular file"),
    ],
)
def test_damaged_artifacts_are_refused(copy, damage, message):
    damage(copy)
    with pytest.raises(UserError, match=message):
        Artifact(copy)


def test_avx512_artifact_refused_on_avx2_only_cpu(built, monkeypatch):
    if "avx512f" not in read_manifest(built).required_cpu_features:
        pytest.skip("host artifact is not AVX-512")
    monkeypatch.setattr(cpu, "host_cpu_features", lambda: frozenset({"sse2", "ssse3", "avx", "avx2", "fma"}))
    with pytest.raises(UserError, match="lacks .*avx512"):
        Artifact(built)


def test_unknown_kernel_and_shape_are_clear_errors(built):
    art = Artifact(built)
    with pytest.raises(UserError, match="unknown kernel 'nope'"):
        art.kernel("nope")
    with pytest.raises(UserError, match="no kernels for a 7x7"):
        art.linear(7, 7)


def test_bitlinear_rejects_bad_inputs(built):
    from bitnet_runtime.linear import BitLinear

    art = Artifact(built)
    w = np.ones((100, 36), np.int8)
    with pytest.raises(UserError, match="not ternary"):
        BitLinear(art, w * 2, 1.0)
    layer = BitLinear(art, w, 1.0)
    with pytest.raises(UserError, match=r"shape \[tokens, 36\]"):
        layer(np.zeros((2, 35), np.float32))
    with pytest.raises(UserError, match="floating point"):
        layer(np.zeros((2, 36), np.int32))
    assert layer(np.ones(36, np.float64)).shape == (1, 100)  # a single token and float64 are accepted


def test_kernel_call_checks_its_arrays(built):
    """Unaligned, wrongly shaped or typed arrays are UserErrors, never a crash."""
    from bitnet_runtime.memory import aligned_zeros

    art = Artifact(built)
    entry = art.linear(256, 512)
    quantize = art.kernel(entry.kernels["quantize"])
    x, q, s = aligned_zeros((2, 512), np.float32), aligned_zeros((2, 512), np.int8), aligned_zeros((2,), np.float32)
    quantize(x, q, s)
    unaligned = np.zeros(2 * 512 * 4 + 4, np.uint8)[4:].view(np.float32).reshape(2, 512)
    assert unaligned.ctypes.data % 64
    with pytest.raises(UserError, match="aligned"):
        quantize(unaligned, q, s)
    with pytest.raises(UserError, match=entry.kernels["quantize"]):
        quantize(x, aligned_zeros((2, 512), np.int16), s)
    with pytest.raises(UserError, match=entry.kernels["quantize"]):
        quantize(x, q)


def test_a_library_replaced_on_disk_is_not_loaded_again_in_the_same_process(built, tmp_path):
    """The dynamic loader would hand back the first copy: refused instead of running old code."""
    other = tmp_path / "other"
    artifact.build(NATIVE, [Linear("z", 48, 80)], other)
    place = tmp_path / "place"
    shutil.copytree(built, place)
    Artifact(place)
    shutil.rmtree(place)
    shutil.copytree(other, place)
    with pytest.raises(UserError, match="changed since this process loaded it"):
        Artifact(place)


def test_concurrent_builds_into_one_directory(tmp_path):
    """Two compiles of one artifact directory at once: one waits for the other, both succeed,
    and the result is whole (no shared temporary names)."""
    out = tmp_path / "art"
    cmd = [sys.executable, "-m", "bitnet_compile", "--target", "llvm -mcpu=native", "--shapes", "64x96,32x64", "-o", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), results
    assert [f.name for f in out.iterdir() if ".tmp-" in f.name] == []
    result = run_without_tvm(f"from bitnet_runtime.__main__ import main; raise SystemExit(main(['verify', {str(out)!r}]))")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    def fail(tmp):
        tmp.write_text("partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="cannot write kernels.so .*No space left on device"):
        artifact._write(tmp_path, "kernels.so", fail)
    assert list(tmp_path.iterdir()) == []
