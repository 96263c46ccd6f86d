"""The measuring process and its client.

Every candidate is built, compiled, checked and timed in a worker process
(``python -m bitnet_compile.tuning.worker``) that the tuner talks to in JSON lines over its
stdin/stdout. A candidate that fails to compile, computes a wrong result, crashes the process
(a bad schedule can fault) or runs past its time limit becomes a failed result with its
reason; the client then starts a fresh worker for the next job, so the tuner goes on.

One job is one or more candidates of one template on one shape, compiled into one module:
trials send one, the confirmation round at the end of a study sends the best few together so
their timings interleave (a slow spell of a shared machine then hits them all alike).
"""

from __future__ import annotations

import faulthandler
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import numpy as np

from ..isolation import module_command

READY_TIMEOUT_S = 120  # importing TVM on a slow machine
LOG_TAIL = 3  # stderr lines of a dead worker quoted in the failure reason


# ----------------------------------------------------------------------------- worker side


class _Cases:
    """Test cases (and their DRAM rotations) kept across the trials of a study: making the
    weights and the reference output costs more than a trial's timing for large layers. A
    few are kept (the oldest goes first), for a confirmation's candidates that differ in case knobs."""

    KEEP = 8

    def __init__(self):
        self.cases: dict[str, tuple] = {}

    def get(self, template, shape: dict, knobs: dict, stream: int, seed: int, timing: str):
        from ..measure import weight_rotation

        key = json.dumps([template.op, shape, {name: knobs[name] for name in template.case_knobs}, stream, seed, timing], sort_keys=True)
        if key not in self.cases:
            if any(not old.startswith(json.dumps([template.op])[:-1]) for old in self.cases):
                self.cases.clear()  # another kernel: free its weights first
            while len(self.cases) >= self.KEEP:
                del self.cases[next(iter(self.cases))]  # the oldest
            case = template.make_case(shape, knobs, np.random.default_rng(seed), template.tokens)
            rotation = weight_rotation(case.args, case.weights, stream) if timing == "dram" else [case.args]
            self.cases[key] = (case, rotation)
        return self.cases[key]


def _reason(err: BaseException) -> str:
    """One line for a failure: TVM's messages run to many lines of C++ context."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.strip().startswith(("File ", "at ", "Traceback"))]
    text = lines[-1] if lines else ""
    return f"{type(err).__name__}: {text[:300]}"


def _compile(job: dict, target, candidates: list[tuple[str, dict, dict]]):
    import tvm

    from ..ops import registry

    template = registry.get_tunable(job["op"])
    funcs = {name: template.build(name, shape, knobs, target) for name, shape, knobs in candidates}
    return tvm.compile(tvm.IRModule(funcs), target=target.tvm_target())


def _measure_local(executable, job: dict, prepared: list, cases: _Cases, template) -> list[list[list[float]]]:
    """Per candidate, per round, the samples; rounds alternate the candidates' order."""
    from ..measure import time_cached, time_streamed

    mod = executable.mod
    samples: list[list[list[float]]] = [[] for _ in prepared]
    for r in range(job["rounds"]):
        order = list(enumerate(prepared)) if r % 2 == 0 else list(reversed(list(enumerate(prepared))))
        for i, (name, shape, knobs) in order:
            case, rotation = cases.get(template, shape, knobs, job["stream_bytes"], job["seed"], job["timing"])
            if job["timing"] == "dram":
                samples[i].append(time_streamed(mod[name], rotation, job["repeats"]))
            else:
                samples[i].append(time_cached(mod, name, case.args, job["repeats"]))
    return samples


def _run_job(job: dict, cases: _Cases) -> dict:
    """Build, check and time every candidate of ``job``; a result per candidate."""
    from ..ops import registry
    from ..target import TargetSpec

    template = registry.get_tunable(job["op"])
    target = TargetSpec.from_json(job["target"])
    prepared = []
    for i, knobs in enumerate(job["candidates"]):
        shape, built = template.kernel_shape(job["n"], job["k"], knobs, target)
        prepared.append((f"candidate_{i}", shape, built))
    started = time.perf_counter()
    try:
        executable = _compile(job, target, prepared)
    except Exception as err:  # a schedule the compiler rejects is a failed candidate, not a tuner crash
        return {"results": [{"state": "error", "reason": f"compile failed: {_reason(err)}"} for _ in prepared]}
    compile_s = time.perf_counter() - started
    if job.get("rpc"):
        from .rpc import measure_remote

        return {"results": measure_remote(executable, job, prepared, cases, template, compile_s)}
    results = []
    for name, shape, knobs in prepared:
        case, _ = cases.get(template, shape, knobs, job["stream_bytes"], job["seed"], job["timing"])
        case.poison()
        executable.mod[name](*case.args)
        problem = case.check()
        results.append({"state": "wrong", "reason": problem} if problem else {"state": "ok"})
    good = [p for p, r in zip(prepared, results) if r["state"] == "ok"]
    timed = iter(_measure_local(executable, job, good, cases, template))
    for result in results:
        if result["state"] == "ok":
            rounds = next(timed)
            every = [s for samples in rounds for s in samples]
            result |= {
                "seconds": float(np.median(every)),
                "rounds": [float(np.median(r)) for r in rounds],
                "samples": len(every),
                "compile_s": compile_s,
            }
    return {"results": results}


def serve(stdin: IO[str], stdout: IO[str]) -> None:
    """The worker's loop: announce readiness, then one JSON line in, one JSON line out."""
    import tvm

    from ..measure import cpu_model

    for module in json.loads(os.environ.get("BITNET_TUNE_PLUGINS", "[]")):
        __import__(module)
    # TVM's segfault handler symbolizes a native backtrace, which takes seconds to tens of
    # seconds here; a crashing candidate should cost nothing. Python's own handler logs the
    # Python stack and lets the signal kill the process at once.
    signal.signal(signal.SIGSEGV, signal.SIG_DFL)
    faulthandler.enable(sys.stderr)
    threads = tvm.get_global_func("runtime.NumThreads")()
    stdout.write(json.dumps({"ready": True, "threads": threads, "cpu": cpu_model(), "pid": os.getpid()}) + "\n")
    stdout.flush()
    cases = _Cases()
    for line in stdin:
        job = json.loads(line)
        stdout.write(json.dumps({"id": job["id"], **_run_job(job, cases)}) + "\n")
        stdout.flush()


# ----------------------------------------------------------------------------- client side


class WorkerError(RuntimeError):
    """The worker could not be started at all (as opposed to a candidate failing in it)."""


class Worker:
    """A measuring process for one thread count, restarted after any crash or timeout."""

    def __init__(self, threads: int, plugins: tuple[str, ...] = (), log_path: Path | None = None):
        self.threads, self.plugins = threads, plugins
        self.log_path = log_path or Path(tempfile.gettempdir()) / f"bitnet-tune-worker-{os.getpid()}.log"
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self._next_id = 0

    def _start(self) -> None:
        env = dict(os.environ, TVM_NUM_THREADS=str(self.threads), BITNET_TUNE_PLUGINS=json.dumps(list(self.plugins)))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            module_command("bitnet_compile.tuning.worker"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=log, env=env, text=True, start_new_session=True,
        )  # fmt: skip
        log.close()
        heard, reply = self._read(READY_TIMEOUT_S)
        if reply is None or not reply.get("ready"):
            reason = (
                f"unexpected first line {reply!r}" if reply else self._death() if heard == "eof" else f"no reply within {READY_TIMEOUT_S} s"
            )
            self.close()
            raise WorkerError(f"the measuring worker did not start: {reason}")
        self.info = reply

    def _read(self, timeout: float) -> tuple[str, dict | None]:
        """("reply", the next line as JSON), ("eof", None) or ("timeout", None).

        End of file and silence are told apart here, not by polling the process afterwards:
        a worker that segfaults closes its pipe a moment before it can be reaped, and a poll in
        that moment would call the crash a hang."""
        assert self.proc and self.proc.stdout
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return "timeout", None
        line = self.proc.stdout.readline()
        return ("reply", json.loads(line)) if line else ("eof", None)

    def _death(self) -> str:
        """Why the worker is gone: its exit status or signal, and the end of its log."""
        assert self.proc
        try:
            code = self.proc.wait(timeout=30)  # a crashing process may still be writing its core dump
        except subprocess.TimeoutExpired:
            return "no reply"
        what = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        try:
            tail = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()][-LOG_TAIL:]
        except OSError:
            tail = []
        return f"worker {what}" + (f" ({' / '.join(t.strip()[:160] for t in tail)})" if tail else "")

    def run(self, job: dict, timeout: float) -> list[dict]:
        """One result per candidate of ``job``; a crash or timeout fails them all with the reason."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc and self.proc.stdin
        self._next_id += 1
        try:
            self.proc.stdin.write(json.dumps(job | {"id": self._next_id}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            reason = self._death()
            self.proc = None
            return [{"state": "crash", "reason": reason} for _ in job["candidates"]]
        heard, reply = self._read(timeout)
        if reply is not None:
            return reply["results"]
        if heard == "timeout":
            self.close()
            return [{"state": "timeout", "reason": f"no result within {timeout:.0f} s (worker killed)"} for _ in job["candidates"]]
        reason = self._death()
        self.proc = None
        return [{"state": "crash", "reason": reason} for _ in job["candidates"]]

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream:
                    stream.close()
            self.proc = None

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints (LLVM, plugins) must not corrupt the protocol
    serve(sys.stdin, protocol)
