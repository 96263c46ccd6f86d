"""GPU ternary matmul, act_quant and dequant: the shared algebra exactly on the CPU, and the
CUDA / Metal sources TVM generates (compiled by nvcc where present); exact runs on a real GPU."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import tvm

from bitnet_compile import cuda_toolchain
from bitnet_compile.ops import act_quant, dequant, gpu_matmul
from bitnet_compile.target import parse_target
from bitnet_runtime import layout_dot2, reference
from bitnet_runtime.memory import aligned_copy

SHAPES = [(1, 1), (3, 5), (31, 7), (65, 131), (100, 36), (640, 2560)]
KNOBS = {True: gpu_matmul.GpuGemvKnobs(rows_per_block=16, k_split=32), False: gpu_matmul.GpuGemmKnobs(rows_per_block=16, token_tile=8)}
CPU_TARGET = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"}
SOURCE_SHAPES = [(64, 256), (640, 2560), (2560, 6912)]


def _padded(n: int, k: int) -> tuple[int, int]:
    shape, _ = gpu_matmul.kernel_shape(n, k, {"rows_per_block": 16})
    return shape["n_padded"], shape["k_padded"]


def _funcs(device: str, shapes) -> dict:
    funcs = {}
    for n, k in shapes:
        n_p, k_p = _padded(n, k)
        for kind, gemv in (("gemv", True), ("gemm", False)):
            funcs[f"{kind}_{n}_{k}"] = gpu_matmul.build_primfunc(f"{kind}_{n}_{k}", n_p, k_p, KNOBS[gemv], device)
    return funcs


def _run(mod, name: str, w: np.ndarray, q: np.ndarray, device=None) -> np.ndarray:
    """Bind, call; returns acc[:tokens, :n]. ``device`` None runs numpy arrays on the CPU."""
    n, k = w.shape
    n_p, k_p = _padded(n, k)
    params = {"n_padded": n_p, "k_padded": k_p, "token_tile": KNOBS[False].token_tile}
    call = layout_dot2.bind({name.split("_")[0]: mod[name]}, params, q.shape[0], words=True)
    call.q[:, :k] = q
    packed = aligned_copy(layout_dot2.pack_ternary(w, n_p, k_p))
    if device is None:
        return call.run(packed)[:, :n]
    args = [tvm.runtime.tensor(x, device=device) for x in call.args(packed)]
    mod[name](*args)
    call.acc[...] = args[-1].numpy()
    return call.out[:, :n]


# ----------------------------------------------------------------------------- algebra on the CPU


@pytest.fixture(scope="module")
def cpu_module():
    return tvm.compile(tvm.IRModule(_funcs("cpu", SHAPES)), target=CPU_TARGET).mod


@pytest.mark.parametrize("n,k", SHAPES)
def test_cpu_spelling_is_exact(cpu_module, n, k):
    rng = np.random.default_rng(n * 7919 + k)
    w = rng.integers(-1, 2, (n, k), dtype=np.int8)
    for tokens in (1, 3, 17):
        q = rng.integers(-128, 128, (tokens, k), dtype=np.int8)
        kind = "gemv" if tokens == 1 else "gemm"
        np.testing.assert_array_equal(_run(cpu_module, f"{kind}_{n}_{k}", w, q), reference.ternary_matmul(q, w))


def test_cpu_spelling_at_the_extremes(cpu_module):
    n, k = 640, 2560
    w = np.resize(np.array([1, -1, 0], np.int8), n)[:, None] * np.ones((1, k), np.int8)
    for value in (-128, 127):
        for kind, tokens in (("gemv", 1), ("gemm", 9)):
            q = np.full((tokens, k), value, np.int8)
            np.testing.assert_array_equal(_run(cpu_module, f"{kind}_{n}_{k}", w, q), reference.ternary_matmul(q, w))


def test_dp4a_word_formula_in_numpy():
    """The uint32 word decode + a numpy dp4a (signed bytes) against the reference."""
    rng = np.random.default_rng(3)
    n, k = 48, 80
    w = rng.integers(-1, 2, (n, k), dtype=np.int8)
    q = rng.integers(-128, 128, (1, k), dtype=np.int8)
    a, p = layout_dot2.act_words(q), layout_dot2.packed_words(layout_dot2.pack_ternary(w, n, k))  # [1, C, 4], [N/16, C, 16]
    acc = np.zeros(n, np.int64)
    for f in range(4):
        x = (p >> np.uint32(2 * f)) & np.uint32(gpu_matmul.FIELD_MASK)
        s = ((x + np.uint32(gpu_matmul.BYTE_BIAS)) ^ np.uint32(gpu_matmul.SIGN_BITS)).view(np.int8)  # [N/16, C, 64]
        s = s.reshape(n // 16, -1, 16, 4).transpose(0, 2, 1, 3).reshape(n, -1, 4).astype(np.int64)
        acc += (s * np.ascontiguousarray(a[0, :, f]).view(np.int8).reshape(-1, 4).astype(np.int64)).sum(axis=(1, 2))
    np.testing.assert_array_equal(acc[None, :], reference.ternary_matmul(q, w))


# ----------------------------------------------------------------------------- generated sources


def _compile_cuda(funcs: dict):
    """As the compiler does (nvcc fatbin): a plain tvm.compile cannot make CUDA modules once
    TVM's CUDA runtime is loaded in the process, which compiling a CUDA artifact does."""
    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc")
    return cuda_toolchain.compile_fatbin(tvm.IRModule(funcs), parse_target("cuda").tvm_target())


@pytest.fixture(scope="module")
def cuda_source() -> str:
    funcs = _funcs("cuda", SOURCE_SHAPES)
    funcs["quant"] = act_quant.build_primfunc_gpu("quant", 2560, 2560)
    funcs["dequant"] = dequant.build_primfunc_gpu("dequant", 2560, 2560)
    ex = _compile_cuda(funcs)
    assert ex.mod.imports[0].kind == "cuda"
    return ex.mod.imports[0].inspect_source("cuda")


@pytest.fixture(scope="module")
def metal_source() -> str:
    funcs = _funcs("metal", SOURCE_SHAPES[:2])
    funcs["quant"] = act_quant.build_primfunc_gpu("quant", 2560, 2560)
    funcs["dequant"] = dequant.build_primfunc_gpu("dequant", 2560, 2560)
    return tvm.compile(tvm.IRModule(funcs), target=parse_target("metal").tvm_target()).mod.imports[0].inspect_source("metal")


def _launch_bounds(src: str) -> dict[str, int]:
    return {m[2]: int(m[1]) for m in re.finditer(r'extern "C" __global__ void __launch_bounds__\((\d+)\) (\w+)\(', src)}


def test_cuda_source_kernels_and_launch_bounds(cuda_source):
    bounds = _launch_bounds(cuda_source)
    for n, k in SOURCE_SHAPES:
        assert bounds[f"gemv_{n}_{k}_kernel"] == KNOBS[True].rows_per_block * KNOBS[True].k_split
        assert bounds[f"gemm_{n}_{k}_kernel"] == KNOBS[False].rows_per_block
    assert bounds["quant_kernel"] == act_quant.GPU_THREADS
    assert bounds["dequant_kernel"] == dequant.GPU_THREADS
    assert "__dp4a" in cuda_source and "__shfl_down_sync" in cuda_source


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_nvcc_compiles_cuda_source(cuda_source, tmp_path):
    (tmp_path / "k.cu").write_text(cuda_source)
    run = subprocess.run(
        ["nvcc", "--fatbin", "-arch=sm_80", "-O3", "-o", str(tmp_path / "k.fatbin"), str(tmp_path / "k.cu")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "k.fatbin").read_bytes()[:4] == b"\x50\xed\x55\xba"  # fatbin magic


def test_metal_source(metal_source):
    names = re.findall(r"kernel void (\w+)\(", metal_source)
    expected = {f"{kind}_{n}_{k}_kernel" for n, k in SOURCE_SHAPES[:2] for kind in ("gemv", "gemm")}
    assert expected | {"quant_kernel", "dequant_kernel"} <= set(names)
    assert "#include <metal_stdlib>" in metal_source
    assert metal_source.count("{") == metal_source.count("}")
    assert "__dp4a" not in metal_source


def test_metal_shuffles_stay_inside_the_simd_group(metal_source):
    """A lane index built from threadIdx.y points outside the 32-wide SIMD group (undefined in
    MSL); TVM emits one when Metal's warp is set to 32 lanes, which is why it stays at 16."""
    shuffles = re.findall(r"simd_shuffle(?:_down)?\(([^;]*)\);", metal_source)
    assert shuffles and not [s for s in shuffles if "threadIdx.y" in s]


# ----------------------------------------------------------------------------- on a real GPU


def _has_cuda() -> bool:
    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001 - no CUDA runtime at all
        return False


@pytest.mark.skipif(not _has_cuda(), reason="no CUDA device")
def test_cuda_kernels_exact_on_gpu():
    dev = tvm.cuda(0)
    mod = _compile_cuda(_funcs("cuda", SHAPES)).mod
    for n, k in SHAPES:
        rng = np.random.default_rng(n * 31 + k)
        w = rng.integers(-1, 2, (n, k), dtype=np.int8)
        for tokens in (1, 3, 17):
            q = rng.integers(-128, 128, (tokens, k), dtype=np.int8)
            kind = "gemv" if tokens == 1 else "gemm"
            np.testing.assert_array_equal(_run(mod, f"{kind}_{n}_{k}", w, q, dev), reference.ternary_matmul(q, w))


@pytest.mark.skipif(not _has_cuda(), reason="no CUDA device")
def test_cuda_quant_dequant_on_gpu():
    dev = tvm.cuda(0)
    k, k_p, n, n_p = 100, 112, 70, 80
    funcs = {"quant": act_quant.build_primfunc_gpu("quant", k, k_p), "dequant": dequant.build_primfunc_gpu("dequant", n, n_p)}
    mod = _compile_cuda(funcs).mod
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, k)).astype(np.float32)
    q_d, s_d = tvm.runtime.tensor(np.zeros((5, k_p), np.int8), device=dev), tvm.runtime.tensor(np.zeros(5, np.float32), device=dev)
    mod["quant"](tvm.runtime.tensor(x, device=dev), q_d, s_d)
    want_q, want_s = reference.quantize_activations(x, k_p)
    np.testing.assert_array_equal(q_d.numpy(), want_q)
    np.testing.assert_array_equal(s_d.numpy(), want_s)
    acc = rng.integers(-(10**6), 10**6, (5, n_p), dtype=np.int32)
    ws = rng.random(n).astype(np.float32)
    out_d = tvm.runtime.tensor(np.zeros((5, n), np.float32), device=dev)
    mod["dequant"](*(tvm.runtime.tensor(a, device=dev) for a in (acc, want_s, ws)), out_d)
    np.testing.assert_array_equal(out_d.numpy(), reference.dequantize(acc, want_s, ws))
