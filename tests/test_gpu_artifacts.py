"""CUDA and Metal artifacts: built whole, well formed, refused clearly where they cannot run,
and checked exactly on a GPU when there is one (the same verify as for CPU artifacts)."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from bitnet_compile import artifact, cuda_toolchain
from bitnet_compile.errors import UserError
from bitnet_compile.families import choose
from bitnet_compile.models import Linear
from bitnet_compile.ops import gpu_matmul
from bitnet_compile.target import parse_target
from bitnet_runtime import gpu, verify
from bitnet_runtime.artifact import Artifact, Kernel
from bitnet_runtime.manifest import Manifest, read_manifest

SHAPES = [(100, 36), (65, 131), (2560, 6912), (31, 7)]
HAVE_NVCC = shutil.which("nvcc") is not None
needs_nvcc = pytest.mark.skipif(not HAVE_NVCC and not os.environ.get("CI"), reason="needs nvcc (CI has it)")
HAVE_GPU = gpu.cuda_device_count() > 0


def _build(target: str, out: Path) -> Manifest:
    artifact.build(parse_target(target), [Linear(f"l{n}", n, k) for n, k in SHAPES], out, output_layer=(300, 64))
    return read_manifest(out)


@pytest.fixture(scope="module")
def cuda_artifact(tmp_path_factory) -> tuple[Path, Manifest]:
    if not HAVE_NVCC and not os.environ.get("CI"):
        pytest.skip("needs nvcc")
    out = tmp_path_factory.mktemp("cuda") / "artifact"
    return out, _build("cuda", out)


@pytest.fixture(scope="module")
def metal_artifact(tmp_path_factory) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("metal") / "artifact"
    return out, _build("metal", out)


def test_gpu_targets_take_the_gpu2_family() -> None:
    for name in ("cuda", "metal"):
        assert choose(parse_target(name), "auto", ["dot2", "lut", "gpu2"]).name == "gpu2"
    with pytest.raises(UserError, match="kernel family lut needs"):
        choose(parse_target("cuda"), "lut", [])


@needs_nvcc
def test_cuda_artifact_carries_a_fatbin_and_its_source(cuda_artifact) -> None:
    out, manifest = cuda_artifact
    assert manifest.device.kind == "cuda" and manifest.device.arch == "sm_80" and manifest.device.code == "fatbin"
    library = (out / "kernels.so").read_bytes()
    assert cuda_toolchain.FATBIN_MAGIC in library and b"__global__" not in library  # compiled, not source
    assert [e.file for e in manifest.device_libraries] == ["libcudart.so.13", "libtvm_runtime_cuda.so"]
    source = (out / "kernels.cu").read_text()
    gpu_kernels = [k for k in manifest.kernels if k.op.startswith("gpu2_")]
    assert len(gpu_kernels) == 2 * len(SHAPES) and manifest.output_layer is None
    for k in manifest.kernels:
        assert re.search(rf"__global__ void __launch_bounds__\(\d+\) {k.name}_kernel\(", source), k.name
        threads = manifest.device.launch[k.name]["threads"]
        assert f"__launch_bounds__({int(np.prod(threads))}) {k.name}_kernel" in source
    assert source.count("__dp4a") >= 4 * len(gpu_kernels)


@needs_nvcc
def test_cuda_artifact_padding_and_launch_match_the_knobs(cuda_artifact) -> None:
    _, manifest = cuda_artifact
    for k in manifest.kernels:
        if not k.op.startswith("gpu2_"):
            continue
        s, knobs = k.shape, k.knobs
        assert s["n_padded"] % knobs["rows_per_block"] == 0 and s["n_padded"] >= s["n"] and s["k_padded"] % 16 == 0
        assert manifest.device.launch[k.name] == gpu_matmul.launch(s, knobs, k.op == "gpu2_gemv")


@pytest.mark.skipif(HAVE_GPU, reason="this machine has an NVIDIA GPU")
@needs_nvcc
def test_cuda_artifact_without_a_gpu_is_a_clear_error(cuda_artifact) -> None:
    with pytest.raises(UserError, match="runs on an NVIDIA GPU"):
        Artifact(cuda_artifact[0])


@pytest.mark.skipif(not HAVE_GPU, reason="needs an NVIDIA GPU")
def test_cuda_artifact_exact_on_the_gpu(cuda_artifact) -> None:
    lines: list[str] = []
    assert verify.verify(Artifact(cuda_artifact[0]), echo=lines.append), "\n".join(lines)


def test_metal_artifact_is_well_formed_msl(metal_artifact) -> None:
    out, manifest = metal_artifact
    assert sorted(p.name for p in out.iterdir()) == ["kernels.metal", "manifest.json"]
    assert manifest.device.code == "msl-source" and manifest.runtime_library is None
    source = (out / "kernels.metal").read_text()
    assert source.startswith("// Function:") and "#include <metal_stdlib>" in source
    assert source.count("{") == source.count("}") and source.count("(") == source.count(")")
    assert "nearbyint" not in source and "__dp4a" not in source and "rint(" in source
    names = re.findall(r"kernel void (\w+)_kernel\(", source)
    assert sorted(names) == sorted(k.name for k in manifest.kernels)
    for k in manifest.kernels:
        bindings = manifest.device.arguments[k.name]
        assert [b["buffer"] for b in bindings] == list(range(len(bindings)))
        tensors = {b["tensor"] for b in bindings if "tensor" in b}
        assert tensors == ({"acts", "packed", "out"} if k.op.startswith("gpu2_") else tensors) and tensors
        runtime_extent = [d for d in manifest.device.launch[k.name]["grid"] if isinstance(d, str)]
        scalars = [s for b in bindings for s in b.get("scalars", [])]
        assert [s.split()[-1] for s in scalars] == runtime_extent


def test_metal_artifact_is_refused_by_the_linux_runtime_with_directions(metal_artifact) -> None:
    with pytest.raises(UserError, match="Metal Shading Language .* macOS"):
        Artifact(metal_artifact[0])


@pytest.mark.parametrize("gemv", [True, False])
def test_verify_check_of_the_gpu_matmul_through_device_buffers(gemv: bool) -> None:
    """verify's gpu2 check, run on the CPU spelling of the same kernel through DeviceFunction
    with the CPU as the device: the views, padding and copies a GPU run goes through."""
    import tvm
    import tvm_ffi

    knobs = gpu_matmul.GpuGemvKnobs(16, 32) if gemv else gpu_matmul.GpuGemmKnobs(16, 4)
    rng = np.random.default_rng(0)
    for n, k in SHAPES:
        shape, full = gpu_matmul.kernel_shape(n, k, dataclasses.asdict(knobs))
        func = gpu_matmul.build_primfunc("m", shape["n_padded"], shape["k_padded"], knobs, "cpu")
        mod = tvm.compile(tvm.IRModule({"m": func}), target=parse_target("x86-avx2").tvm_target()).mod
        function = gpu.DeviceFunction(mod["m"], tvm_ffi.device("cpu", 0))
        kernel = Kernel("m", "gpu2_gemv" if gemv else "gpu2_gemm", shape, full, function)
        assert verify.check_gpu2_matmul(kernel, rng), (n, k)
        wrong = Kernel("m", kernel.op, shape, full, lambda *a, function=function: (function(*a), a[-1].__setitem__((0,) * a[-1].ndim, 7)))
        assert not verify.check_gpu2_matmul(wrong, rng)


def test_a_driver_error_in_a_kernel_call_is_one_line() -> None:
    """What the H200 said of an artifact without code for it, as a one-line error, not a
    traceback from inside the call."""
    import tvm_ffi

    def refuses(*args):
        raise RuntimeError("cuModuleLoadData(...) failed with error: CUDA_ERROR_NO_BINARY_FOR_GPU")

    function = gpu.DeviceFunction(refuses, tvm_ffi.device("cpu", 0))
    with pytest.raises(UserError, match="the GPU could not run the kernel: .*CUDA_ERROR_NO_BINARY_FOR_GPU"):
        function(np.zeros(4, np.float32))


def test_the_fatbin_carries_ptx_for_newer_gpus() -> None:
    """SASS alone for sm_80 fails to load on an sm_90 H200 (seen); the PTX lets the driver
    compile it for any newer GPU."""
    flags = cuda_toolchain.gencode("sm_80")
    assert flags == ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_80,code=compute_80"]


def test_missing_nvcc_is_named(monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    with pytest.raises(UserError, match="needs nvcc"):
        cuda_toolchain.nvcc()


def test_compiler_verify_of_a_gpu_artifact_is_one_line(metal_artifact, capsys) -> None:
    from bitnet_compile.cli import main

    assert main(["verify", str(metal_artifact[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: this artifact holds Metal Shading Language kernels") and err.count("\n") == 1


def test_gpu_defaults_lie_in_the_knob_spaces() -> None:
    """The spaces a GPU tuner will search hold the shipped defaults, valid for the 2B-4T shapes."""
    from bitnet_compile import schedule_db

    for kind in ("cuda", "metal"):
        for op, space in (("gpu2_gemv", gpu_matmul.GEMV_SPACE), ("gpu2_gemm", gpu_matmul.GEMM_SPACE)):
            knobs = schedule_db.default_knobs(op, kind)
            assert not space.outside_domains(knobs), (op, kind, knobs)
            for n, k in ((3840, 2560), (2560, 6912)):
                assert not space.violations(knobs, {"n": n, "k": k, "threads": 1}), (op, kind, n, k)
