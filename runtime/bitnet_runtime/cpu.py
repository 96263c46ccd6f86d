"""The host's instruction-set features, spelled as LLVM spells them, without TVM.

Kernels are compiled for an ISA (``mattr``/``mcpu``); before running one, the runtime compares
what it was built for with what this CPU has, so a mismatch is a clear error rather than
SIGILL. The kernel (/proc/cpuinfo) and macOS (sysctl) name features their own way, so each name
is mapped to LLVM's; names LLVM has no feature for are dropped.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

_LLVM_X86 = (
    "sse",
    "sse2",
    "sse3",
    "ssse3",
    "sse4.1",
    "sse4.2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "bmi",
    "bmi2",
    "lzcnt",
    "popcnt",
    "movbe",
    "aes",
    "pclmul",
    "vpclmulqdq",
    "vaes",
    "gfni",
    "sha",
    "adx",
    "avx512f",
    "avx512cd",
    "avx512dq",
    "avx512bw",
    "avx512vl",
    "avx512ifma",
    "avx512vbmi",
    "avx512vbmi2",
    "avx512vnni",
    "avx512bitalg",
    "avx512vpopcntdq",
    "avx512bf16",
    "avx512fp16",
    "avxvnni",
    "avxvnniint8",
    "avxifma",
    "amx-tile",
    "amx-int8",
    "amx-bf16",
)
# Linux /proc/cpuinfo and macOS machdep.cpu spellings that differ from LLVM's.
_X86_ALIASES = {
    "pni": "sse3",
    "sse4_1": "sse4.1",
    "sse4_2": "sse4.2",
    "avx1.0": "avx",
    "bmi1": "bmi",
    "abm": "lzcnt",
    "pclmulqdq": "pclmul",
    "sha_ni": "sha",
    "avx512_vbmi2": "avx512vbmi2",
    "avx512_vnni": "avx512vnni",
    "avx512_bitalg": "avx512bitalg",
    "avx512_vpopcntdq": "avx512vpopcntdq",
    "avx512_bf16": "avx512bf16",
    "avx512_fp16": "avx512fp16",
    "avx_vnni": "avxvnni",
    "avx_vnni_int8": "avxvnniint8",
    "avx_ifma": "avxifma",
    "amx_tile": "amx-tile",
    "amx_int8": "amx-int8",
    "amx_bf16": "amx-bf16",
}
_LLVM_AARCH64 = (
    "neon",
    "dotprod",
    "i8mm",
    "fullfp16",
    "fp16fml",
    "bf16",
    "sve",
    "sve2",
    "crc",
    "lse",
    "rdm",
    "aes",
    "sha2",
    "sha3",
    "sme",
    "sme2",
)
# Linux /proc/cpuinfo and macOS hw.optional spellings that differ from LLVM's.
_AARCH64_ALIASES = {
    "asimd": "neon",
    "asimddp": "dotprod",
    "asimdhp": "fullfp16",
    "asimdfhm": "fp16fml",
    "asimdrdm": "rdm",
    "atomics": "lse",
    "crc32": "crc",
    "sha512": "sha3",
    "feat_dotprod": "dotprod",
    "feat_i8mm": "i8mm",
    "feat_fp16": "fullfp16",
    "feat_fhm": "fp16fml",
    "feat_bf16": "bf16",
    "feat_lse": "lse",
    "feat_crc32": "crc",
    "feat_rdm": "rdm",
    "feat_aes": "aes",
    "feat_sha256": "sha2",
    "feat_sha3": "sha3",
    "feat_sme": "sme",
    "feat_sme2": "sme2",
}
_TO_LLVM = {
    "x86_64": {**{name: name for name in _LLVM_X86}, **_X86_ALIASES},
    "aarch64": {**{name: name for name in _LLVM_AARCH64}, **_AARCH64_ALIASES},
}
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


def host_arch() -> str:
    """One name per architecture, whatever the OS calls it (macOS says arm64, Windows AMD64)."""
    machine = platform.machine().lower()
    return _ARCH_ALIASES.get(machine, machine)


def host_cpu_features() -> frozenset[str]:
    """Empty when the OS offers neither /proc/cpuinfo nor sysctl: nothing is then assumed."""
    cpuinfo = Path("/proc/cpuinfo")
    raw = parse_cpuinfo(cpuinfo.read_text()) if cpuinfo.is_file() else _sysctl_flags()
    return to_llvm_features(raw, host_arch())


def to_llvm_features(raw: set[str], arch: str) -> frozenset[str]:
    """OS feature names (any case) to LLVM's; unknown names and architectures give nothing."""
    table = _TO_LLVM.get(arch, {})
    return frozenset(table[name] for name in (flag.lower() for flag in raw) if name in table)


def parse_cpuinfo(text: str) -> set[str]:
    """All cores of a supported host share one ISA, so the first flag line stands for all."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def parse_sysctl(text: str) -> set[str]:
    """macOS lists x86 features as words (``machdep.cpu.features: FMA AVX2``) and arm64 ones as
    switches (``hw.optional.arm.FEAT_DotProd: 1``); both become bare names."""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        value = value.strip()
        if value == "1":
            flags.add(key.strip().rsplit(".", 1)[-1])
        elif key.startswith("machdep.cpu."):
            flags.update(value.split())
    return flags


def _sysctl_flags() -> set[str]:
    """sysctl exits non-zero when one name is unknown (each Mac has only some), yet still prints
    the others, so its status is ignored."""
    names = ["machdep.cpu.features", "machdep.cpu.leaf7_features", "hw.optional"]
    try:
        done = subprocess.run(["sysctl", *names], capture_output=True, text=True, check=False)
    except OSError:
        return set()
    return parse_sysctl(done.stdout)
