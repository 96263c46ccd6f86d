"""Every gpu2 GEMV of a CUDA artifact on the GPU: checked exactly, then timed on its device
buffers (200 back-to-back calls, median of 5; launch included, weights warm in L2).

    python benchmarks/gpu_gemv.py ARTIFACT_DIR      (the device runtime and tvm-ffi only)
"""

import sys
import time
from pathlib import Path

import numpy as np
import tvm_ffi

from bitnet_runtime import verify
from bitnet_runtime.artifact import Artifact

art = Artifact(Path(sys.argv[1]).resolve())
rng = np.random.default_rng(0)
print("| kernel | us per call (median of 5 x 200) | weight GB/s |")
print("|---|---|---|")
for k in art.manifest.kernels:
    if k.op != "gpu2_gemv":
        continue
    kernel = art.kernel(k.name)
    assert verify.check_gpu2_matmul(kernel, rng), k.name  # exact, and it makes the device buffers
    df = kernel.function
    bufs = list(df._buffers.values())
    out = bufs[-1]
    host = np.empty(tuple(out.shape), dtype=str(out.dtype))
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(200):
            df.function(*bufs)
        df._copy(out, tvm_ffi.from_dlpack(host))  # waits for the kernels
        samples.append((time.perf_counter() - start) / 200)
    sec = float(np.median(samples))
    nbytes = k.shape["n_padded"] * k.shape["k_padded"] // 4
    print(f"| {k.name} | {sec * 1e6:.1f} | {nbytes / sec / 1e9:.0f} |")
