"""Shared test helpers: compile kernels for a vector ISA, and run code where tvm cannot be imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def host_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


HOST = host_flags()
ISA_PRESETS = {"avx2": "x86-avx2", "avx512": "x86-avx512"}
ISA_HOST_FLAGS = {"avx2": {"avx2"}, "avx512": {"avx512f", "avx512bw"}}


def isa_params() -> list:
    """One pytest param per kernel ISA, skipped where this CPU cannot run it."""
    return [pytest.param(isa, marks=pytest.mark.skipif(not ISA_HOST_FLAGS[isa] <= HOST, reason=f"host lacks {isa}")) for isa in ISA_PRESETS]


def compile_module(funcs: dict, isa: str, preset: str | None = None):
    """Compile PrimFuncs for the ISA's preset target (or ``preset``); returns the runnable module."""
    import tvm

    from bitnet_compile.target import parse_target

    spec = parse_target(preset or ISA_PRESETS[isa])
    assert spec.isa == isa
    return tvm.compile(tvm.IRModule(funcs), target=spec.tvm_target()).mod


def isolated_cache(tmp_path_factory):
    """BITNET_CACHE in a fresh directory while the fixture lives: the model tests' conversions
    and compiled artifacts never touch the user's cache. Model tests make it a fixture at
    the scope they need: ``pytest.fixture(scope=..., autouse=True)(isolated_cache)``."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BITNET_CACHE", str(tmp_path_factory.mktemp("bitnet-cache")))
    yield
    mp.undo()


BLOCK_TVM = (
    "import sys, importlib.abc\n"
    "class _NoTVM(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'tvm' or name.startswith('tvm.'):\n"
    "            raise ImportError('tvm is blocked: the runtime must work without the compiler')\n"
    "sys.meta_path.insert(0, _NoTVM())\n"
)


def run_without_tvm(code: str, threads: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run Python code in a fresh interpreter in which ``import tvm`` fails."""
    env = dict(os.environ, TVM_NUM_THREADS=str(threads))
    return subprocess.run([sys.executable, "-c", BLOCK_TVM + code], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
