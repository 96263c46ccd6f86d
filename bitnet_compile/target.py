"""Compilation targets: parse what the user typed into one resolved, immutable `TargetSpec`.

Why this module exists: TVM 0.27 rejects the classic CLI target strings ("llvm -mcpu=native")
that users and our own CLI still speak, and it silently turns `-mcpu=native` into `generic`
(no AVX2, no AVX-512) under the wheel's default conda triple. So we parse every accepted form
ourselves, resolve `native` to the real host CPU, ask LLVM (through TVM) which features the
code will be compiled for, and pick the kernel variant (`isa`) from those features. What is
built, and what the manifest records, is then exactly what LLVM was told.

Targets are data: named presets live in `targets/*.json` at the repository root; the only
target knowledge in code is two small tables, `ISA_VARIANTS` (CPU kernel variants by
architecture and features) and `GPU_KINDS` (the options of cuda and metal targets and the CPU
their host launch code is built for).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from bitnet_compile.data import TARGETS_DIR
from bitnet_compile.errors import UserError
from bitnet_runtime.services import usable_cores

if TYPE_CHECKING:  # pragma: no cover - typing only; tvm is imported lazily
    import tvm

__all__ = [
    "ISA_VARIANTS",
    "PRESET_DIR",
    "TargetSpec",
    "list_presets",
    "parse_target",
]

PRESET_DIR = TARGETS_DIR
"""Where the named presets live (the checkout's targets/, or the wheel's packaged copy)."""

# Kernel variants in order of preference: (isa, arch, LLVM features it needs). The first row
# whose arch matches and whose features are all present wins. Add a row here (and flip a
# preset's status) to enable a new variant. NEON asks for dotprod (Armv8.2+: Cortex-A55/A76
# and later, Apple M1+, Graviton 2+) because the int8 output-layer GEMV is written with sdot.
ISA_VARIANTS: tuple[tuple[str, str, frozenset[str]], ...] = (
    ("avx512", "x86_64", frozenset({"avx512f", "avx512bw"})),
    ("avx2", "x86_64", frozenset({"avx2"})),
    ("neon", "aarch64", frozenset({"neon", "dotprod"})),
)

# Triple architecture component -> our arch name. Anything else is rejected.
_ARCHES: Mapping[str, str] = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}

# Instruction-set extensions (LLVM names) a CPU must really have to run code compiled with
# them; `features` also holds LLVM tuning flags (e.g. "prefer-256-bit") that no CPU reports,
# so `required_features` is the intersection with this list.
_ISA_EXTENSIONS: frozenset[str] = frozenset(
    {
        # x86
        "sse", "sse2", "sse3", "ssse3", "sse4.1", "sse4.2", "popcnt", "lzcnt", "movbe",
        "bmi", "bmi2", "f16c", "fma", "avx", "avx2", "avxvnni", "gfni", "vpclmulqdq", "vaes",
        "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512vnni", "avx512vbmi",
        "avx512vbmi2", "avx512bitalg", "avx512vpopcntdq", "avx512ifma", "avx512bf16", "avx512fp16",
        # aarch64
        "neon", "dotprod", "i8mm", "fullfp16", "sve", "sve2", "sme",
    }
)  # fmt: skip

_OPTIONS: tuple[str, ...] = ("mtriple", "mcpu", "mattr", "num-cores")  # accepted llvm options

# GPU kinds: the options each accepts, and the CPU its host code (kernel launches) is built for.
# A generic host CPU, because the artifact runs on whatever server or Mac holds the GPU.
GPU_KINDS: Mapping[str, dict[str, Any]] = {
    "cuda": {"options": ("arch",), "default_arch": "sm_80", "host": {"mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"}},
    # Metal keeps TVM's 16-lane warp: with 32, the GEMV's sum broadcasts from a lane outside
    # the SIMD group (undefined in MSL); with 16 it adds one threadgroup-memory step instead.
    "metal": {"options": (), "default_arch": "", "host": {"mtriple": "arm64-apple-macos", "mcpu": "apple-m1"}},
}
MIN_CUDA_ARCH = 61  # __dp4a
_SUPPORTED_KINDS: frozenset[str] = frozenset({"llvm", *GPU_KINDS})
_CLI_SYNTAX = "'llvm -mcpu=<cpu|native> [-mtriple=<triple>] [-mattr=+f,-g] [-num-cores=N]'"
_JSON_SYNTAX = '\'{"kind": "llvm", "mcpu": ..., "mtriple": ..., "mattr": [...], "num-cores": N}\''


@dataclass(frozen=True)
class TargetSpec:
    """A fully resolved compilation target (no "native", no defaults left for TVM to guess).

    `mattr` is kept besides `features` because it is what LLVM is told (together with
    `mcpu`); `features` is LLVM's own answer to "what does that enable", including its
    dependency rules (e.g. -avx512f removes every avx512* extension).
    """

    name: str  # preset name, or "custom"
    kind: str  # TVM target kind; only "llvm" today
    arch: str  # "x86_64" | "aarch64"
    triple: str
    mcpu: str
    mattr: tuple[str, ...]  # explicit "+f"/"-f" on top of mcpu, in the order given to LLVM
    features: frozenset[str]  # every LLVM feature enabled, ISA extensions and tuning flags
    num_cores: int  # a hint for tuning and parallel splitting; threads are set at load time
    isa: str  # kernel variant from ISA_VARIANTS; for a GPU target its kind ("cuda", "metal")
    gpu_arch: str = ""  # GPU targets: the device architecture (CUDA "sm_80"); the rest is the host

    @property
    def is_gpu(self) -> bool:
        return self.kind in GPU_KINDS

    def tvm_dict(self) -> dict[str, Any]:
        """The TVM dict form of the CPU part (the only form TVM 0.27 accepts): the whole target
        for a CPU, the host code's for a GPU."""
        d: dict[str, Any] = {"kind": "llvm", "mtriple": self.triple, "mcpu": self.mcpu}
        if self.mattr:
            d["mattr"] = list(self.mattr)
        d["num-cores"] = self.num_cores
        return d

    def gpu_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **({"arch": self.gpu_arch} if self.gpu_arch else {})}

    def tvm_target(self) -> tvm.target.Target:
        """Build the `tvm.target.Target` (imports tvm here so this module imports cheaply)."""
        import tvm

        if self.is_gpu:
            return tvm.target.Target(self.gpu_dict(), host=self.tvm_dict())
        return tvm.target.Target(self.tvm_dict())

    @property
    def required_features(self) -> list[str]:
        """ISA extensions the generated code may use, so the running CPU must have (sorted)."""
        return sorted(self.features & _ISA_EXTENSIONS)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TargetSpec:
        """The inverse of ``to_json`` (a worker process gets its target this way, unparsed)."""
        return cls(
            name=d["name"], kind=d["kind"], arch=d["arch"], triple=d["triple"], mcpu=d["mcpu"], mattr=tuple(d["mattr"]),
            features=frozenset(d["features"]), num_cores=d["num_cores"], isa=d["isa"], gpu_arch=d.get("gpu_arch", ""),
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """Serializable description for a build manifest."""
        return {
            "name": self.name,
            "kind": self.kind,
            "arch": self.arch,
            "triple": self.triple,
            "mcpu": self.mcpu,
            "mattr": list(self.mattr),
            "num_cores": self.num_cores,
            "isa": self.isa,
            **({"gpu_arch": self.gpu_arch} if self.gpu_arch else {}),
            "required_features": self.required_features,
            "features": sorted(self.features),
        }


# ----------------------------------------------------------------------------- presets


@lru_cache(maxsize=1)
def _load_presets() -> dict[str, dict[str, Any]]:
    """Read targets/*.json once; a broken preset file is a packaging bug, so it raises."""
    presets: dict[str, dict[str, Any]] = {}
    for path in sorted(PRESET_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        name = data.get("name", path.stem)
        if name != path.stem or not isinstance(data.get("target"), dict) or data.get("status") not in STATUSES:
            raise ValueError(f"malformed target preset {path}: needs name == file stem, target, status in {STATUSES}")
        presets[name] = data
    return presets


STATUSES = ("supported", "stub")  # what a preset's "status" may say: built, or only listed


def list_presets() -> list[dict[str, Any]]:
    """Every preset (name, description, status, target, features), sorted by name."""
    return [{"name": n, **p, "description": p.get("description", "")} for n, p in sorted(_load_presets().items())]


def _names(status: str) -> str:
    return ", ".join(n for n, p in sorted(_load_presets().items()) if p["status"] == status) or "none"


def _fail(problem: str) -> UserError:
    """One-line UserError that always says what would have been accepted."""
    msg = (
        f"{problem}; supported target presets: {_names('supported')} (stubs, listed but not built: {_names('stub')}); "
        f"or {_CLI_SYNTAX}, or a JSON object {_JSON_SYNTAX}; bitnet-compile targets lists them all"
    )
    return UserError(" ".join(msg.split()))


def _show(text: str) -> str:
    """User input quoted for an error message, kept on one line and short."""
    text = " ".join(text.split())
    return repr(text if len(text) <= 80 else text[:77] + "...")


# ----------------------------------------------------------------------------- parsing


def _parse_cli(text: str) -> dict[str, Any]:
    """Classic TVM syntax: `llvm -mcpu=x -mattr=+a,-b`, also `--opt=v` and `-opt v`."""
    tokens = text.split()
    d: dict[str, Any] = {"kind": tokens[0]}
    i = 1
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("-") or tok.strip("-") == "":
            raise _fail(f"cannot parse target {_show(text)}: expected -option=value, got {tok!r}")
        key, eq, value = tok.lstrip("-").partition("=")
        if not eq:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("-"):
                i += 1
                value = tokens[i]
            else:
                raise _fail(f"target option -{key} in {_show(text)} needs a value")
        if key in d:
            raise _fail(f"target option -{key} given twice in {_show(text)}")
        d[key] = [a for a in value.split(",") if a] if key == "mattr" else value
        i += 1
    return d


def _parse_json(text: str) -> dict[str, Any]:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(f"target {_show(text)} is not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(d, dict) or not isinstance(d.get("kind"), str):
        raise _fail(f"target JSON {_show(text)} must be an object with a string 'kind'")
    return d


def _normalize_triple(triple: str) -> str:
    """Drop the wheel's "conda" vendor: x86_64-conda-linux-gnu -> x86_64-linux-gnu."""
    return "-".join(p for p in triple.split("-") if p != "conda")


def _check_options(d: dict[str, Any], shown: str) -> None:
    """Reject unknown kinds/options and wrong value types before anything reaches TVM."""
    kind = d["kind"]
    if kind not in _SUPPORTED_KINDS:
        import tvm

        known = set(tvm.target.Target.list_kinds())
        what = "is not yet supported" if kind in known else "is not a TVM target kind"
        raise _fail(f"target kind {kind!r} {what} (kinds: {', '.join(sorted(_SUPPORTED_KINDS))})")
    accepted = GPU_KINDS[kind]["options"] if kind in GPU_KINDS else _OPTIONS
    unknown = sorted(set(d) - {"kind", *accepted})
    if unknown:
        raise _fail(f"unsupported target option(s) {', '.join(unknown)} in {shown} (accepted for {kind}: {', '.join(accepted) or 'none'})")
    if kind in GPU_KINDS:
        return
    for key in ("mtriple", "mcpu"):
        if key in d and (not isinstance(d[key], str) or not d[key]):
            raise _fail(f"target option {key} must be a non-empty string in {shown}")
    mattr = d.get("mattr", [])
    if isinstance(mattr, str):
        mattr = [a for a in mattr.split(",") if a]
    if not isinstance(mattr, list) or not all(isinstance(a, str) and a.lstrip("+-") for a in mattr):
        raise _fail(f"target option mattr must be a list of '+feature'/'-feature' in {shown}")
    d["mattr"] = [a if a[0] in "+-" else "+" + a for a in mattr]
    if "num-cores" in d:
        n = d["num-cores"]
        try:
            n = int(n) if not isinstance(n, bool) else None
        except (TypeError, ValueError):
            n = None
        if n is None or n < 1:
            raise _fail(f"target option num-cores must be a positive integer in {shown}")
        d["num-cores"] = n


def _llvm_features(triple: str, mcpu: str, mattr: list[str]) -> frozenset[str]:
    """What LLVM enables for this cpu + mattr, with its implication rules applied."""
    import tvm
    from tvm.target import codegen

    t = tvm.target.Target({"kind": "llvm", "mtriple": triple, "mcpu": mcpu, **({"mattr": mattr} if mattr else {})})
    return frozenset(codegen.llvm_get_cpu_features(t))


def _host_corrections(triple: str, mcpu: str) -> list[str]:
    """mattr that makes `mcpu` match what the host really reports.

    LLVM names the host CPU by family/model, but a hypervisor or BIOS may hide extensions that
    model normally has (here: emeraldrapids claims waitpkg/uintr/... the VM masks), so native
    code must not assume them. Mirrors what clang -march=native does.
    """
    import tvm

    host = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures", allow_missing=True)
    reported = dict(host().items()) if host is not None else {}
    if not reported:
        return []
    model = _llvm_features(triple, mcpu, [])
    off = sorted(f for f, on in reported.items() if not on and f in model)
    on = sorted(f for f, on in reported.items() if on and f not in model)
    return [f"-{f}" for f in off] + [f"+{f}" for f in on]


def _resolve(d: dict[str, Any], name: str, shown: str) -> TargetSpec:
    """Turn a checked llvm dict into a TargetSpec: resolve native, validate with LLVM, pick isa."""
    import tvm
    from tvm.target import codegen

    mattr: list[str] = list(d.get("mattr", []))
    triple = d.get("mtriple")
    mcpu = d.get("mcpu", "generic")
    if triple is None:
        triple = tvm.get_global_func("target.llvm_get_system_triple")()
    triple = _normalize_triple(triple)
    arch = _ARCHES.get(triple.split("-")[0])
    if arch is None:
        raise _fail(f"target triple {triple!r} is not supported (x86_64 and aarch64 only)")
    if mcpu == "native":
        mcpu = tvm.get_global_func("target.llvm_get_system_cpu")()
        mattr = _host_corrections(triple, mcpu) + mattr
    if not codegen.llvm_is_valid_cpu(mcpu, triple):
        raise _fail(f"LLVM does not know the CPU {mcpu!r} for {triple}")
    features = _llvm_features(triple, mcpu, mattr)
    named = {a.lstrip("+-") for a in mattr}
    unknown = sorted(named - _llvm_features(triple, mcpu, ["+" + f for f in sorted(named)])) if named else []
    if unknown:
        raise _fail(f"LLVM does not know the feature(s) {', '.join(unknown)} for {triple} in {shown}")
    isa = next((v for v, a, need in ISA_VARIANTS if a == arch and need <= features), None)
    if isa is None:
        variants = " or ".join(f"{v} ({'+'.join(sorted(need))})" for v, a, need in ISA_VARIANTS if a == arch)
        if variants:
            raise _fail(f"target {shown} (mcpu {mcpu}) lacks the SIMD the LUT kernels need: {variants}")
        raise _fail(f"no kernels for {arch} yet (target {shown})")
    num_cores = int(d.get("num-cores") or usable_cores())
    return TargetSpec(name, "llvm", arch, triple, mcpu, tuple(mattr), features, num_cores, isa)


def _resolve_gpu(d: dict[str, Any], name: str, shown: str) -> TargetSpec:
    """A GPU target: its device architecture, and a generic host CPU for the launch code."""
    kind = GPU_KINDS[d["kind"]]
    arch = d.get("arch", kind["default_arch"])
    if d["kind"] == "cuda":
        digits = arch[3:] if isinstance(arch, str) and arch.startswith("sm_") else ""
        if not digits.isdigit() or int(digits) < MIN_CUDA_ARCH:
            raise _fail(
                f"CUDA arch {arch!r} in {shown} is not supported: give sm_{MIN_CUDA_ARCH} or newer (dp4a), e.g. sm_80 (A100), sm_90 (H100)"
            )
    host = kind["host"]
    triple, mcpu = host["mtriple"], host["mcpu"]
    features = _llvm_features(triple, mcpu, [])
    return TargetSpec(name, d["kind"], _ARCHES[triple.split("-")[0]], triple, mcpu, (), features, 1, d["kind"], arch)


def parse_target(text: str) -> TargetSpec:
    """Parse a preset name, a classic TVM CLI string, or a TVM JSON object into a TargetSpec.

    Every failure is a one-line `UserError` listing the supported presets and syntaxes, since
    this is the first thing a user gets wrong and the CLI shows the message as is.
    """
    if not isinstance(text, str) or not text.strip():
        raise _fail("empty target")
    text = text.strip()
    presets = _load_presets()
    if text.startswith("{"):
        d, name = _parse_json(text), "custom"
    elif text in presets:
        preset = presets[text]
        if preset["status"] == "stub":
            raise _fail(f"target {text!r} ({preset['description']}) is a stub, listed but not built: it needs {preset['missing']}")
        d, name = dict(preset["target"]), text
    elif " " not in text and "=" not in text and text not in _SUPPORTED_KINDS:
        import tvm

        if text in set(tvm.target.Target.list_kinds()):
            d, name = {"kind": text}, "custom"  # e.g. "rocm": rejected below as not yet supported
        else:
            raise _fail(f"unknown target {_show(text)}")
    else:
        d, name = _parse_cli(text), "custom"
    shown = _show(text)
    _check_options(d, shown)
    if name == "custom":  # "llvm -mcpu=native" is the native preset: record it by that name
        same = [n for n, p in presets.items() if p["status"] == "supported" and _same(p["target"], d)]
        name = same[0] if same else name
    return _resolve_gpu(d, name, shown) if d["kind"] in GPU_KINDS else _resolve(d, name, shown)


def _same(preset_target: Mapping[str, Any], d: Mapping[str, Any]) -> bool:
    """Whether a parsed dict says exactly what a preset says (same options, same mattr order)."""
    p = dict(preset_target)
    p["mattr"] = list(p.get("mattr", []))
    return p == dict(d)
