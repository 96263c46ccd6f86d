"""The artifact's ``manifest.json``, typed: what is in the library, for which CPU, in which layout.

The compiler builds a ``Manifest`` and writes ``to_json()``; the runtime reads it back with
``read_manifest``, which checks every field's type before anything is loaded, so a wrong or
damaged artifact is a one-line error instead of a crash inside native code. A manifest of
another format version is refused with the command that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

FORMAT_VERSION = 7  # 7: rotary_append and decode_attention over rows of a slot-indexed KV pool, i8_gemm; 6: the digest; 5: the compiled decode step (program); 4: linears carry rmsnorm_quantize; 3: typed manifest, only each kernel's own knobs; 2: per-row weight scales
MANIFEST_FILE = "manifest.json"
LIBRARY_FILE = "kernels.so"
RUNTIME_LIBRARY_FILE = "libtvm_runtime.so"
CUDA_SOURCE_FILE = "kernels.cu"  # CUDA artifacts: the generated source, for reading (the library has the fatbin)
METAL_SOURCE_FILE = "kernels.metal"  # Metal artifacts: the kernels, as Metal Shading Language
# the decode step's kernels between the linears: their shapes are the model's (heads, head size, ffn)
DECODER_OPS = ("rmsnorm", "rotary_append", "decode_attention", "residual_dequantize", "gated_act")
KERNEL_OPS = (
    "quantize",
    "rmsnorm_quantize",
    "lut_table",
    "lut_gemv",
    "lut_gemm",
    "dot2_gemv",
    "dot2_gemm",
    "gpu2_gemv",
    "gpu2_gemm",
    "dequantize",
    "f16_gemv",
    "f16_gemm",
    "i8_gemv",
    "i8_gemm",
    *DECODER_OPS,
)
SIZES = ("n", "k", "n_padded", "k_padded")  # every linear kernel's shape: the sizes numpy allocates
REBUILD = "rebuild it with bitnet-compile (e.g. bitnet-compile --target TARGET --model MODEL -o DIR)"


class _Reader:
    """Typed access to one JSON object of the manifest; errors name the field's path."""

    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            raise UserError(f"manifest is corrupted: {where} is not a JSON object")
        self.data, self.where = data, where

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., none: bool = False) -> Any:
        if key not in self.data:
            if default is ...:
                raise UserError(f"manifest is corrupted: {self.where}.{key} is missing")
            return default
        value = self.data[key]
        if value is None and none:
            return None
        if not _is(value, kind):
            raise UserError(f"manifest is corrupted: {self.where}.{key} has the wrong type ({type(value).__name__})")
        return value

    def obj(self, key: str, none: bool = False) -> _Reader | None:
        value = self.get(key, dict, none=none)
        return None if value is None else _Reader(value, f"{self.where}.{key}")

    def objects(self, key: str, default: Any = ...) -> list[_Reader]:
        items = self.get(key, list, default)
        return [_Reader(item, f"{self.where}.{key}[{i}]") for i, item in enumerate(items)]

    def mapping(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> dict[str, Any]:
        """A JSON object whose values must all be of ``kind``: the shapes, knobs and kernel
        names that reach numpy and native code."""
        value = self.get(key, dict, default)
        if not all(_is(v, kind) for v in value.values()):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise UserError(f"manifest is corrupted: {self.where}.{key} must map names to {names}")
        return dict(value)


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    """isinstance, except that JSON's true/false is not a number unless bool is asked for."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return isinstance(value, kinds) and (not isinstance(value, bool) or bool in kinds)


@dataclass(frozen=True)
class FileEntry:
    """A file of the artifact directory and its sha256 (checked before it is loaded)."""

    file: str
    sha256: str

    @classmethod
    def from_json(cls, r: _Reader) -> FileEntry:
        """A bare file name: the manifest decides what is loaded, so it may name nothing outside
        the artifact directory (no path separators, no "..", nothing absolute)."""
        name, sha256 = r.get("file", str), r.get("sha256", str)
        if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise UserError(f"manifest is corrupted: {r.where}.file {name!r} is not the name of a file in the artifact directory")
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise UserError(f"manifest is corrupted: {r.where}.sha256 is not a sha256")
        return cls(name, sha256)


@dataclass(frozen=True)
class KernelEntry:
    """One compiled kernel: its symbol, operator, padded shape, schedule knobs and their source."""

    name: str
    op: str
    shape: dict[str, Any]
    knobs: dict[str, Any] = field(default_factory=dict)
    knob_source: str = "fixed"

    @classmethod
    def from_json(cls, r: _Reader) -> KernelEntry:
        op = r.get("op", str)
        if op not in KERNEL_OPS:
            raise UserError(f"manifest is corrupted: {r.where}.op {op!r} is not a kernel this runtime knows ({', '.join(KERNEL_OPS)})")
        shape = r.obj("shape")
        for key in () if op in DECODER_OPS else SIZES:  # the sizes must be numbers; the rest (rows, variant) numbers or names
            shape.get(key, int)
        knobs = r.mapping("knobs", (int, float, bool, str), {})
        return cls(r.get("name", str), op, r.mapping("shape", (int, str)), knobs, r.get("knob_source", str, "fixed"))


@dataclass(frozen=True)
class LinearEntry:
    """A ternary linear layer's shape, padding, weight layout and the kernels that compute it."""

    name: str
    n: int
    k: int
    n_padded: int
    k_padded: int
    layout: str
    layout_params: dict[str, Any]
    kernels: dict[str, str]

    @classmethod
    def from_json(cls, r: _Reader) -> LinearEntry:
        sizes = [r.get(key, int) for key in SIZES]
        return cls(r.get("name", str), *sizes, r.get("layout", str), r.mapping("layout_params", int), r.mapping("kernels", str))

    @property
    def shape(self) -> dict[str, int]:
        return {"n": self.n, "k": self.k, "n_padded": self.n_padded, "k_padded": self.k_padded}

    @property
    def params(self) -> dict[str, int]:
        """The shape and the layout's parameters in one mapping: what a layout's ``bind`` reads."""
        return self.shape | self.layout_params


@dataclass(frozen=True)
class OutputFormat:
    """One output-layer format (f16, i8): its weight layout, kernels and padding where it pads."""

    layout: str
    kernels: dict[str, str]
    n_padded: int | None = None
    k_padded: int | None = None

    @classmethod
    def from_json(cls, r: _Reader) -> OutputFormat:
        return cls(
            r.get("layout", str),
            r.mapping("kernels", str),
            r.get("n_padded", int, None, none=True),
            r.get("k_padded", int, None, none=True),
        )


@dataclass(frozen=True)
class OutputLayer:
    """The [vocab, hidden] output layer's kernels, by format."""

    n: int
    k: int
    formats: dict[str, OutputFormat]

    @classmethod
    def from_json(cls, r: _Reader) -> OutputLayer:
        formats = r.obj("formats")
        return cls(r.get("n", int), r.get("k", int), {name: OutputFormat.from_json(formats.obj(name)) for name in formats.data})

    def params(self, fmt: str) -> dict[str, int]:
        """The shape of format ``fmt`` (its padding where it pads): what a layout's ``bind`` reads."""
        f = self.formats[fmt]
        padded = {"n_padded": f.n_padded, "k_padded": f.k_padded}
        return {"n": self.n, "k": self.k} | {key: value for key, value in padded.items() if value is not None}


@dataclass(frozen=True)
class Decoder:
    """What the compiled decode step needs of a model beyond its linears: the attention's
    shape, the MLP's activation and whether sub-norms precede o_proj and down_proj. The
    compiler builds the step for one (``bitnet_compile.models``); the runtime checks the
    model it loads against it."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    act: str
    sub_norms: bool

    @classmethod
    def from_json(cls, r: _Reader) -> Decoder:
        sizes = [r.get(key, int) for key in ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn")]
        if min(sizes) < 1:
            raise UserError(f"manifest is corrupted: {r.where} has a size below 1")
        return cls(*sizes, r.get("act", str), r.get("sub_norms", bool))


@dataclass(frozen=True)
class Program:
    """The compiled decode step (``decode_step.py``): the decoder it was built for, its
    functions by output format, and its kernels beyond the linears' by role."""

    decoder: Decoder
    functions: dict[str, str]  # output format -> function
    kernels: dict[str, str]  # role -> kernel
    kernel_calls: dict[str, int]  # output format -> kernels one decode step runs

    @classmethod
    def from_json(cls, r: _Reader) -> Program:
        functions, calls = r.mapping("functions", str), r.mapping("kernel_calls", int)
        if set(calls) != set(functions):
            raise UserError(f"manifest is corrupted: {r.where}.kernel_calls must name the same formats as its functions")
        return cls(Decoder.from_json(r.obj("decoder")), functions, r.mapping("kernels", str), calls)


@dataclass(frozen=True)
class Device:
    """A GPU artifact's device code: kind (cuda, metal), arch, code form, launch geometry and
    (Metal) buffer bindings per kernel."""

    kind: str
    code: str
    launch: dict[str, Any]
    arch: str | None = None
    arguments: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, r: _Reader) -> Device:
        return cls(
            r.get("kind", str),
            r.get("code", str),
            r.get("launch", dict),
            r.get("arch", str, None, none=True),
            r.get("arguments", dict, None, none=True),
        )


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to know before it loads native code."""

    created: str
    compiler: dict[str, str]
    model: str | None
    target: dict[str, Any]  # TargetSpec.to_json(): kind, arch, triple, mcpu, isa, features, ...
    required_cpu_features: tuple[str, ...]
    family: str
    library: FileEntry
    runtime_library: FileEntry | None
    kernels: tuple[KernelEntry, ...]
    linears: tuple[LinearEntry, ...]
    output_layer: OutputLayer | None = None
    program: Program | None = None
    device_libraries: tuple[FileEntry, ...] = ()
    sources: tuple[FileEntry, ...] = ()
    device: Device | None = None
    format_version: int = FORMAT_VERSION

    @property
    def device_kind(self) -> str:
        return self.device.kind if self.device else "cpu"

    def kernel(self, name: str) -> KernelEntry | None:
        return next((k for k in self.kernels if k.name == name), None)

    def to_json(self) -> dict[str, Any]:
        """JSON types only (lists, not tuples), so ``from_json(to_json())`` is the identity;
        the version first, where a reader of the file looks for it, the digest last."""
        data = asdict(self)
        for key in ("required_cpu_features", "kernels", "linears", "device_libraries", "sources"):
            data[key] = list(data[key])
        data = {"format_version": data.pop("format_version"), **data}
        return data | {"digest": digest_of(data)}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        r = _Reader(data, "manifest")
        version = r.data.get("format_version")
        if version != FORMAT_VERSION:
            raise UserError(f"artifact has manifest format version {version!r}; this runtime reads version {FORMAT_VERSION}: {REBUILD}")
        if r.data.get("digest") != digest_of(r.data):
            raise UserError(f"manifest is corrupted: its digest does not match its contents (was it edited?): {REBUILD}")
        features = r.get("required_cpu_features", list)
        if not all(isinstance(f, str) for f in features):
            raise UserError("manifest is corrupted: manifest.required_cpu_features must be a list of strings")
        runtime_library, output_layer, program, device = (
            r.obj("runtime_library", none=True),
            r.obj("output_layer", none=True),
            r.obj("program", none=True) if "program" in r.data else None,
            r.obj("device", none=True),
        )
        return cls(
            created=r.get("created", str),
            compiler=r.get("compiler", dict),
            model=r.get("model", str, None, none=True),
            target=r.get("target", dict),
            required_cpu_features=tuple(features),
            family=r.get("family", str),
            library=FileEntry.from_json(r.obj("library")),
            runtime_library=runtime_library and FileEntry.from_json(runtime_library),
            kernels=tuple(KernelEntry.from_json(k) for k in r.objects("kernels")),
            linears=tuple(LinearEntry.from_json(e) for e in r.objects("linears")),
            output_layer=output_layer and OutputLayer.from_json(output_layer),
            program=program and Program.from_json(program),
            device_libraries=tuple(FileEntry.from_json(f) for f in r.objects("device_libraries", [])),
            sources=tuple(FileEntry.from_json(f) for f in r.objects("sources", [])),
            device=device and Device.from_json(device),
            format_version=version,
        )


def digest_of(data: dict[str, Any]) -> str:
    """sha256 of a manifest's JSON (its own "digest" left out, keys sorted): written with the
    manifest and checked before anything in it is believed, so an edit (a CPU feature
    removed, a file name changed) is refused rather than obeyed."""
    body = {key: value for key, value in data.items() if key != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(artifact_dir: Path) -> Manifest:
    path = artifact_dir / MANIFEST_FILE
    if not artifact_dir.is_dir():
        raise UserError(f"artifact directory {artifact_dir} does not exist")
    if not path.is_file():
        raise UserError(f"{path} is missing: not an artifact, or its build did not finish")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is corrupted: {err}") from None
    try:
        return Manifest.from_json(data)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
