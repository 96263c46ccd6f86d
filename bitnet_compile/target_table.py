"""``bitnet-compile targets``: every target preset, what its kernels use, and what this
machine can do with it (run it, verify it under emulation, only compile it, or nothing yet).

Status words, most capable first:
    runs here                 this machine executes the kernels (CPU with the features, or a GPU)
    verified under emulation  another CPU architecture whose kernels this machine checks
                              exactly under qemu (bitnet-compile verify DIR)
    compile-only              the artifact builds here, but nothing here can run it (GPU
                              artifacts: code generation and files are checked, see tests)
    stub                      listed so the plan is visible; selecting it is a clear error
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from bitnet_runtime import cpu

from . import cross
from .errors import UserError
from .target import list_presets, parse_target

# The features that decide which kernels a CPU target gets (the rest of LLVM's list is noise here).
KERNEL_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512vnni", "avx512vbmi", "neon", "dotprod", "fullfp16", "i8mm", "sve")


@dataclass(frozen=True)
class TargetRow:
    name: str
    kind: str
    features: str
    status: str
    records: str
    description: str


def _cpu_row(preset: dict) -> TargetRow:
    from . import records

    spec = parse_target(preset["name"])
    features = " ".join(f for f in KERNEL_FEATURES if f in spec.features)
    if not cross.is_foreign(spec.arch):
        missing = sorted(set(spec.required_features) - cpu.host_cpu_features())
        status = f"compile-only (this CPU lacks {', '.join(missing[:3])})" if missing else "runs here"
    else:
        status = "verified under emulation" if _can_emulate(spec.arch) else f"compile-only (no qemu for {spec.arch})"
    tuned = sum(len(records.read(p)["records"]) for p in records.paths_for(spec) if p.is_file())
    return TargetRow(
        preset["name"], f"{spec.arch} ({spec.isa})", features, status, f"{tuned} kernels" if tuned else "none", preset["description"]
    )


def _can_emulate(arch: str) -> bool:
    try:
        cross.emulator(arch)
    except UserError:
        return False
    return shutil.which(cross.CROSS[arch].gcc) is not None


def _gpu_status(kind: str) -> str:
    """CUDA runs where the driver sees a GPU and compiles where nvcc is; Metal only compiles here."""
    if kind == "cuda":
        if shutil.which("nvcc") is None:
            return "needs nvcc to compile"
        from bitnet_runtime.gpu import cuda_device_count

        return "runs here" if cuda_device_count() > 0 else "compile-only"
    return "compile-only (runs on macOS)"


def _other_row(preset: dict) -> TargetRow:
    kind = preset["target"]["kind"]
    status = _gpu_status(kind) if preset["status"] == "supported" else preset["status"]
    return TargetRow(preset["name"], kind, " ".join(preset.get("features", [])), status, "none", preset["description"])


def rows() -> list[TargetRow]:
    """One row per preset, in name order."""
    return [_cpu_row(p) if p["status"] == "supported" and p["target"]["kind"] == "llvm" else _other_row(p) for p in list_presets()]


def format_table(table: list[TargetRow]) -> str:
    head = ("target", "kind", "kernel features", "status", "tuned records")
    cells = [head] + [(r.name, r.kind, r.features, r.status, r.records) for r in table]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(verbose: bool = False) -> int:
    table = rows()
    print(format_table(table))
    if verbose:
        print()
        for r in table:
            print(f"{r.name}: {r.description}")
    return 0
