"""Load an artifact on the device with apache-tvm-ffi only (never the compiler).

Every check that can be made in Python is made before native code runs: manifest, file
hashes, CPU features (an AVX-512 library must not SIGILL on an AVX2-only CPU), then the
runtime services parallel kernels call, then the library itself.
"""

from __future__ import annotations

import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import cpu, gpu, services
from .errors import UserError
from .manifest import FileEntry, LinearEntry, Manifest, OutputLayer, file_sha256, read_manifest
from .memory import ALIGNMENT, is_aligned


def _checked_file(artifact_dir: Path, entry: FileEntry | None, what: str) -> Path:
    """The file's resolved path, once it is a regular file inside the artifact directory (a
    symbolic link may not lead out of it) with the manifest's sha256."""
    if entry is None:
        raise UserError(f"the manifest names no {what}: the artifact is incomplete, rebuild it with bitnet-compile")
    path = artifact_dir / entry.file
    try:
        real = path.resolve(strict=True)
        regular = stat.S_ISREG(real.stat().st_mode)
    except FileNotFoundError:
        raise UserError(f"{what} {path} is missing from the artifact") from None
    except (OSError, RuntimeError) as err:
        raise UserError(f"cannot read {what} {path}: {getattr(err, 'strerror', None) or err}") from None
    if real.parent != artifact_dir.resolve():
        raise UserError(f"{what} {path} leads outside the artifact directory (to {real}): refused")
    if not regular:
        raise UserError(f"{what} {path} is not a regular file")
    if file_sha256(real) != entry.sha256:
        raise UserError(f"{what} {path} does not match the sha256 in the manifest: the file is corrupted or was replaced")
    return real


# library path -> the sha256 it had when this process loaded it: the dynamic loader keeps the
# first copy, so a library replaced on disk and loaded again would run the old code
_LOADED: dict[str, str] = {}


def _load_once(path: Path, sha256: str) -> None:
    loaded = _LOADED.setdefault(str(path), sha256)
    if loaded != sha256:
        raise UserError(
            f"{path} changed since this process loaded it, and a process cannot load a library twice: restart it to use the new one"
        )


def check_cpu(manifest: Manifest) -> None:
    """Refuse code this CPU cannot execute, naming what is missing."""
    target = manifest.target
    arch = cpu.host_arch()
    if target.get("arch") and target["arch"] != arch:
        raise UserError(
            f"artifact was compiled for {target['arch']} but this machine is {arch}: run it on a {target['arch']} device "
            "(or check it here under qemu with: bitnet-compile verify DIR)"
        )
    missing = sorted(set(manifest.required_cpu_features) - cpu.host_cpu_features())
    if missing:
        raise UserError(
            f"this CPU lacks {', '.join(missing)} which the artifact's code requires "
            f"(compiled for {target.get('mcpu', '?')}): compile for this device, e.g. --target x86-avx2"
        )


@dataclass
class Kernel:
    """A named kernel of the artifact with its manifest entry.

    Calling it checks every array first: tensorized kernels use aligned vector loads and TVM
    does not check alignment, so an unaligned array would crash the process. Code that owns
    its buffers (BitLinear) calls ``function`` directly.
    """

    name: str
    op: str
    shape: dict
    knobs: dict
    function: Callable[..., Any]

    @property
    def params(self) -> dict[str, Any]:
        """The shape and the knobs in one mapping: what a layout's ``bind`` reads."""
        return self.shape | self.knobs

    def __call__(self, *args: Any) -> None:
        for i, arg in enumerate(args):
            if isinstance(arg, np.ndarray) and not is_aligned(arg):
                raise UserError(
                    f"argument {i} of {self.name} must be C-contiguous and {ALIGNMENT}-byte aligned "
                    "(allocate it with bitnet_runtime.memory.aligned_empty)"
                )
        try:
            self.function(*args)
        except (TypeError, ValueError) as err:  # TVM's own argument checks: count, dtype, shape
            raise UserError(f"{self.name}: {str(err).splitlines()[0]}") from None


METAL_HINT = (
    "this artifact holds Metal Shading Language kernels (kernels.metal) for an Apple GPU: build them into a "
    "metallib on macOS and dispatch them with the grids in manifest.json (docs/targets.md 'Metal'); this runtime runs CPU and CUDA artifacts"
)


class KernelTable:
    """The manifest's kernels by name, each wrapped once around the function ``_function``
    gives (a local library's, a GPU's, or an emulator's)."""

    manifest: Manifest

    def _function(self, name: str) -> Callable[..., Any]:
        raise NotImplementedError

    @property
    def kernel_names(self) -> list[str]:
        return [k.name for k in self.manifest.kernels]

    def kernel(self, name: str) -> Kernel:
        cache = self.__dict__.setdefault("_kernels", {})
        if name not in cache:
            entry = self.manifest.kernel(name)
            if entry is None:
                raise UserError(f"unknown kernel {name!r}; this artifact has: {', '.join(self.kernel_names)}")
            cache[name] = Kernel(name, entry.op, entry.shape, entry.knobs, self._function(name))
        return cache[name]


@dataclass
class LaunchStats:
    """Kernel launches and the seconds spent inside them, counted by an Artifact made with
    ``stats``: what the benchmark reports per decoded token (host time is the rest)."""

    calls: int = 0
    seconds: float = 0.0

    def reset(self) -> None:
        self.calls, self.seconds = 0, 0.0

    def counted(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        return call


class Artifact(KernelTable):
    """A loaded artifact: its manifest and its kernels, by name or by linear shape. With
    ``stats`` every kernel call is counted and timed into it (for measuring, not for speed)."""

    def __init__(self, artifact_dir: Path | str, stats: LaunchStats | None = None):
        self.dir = Path(artifact_dir)
        self.stats = stats
        self.manifest = read_manifest(self.dir)
        self.device = self.manifest.device_kind
        if self.device == "metal":
            raise UserError(METAL_HINT)
        library = _checked_file(self.dir, self.manifest.library, "kernel library")
        runtime_library = _checked_file(self.dir, self.manifest.runtime_library, "runtime library")
        check_cpu(self.manifest)
        services.ensure_runtime_services(runtime_library)
        if self.device == "cuda":  # the CUDA runtime and TVM's CUDA module loader, before the library that needs them
            gpu.ensure_cuda_runtime([_checked_file(self.dir, entry, "CUDA runtime library") for entry in self.manifest.device_libraries])
        import tvm_ffi

        _load_once(library, self.manifest.library.sha256)
        self.module = tvm_ffi.load_module(str(library))
        services.check_kernel_services(library)

    def _function(self, name: str) -> Callable[..., Any]:
        function = self.module.get_function(name, query_imports=True)  # a library with a decode program holds the kernels in an import
        if self.device == "cuda":
            import tvm_ffi

            function = gpu.DeviceFunction(function, tvm_ffi.device("cuda", 0))
        return self.stats.counted(function) if self.stats else function

    def output_layer(self, n: int, k: int) -> OutputLayer:
        """The manifest entry of the [vocab, hidden] output layer: its formats and their kernels."""
        entry = self.manifest.output_layer
        if entry is None or (entry.n, entry.k) != (n, k):
            have = f"one for {entry.n}x{entry.k}" if entry else "none"
            raise UserError(
                f"artifact has no output layer kernels for vocab {n} x hidden {k} ({have}): compile the artifact for this model"
            )
        return entry

    def linear(self, n: int, k: int) -> LinearEntry:
        """The manifest entry (padded shape, kernel names) for an [n, k] weight matrix."""
        if self.device != "cpu":
            raise UserError(
                f"this {self.device} artifact runs its kernels one by one (verify); layers and models run on CPU artifacts only, for now"
            )
        for entry in self.manifest.linears:
            if (entry.n, entry.k) == (n, k):
                return entry
        have = sorted({f"{e.n}x{e.k}" for e in self.manifest.linears})
        raise UserError(
            f"artifact has no kernels for a {n}x{k} linear layer (it has {', '.join(have)}): compile the artifact for this model"
        )
