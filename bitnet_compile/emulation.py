"""Run an artifact built for another CPU architecture here, kernel by kernel, under qemu.

``EmulatedArtifact`` looks like ``bitnet_runtime.artifact.Artifact`` to the verifier (same
manifest, same ``kernel(name)`` objects taking numpy arrays), but each call ships its arrays
to a kernel_host process running under qemu user-mode emulation and copies them back: the
kernels run as the device would run them, with the artifact's own libtvm_runtime.so, and their
results are checked with the same numpy references. Speed under emulation means nothing.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import numpy as np

from bitnet_runtime.artifact import KernelTable, _checked_file
from bitnet_runtime.errors import UserError
from bitnet_runtime.manifest import read_manifest

from . import cross

_DLPACK_CODES = {"i": 0, "u": 1, "f": 2}  # numpy dtype kind -> DLDataTypeCode


class KernelHost:
    """One kernel_host process under qemu serving calls into one kernels.so."""

    def __init__(self, arch: str, kernels: Path, runtime: Path, threads: int = 1):
        ffi = cross.runtime_libraries(arch)["ffi"]
        cmd = [*cross.emulator(arch), str(cross.kernel_host(arch)), str(ffi), str(runtime), str(kernels)]
        env = {"TVM_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        if self.proc.stdout.read(4) != b"RDY\n":
            raise UserError(f"the {arch} kernel host did not start under emulation: {self._stderr()}")

    def _stderr(self) -> str:
        self.proc.kill()
        return (self.proc.stderr.read().decode(errors="replace").strip() or "no message").splitlines()[-1]

    def call(self, name: str, *arrays: np.ndarray) -> None:
        """Run kernel ``name`` on the arrays; what it writes lands in them, as with a local call."""
        request = [struct.pack("<I", len(name)), name.encode(), struct.pack("<I", len(arrays))]
        for a in arrays:
            if not isinstance(a, np.ndarray) or a.dtype.kind not in _DLPACK_CODES:
                raise UserError(f"{name}: emulated kernels take numpy integer or float arrays, got {type(a).__name__}")
            a = np.ascontiguousarray(a)
            request += [struct.pack("<BBHI", _DLPACK_CODES[a.dtype.kind], a.dtype.itemsize * 8, 1, a.ndim)]
            request += [struct.pack(f"<{a.ndim}q", *a.shape), struct.pack("<Q", a.nbytes), a.tobytes()]
        try:
            self.proc.stdin.write(b"".join(request))
            self.proc.stdin.flush()
            status, msg_len = struct.unpack("<iI", self._read(8))
            message = self._read(msg_len).decode(errors="replace")
            for a in arrays:
                a[...] = np.frombuffer(self._read(a.nbytes), a.dtype).reshape(a.shape)
        except (BrokenPipeError, EOFError):
            raise UserError(f"{name} crashed the emulated kernel host: {self._stderr()}") from None
        if status != 0:
            raise UserError(f"{name}: {message}")

    def _read(self, n: int) -> bytes:
        data = self.proc.stdout.read(n)
        if len(data) != n:
            raise EOFError
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


class EmulatedArtifact(KernelTable):
    """An artifact for a foreign architecture, its kernels callable here through qemu."""

    def __init__(self, artifact_dir: Path | str, threads: int = 1):
        self.dir = Path(artifact_dir)
        self.manifest = read_manifest(self.dir)
        self.arch = self.manifest.target["arch"]
        library = _checked_file(self.dir, self.manifest.library, "kernel library")
        runtime = _checked_file(self.dir, self.manifest.runtime_library, "runtime library")
        self.host = KernelHost(self.arch, library, runtime, threads)

    def _function(self, name: str):
        return lambda *arrays: self.host.call(name, *arrays)

    def close(self) -> None:
        self.host.close()

    def __enter__(self) -> EmulatedArtifact:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
