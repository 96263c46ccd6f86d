"""Measuring on the device one ships to, through TVM's RPC.

The compiler machine builds each candidate (for the device's target), the device runs it: on
the device, ``TVM_NUM_THREADS=<threads> python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090``
(optionally ``--tracker HOST:PORT --key NAME`` to register with a tracker that hands devices
out to several tuners). ``bitnet-compile tune --rpc HOST:PORT`` (or ``--rpc-tracker HOST:PORT
--rpc-key NAME``) then sends every trial there.

The check is the same as locally: the device's output is copied back and compared with the
numpy reference. Timing differs in one way: a remote call costs a network round trip, so the
host cannot rotate weight copies call by call; DRAM timings use TVM's own evaluator with
``cache_flush_cpu_non_first_arg``, which flushes every argument but the activations from the
caches before each call.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np

from ..errors import UserError

SESSION_TIMEOUT_S = 600
LIBRARY = "candidates.so"


@dataclass(frozen=True)
class Remote:
    """Where trials run: a server (host, port) or a tracker (host, port) and a device key."""

    host: str
    port: int
    key: str | None = None

    @classmethod
    def parse(cls, address: str, key: str | None = None) -> Remote:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise UserError(f"expected an RPC address as HOST:PORT, got {address!r}")
        return cls(host, int(port), key)

    def to_json(self) -> dict:
        return {"host": self.host, "port": self.port, "key": self.key}


def connect(spec: dict):
    """An RPC session to the server, or to a device the tracker hands out for ``key``."""
    from tvm import rpc

    if spec.get("key"):
        return rpc.connect_tracker(spec["host"], spec["port"]).request(spec["key"], session_timeout=SESSION_TIMEOUT_S)
    return rpc.connect(spec["host"], spec["port"], session_timeout=SESSION_TIMEOUT_S)


def _output_index(case) -> int:
    return next(i for i, a in enumerate(case.args) if isinstance(a, np.ndarray) and np.shares_memory(a, case.output))


def measure_remote(executable, job: dict, prepared: list, cases, template, compile_s: float) -> list[dict]:
    """Upload the candidates' library, check each candidate's device output, time the right ones."""
    import tvm

    from .. import cross
    from ..measure import WARM_MS

    session = connect(job["rpc"])
    threads = session.get_function("runtime.NumThreads")()
    if threads != job["threads"]:
        reason = (
            f"the RPC server runs {threads} threads, the study tunes for {job['threads']}: start it with TVM_NUM_THREADS={job['threads']}"
        )
        return [{"state": "error", "reason": reason} for _ in prepared]
    with tempfile.TemporaryDirectory(prefix="bitnet-rpc-") as tmp:
        path = os.path.join(tmp, LIBRARY)
        target = job["target"]  # linked by the device's toolchain (aarch64-linux-gnu-gcc for arm-neon)
        executable.export_library(path, fcompile=cross.compiler(target["arch"], target["triple"]))
        session.upload(path)
    mod = session.load_module(LIBRARY)
    device = session.cpu(0)
    results = []
    for name, shape, knobs in prepared:
        case, _ = cases.get(template, shape, knobs, 0, job["seed"], "cache")
        args = [tvm.runtime.tensor(np.ascontiguousarray(a), device=device) for a in case.args]
        mod[name](*args)
        case.poison()
        out = _output_index(case)
        case.args[out][...] = args[out].numpy()
        problem = case.check()
        if problem:
            results.append({"state": "wrong", "reason": problem})
            continue
        dram = job["timing"] == "dram"
        timer = mod.time_evaluator(
            name, device, number=1, repeat=job["repeats"] * job["rounds"], min_repeat_ms=0 if dram else WARM_MS,
            f_preproc="cache_flush_cpu_non_first_arg" if dram else "",
        )  # fmt: skip
        samples = list(timer(*args).results)
        rounds = [float(np.median(r)) for r in np.array_split(np.array(samples), job["rounds"])]
        results.append(
            {"state": "ok", "seconds": float(np.median(samples)), "rounds": rounds, "samples": len(samples), "compile_s": compile_s}
        )
    return results
