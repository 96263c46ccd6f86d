"""The artifact's ``manifest.json``: what is in the library, for which CPU, in which layout.

Read and checked before anything is loaded, so a wrong or damaged artifact is a one-line
error instead of a crash inside native code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import UserError

FORMAT_VERSION = 2  # 2: dequantize takes one weight scale per output row
MANIFEST_FILE = "manifest.json"
LIBRARY_FILE = "kernels.so"
RUNTIME_LIBRARY_FILE = "libtvm_runtime.so"
CUDA_SOURCE_FILE = "kernels.cu"  # CUDA artifacts: the generated source, for reading (the library has the fatbin)
METAL_SOURCE_FILE = "kernels.metal"  # Metal artifacts: the kernels, as Metal Shading Language
REQUIRED_FIELDS = ("format_version", "target", "required_cpu_features", "family", "library", "runtime_library", "kernels", "linears")
KERNEL_OPS = ("quantize", "lut_table", "lut_gemv", "lut_gemm", "dot2_gemv", "dot2_gemm", "gpu2_gemv", "gpu2_gemm", "dequantize", "f16_gemv", "i8_gemv")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(artifact_dir: Path) -> dict:
    path = artifact_dir / MANIFEST_FILE
    if not artifact_dir.is_dir():
        raise UserError(f"artifact directory {artifact_dir} does not exist")
    if not path.is_file():
        raise UserError(f"{path} is missing: not an artifact, or its build did not finish")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is corrupted: {err}") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path} is corrupted: not a JSON object")
    missing = [f for f in REQUIRED_FIELDS if f not in manifest]
    if missing:
        raise UserError(f"{path} is corrupted: missing {', '.join(missing)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise UserError(
            f"{path} has format version {manifest['format_version']!r}; this runtime reads version {FORMAT_VERSION}: rebuild the artifact"
        )
    for kernel in manifest["kernels"]:
        if not isinstance(kernel, dict) or kernel.get("op") not in KERNEL_OPS or "name" not in kernel or "shape" not in kernel:
            raise UserError(f"{path} is corrupted: bad kernel entry {kernel!r:.80}")
    return manifest
