"""The AArch64 (NEON) artifact: cross-compiled with aarch64-linux-gnu-gcc, every kernel run
under qemu user-mode emulation with the artifact's own aarch64 libtvm_runtime.so and checked
exactly against the numpy references (the float16 GEMV to its stated tolerance)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_kernels import MATMUL_SHAPES

from bitnet_compile import artifact, cross
from bitnet_compile.errors import UserError
from bitnet_compile.models import Linear
from bitnet_compile.target import parse_target
from bitnet_runtime.manifest import read_manifest
from bitnet_runtime.memory import aligned_zeros
from bitnet_runtime.verify import verify

TOOLS = ("aarch64-linux-gnu-gcc", "qemu-aarch64-static", "aarch64-linux-gnu-objdump")
MISSING = [t for t in TOOLS if shutil.which(t) is None]
# CI installs the tools (.ci/run): there a missing one is a failure, not a skip.
pytestmark = pytest.mark.skipif(bool(MISSING) and not os.environ.get("CI"), reason=f"needs {', '.join(MISSING)}")

OUTPUT_LAYER = (301, 130)  # vocab not a multiple of a tile, hidden not a multiple of 4


@pytest.fixture(scope="module")
def arm_artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("arm") / "artifact"
    linears = [Linear(f"l{n}x{k}", n, k) for n, k in MATMUL_SHAPES]
    artifact.build(parse_target("arm-neon"), linears, out, output_layer=OUTPUT_LAYER)
    return out


def _emulated(path: Path, threads: int = 1):
    from bitnet_compile.emulation import EmulatedArtifact

    return EmulatedArtifact(path, threads)


def test_library_is_aarch64_with_tbl_and_sdot(arm_artifact: Path) -> None:
    lib = arm_artifact / "kernels.so"
    assert lib.read_bytes()[18:20] == (183).to_bytes(2, "little")  # ELF e_machine EM_AARCH64
    asm = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    assert "\ttbl\t" in asm and "\tsdot\t" in asm
    runtime = arm_artifact / "libtvm_runtime.so"
    assert runtime.read_bytes()[18:20] == (183).to_bytes(2, "little")


@pytest.fixture(scope="module")
def arm_dot2_artifact(tmp_path_factory) -> Path:
    """The opt-in sdot family: GEMV and GEMM on dot2-v1, fields decoded for sdot."""
    from bitnet_compile.families import FAMILIES

    out = tmp_path_factory.mktemp("arm-dot2") / "artifact"
    artifact.build(parse_target("arm-neon"), [Linear(f"l{n}x{k}", n, k) for n, k in MATMUL_SHAPES], out, FAMILIES["dot2"])
    return out


def test_neon_prefers_lut_and_offers_dot2(arm_artifact: Path, arm_dot2_artifact: Path) -> None:
    assert read_manifest(arm_artifact).family == "lut"
    manifest = read_manifest(arm_dot2_artifact)
    assert manifest.family == "dot2" and {k.op for k in manifest.kernels} == {
        "quantize",
        "rmsnorm_quantize",
        "dot2_gemv",
        "dot2_gemm",
        "dequantize",
    }
    asm = subprocess.run(
        ["aarch64-linux-gnu-objdump", "-d", str(arm_dot2_artifact / "kernels.so")], capture_output=True, text=True, check=True
    ).stdout
    assert asm.count("\tsdot\t") >= 16 and "\ttbl\t" not in asm


@pytest.mark.parametrize("threads", [1, 2])
def test_dot2_kernels_exact_under_emulation(arm_dot2_artifact: Path, threads: int) -> None:
    lines: list[str] = []
    with _emulated(arm_dot2_artifact, threads) as emulated:
        assert verify(emulated, seed=threads, echo=lines.append), "\n".join(lines)
    assert lines[-1] == f"{len(lines) - 1} passed, 0 failed"


@pytest.mark.parametrize("threads", [1, 2])
def test_every_kernel_exact_under_emulation(arm_artifact: Path, threads: int) -> None:
    lines: list[str] = []
    with _emulated(arm_artifact, threads) as emulated:
        assert verify(emulated, seed=threads, echo=lines.append), "\n".join(lines)
        ops = {emulated.kernel(n).op for n in emulated.kernel_names}
    assert ops == {
        "quantize",
        "rmsnorm_quantize",
        "lut_table",
        "lut_gemv",
        "lut_gemm",
        "dequantize",
        "f16_gemv",
        "f16_gemm",
        "i8_gemv",
        "i8_gemm",
    }
    assert lines[-1] == f"{len(lines) - 1} passed, 0 failed"


def test_emulated_kernel_writes_its_output_and_reports_errors(arm_artifact: Path) -> None:
    with _emulated(arm_artifact) as emulated:
        name = next(n for n in emulated.kernel_names if n.startswith("lut_table_k8"))
        k_padded = emulated.kernel(name).shape["k_padded"]
        q = aligned_zeros((2, k_padded), np.int8)
        q[:, 1] = 3  # L[e] = 3 wherever bit 1 of e is set
        tables = aligned_zeros((2, k_padded // 4, 2, 16), np.int8)
        emulated.kernel(name)(q, tables)
        assert tables[1, 0, 0].tolist() == [3 * ((e >> 1) & 1) for e in range(16)]
        with pytest.raises(UserError, match="shape"):
            emulated.kernel(name)(aligned_zeros((2, k_padded + 4), np.int8), tables)


def test_missing_cross_tools_are_named(monkeypatch) -> None:
    monkeypatch.setitem(cross.CROSS, "aarch64", cross.CROSS["aarch64"].__class__(
        "aarch64", "no-such-gcc", "gcc-aarch64-linux-gnu", "/nonexistent", ("no-such-qemu",), "manylinux_2_28_aarch64"))  # fmt: skip
    with pytest.raises(UserError, match="apt install gcc-aarch64-linux-gnu"):
        cross.compiler("aarch64", "aarch64-linux-gnu")
    with pytest.raises(UserError, match="apt install qemu-user-static"):
        cross.emulator("aarch64")


def test_android_without_ndk_says_so(monkeypatch) -> None:
    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    monkeypatch.delenv("ANDROID_NDK_ROOT", raising=False)
    with pytest.raises(UserError, match="Android NDK"):
        cross.compiler("aarch64", "aarch64-linux-android")


def test_cli_verify_runs_a_foreign_artifact_under_emulation(arm_artifact: Path, capsys) -> None:
    from bitnet_compile.cli import main

    assert main(["verify", str(arm_artifact), "-t", "2"]) == 0
    out = capsys.readouterr().out
    assert "(aarch64, neon) under qemu emulation" in out and out.strip().endswith("passed, 0 failed")


def test_device_runtime_refuses_a_foreign_artifact_with_the_way_out(arm_artifact: Path) -> None:
    from bitnet_runtime.artifact import Artifact

    with pytest.raises(UserError, match="compiled for aarch64 .* bitnet-compile verify"):
        Artifact(arm_artifact)


def test_rpc_candidates_for_arm_are_linked_for_aarch64(monkeypatch) -> None:
    """Tuning arm-neon on the device: the candidates' library the tuner uploads is an aarch64
    ELF linked by the cross gcc (a fake RPC session records the upload)."""
    import tvm

    from bitnet_compile.ops import lut_matmul
    from bitnet_compile.tuning import rpc

    uploaded: list[bytes] = []

    class Session:
        def get_function(self, name):
            return lambda: 1

        def upload(self, path):
            uploaded.append(Path(path).read_bytes())

        def load_module(self, name):
            raise RuntimeError("stop after the upload")

    monkeypatch.setattr(rpc, "connect", lambda spec: Session())
    target = parse_target("arm-neon")
    func = lut_matmul.build_primfunc("cand", 32, 64, "neon", lut_matmul.LutKnobs(kblock=16, row_blocks_per_task=1), True)
    executable = tvm.compile(tvm.IRModule({"cand": func}), target=target.tvm_target())
    job = {"rpc": {"host": "device", "port": 9090}, "threads": 1, "target": target.to_json()}
    with pytest.raises(RuntimeError, match="stop after the upload"):
        rpc.measure_remote(executable, job, [], None, None, 0.0)
    assert uploaded and uploaded[0][18:20] == (183).to_bytes(2, "little")


def test_tuning_arm_without_rpc_says_how(capsys) -> None:
    from bitnet_compile.cli import main

    assert main(["tune", "--target", "arm-neon", "-s", "64x64", "-n", "1"]) == 2
    assert "tune on the device over RPC" in capsys.readouterr().err


def test_runtime_download_failure_says_where_to_put_the_libraries(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("BITNET_CACHE", str(tmp_path))
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for apache-tvm")
    monkeypatch.setattr(cross.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(UserError, match="No matching distribution.*put libtvm_runtime.so and libtvm_ffi.so") as info:
        cross.runtime_libraries("aarch64")
    assert str(tmp_path) in str(info.value) and not any(tmp_path.rglob("*.so"))


def test_android_runtime_library_must_be_given(monkeypatch) -> None:
    monkeypatch.delenv(cross.ANDROID_RUNTIME_ENV, raising=False)
    with pytest.raises(UserError, match=f"bionic.*{cross.ANDROID_RUNTIME_ENV}"):
        cross.runtime_libraries("aarch64", "aarch64-linux-android")
