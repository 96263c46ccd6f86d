"""The autotuner: knob constraints, failing candidates recorded while the study goes on,
resume after kill -9, two processes on one storage, RPC on loopback, records picked up by
compile, and the research views.

Tuning runs as the user runs it (``bitnet-compile tune`` in a subprocess) with the test
templates of tuning_plugin.py where a candidate must misbehave, and real kernels elsewhere.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import HOST

from bitnet_compile import records
from bitnet_compile.families import FAMILIES
from bitnet_compile.ops import registry
from bitnet_compile.ops.space import Constraint, SearchSpace
from bitnet_runtime.manifest import read_manifest

TESTS = Path(__file__).resolve().parent
VNNI = pytest.mark.skipif(not {"avx512bw", "avx512_vnni"} <= HOST, reason="host lacks AVX-512 VNNI")


def _env(tmp_path: Path) -> dict:
    return dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                BITNET_CACHE=str(tmp_path / "cache"), BITNET_RECORDS=str(tmp_path / "records"))  # fmt: skip


def _tune(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bitnet_compile", "tune", "--plugin", "tuning_plugin", *args]
    return subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def _records(tmp_path: Path) -> dict:
    files = list((tmp_path / "records").glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())["records"]


def _one_record(tmp_path: Path, op: str) -> dict:
    (record,) = [r for key, r in _records(tmp_path).items() if key.startswith(op + "/")]
    return record


# ----------------------------------------------------------------------------- spaces


def test_constraints_reject_points_and_say_why():
    space = SearchSpace({"a": (1, 2, 4), "b": (1, 8)}, (Constraint("a * b <= 8", "registers"), Constraint("a <= n", "rows")))
    assert space.violations({"a": 4, "b": 8}, {"n": 16}) == ["a * b <= 8 (registers)"]
    assert space.violations({"a": 2, "b": 1}, {"n": 1}) == ["a <= n (rows)"]
    assert space.violations({"a": 3, "b": 1}, {"n": 16}) == ["a=3 is not one of [1, 2, 4]"]
    assert list(space.points({"n": 16})) == [{"a": 1, "b": 1}, {"a": 1, "b": 8}, {"a": 2, "b": 1}, {"a": 4, "b": 1}]


def test_dot2_gemm_space_excludes_register_spills():
    from bitnet_compile.ops import dot2_matmul

    context = {"n": 2560, "k": 2560, "threads": 2}
    points = list(dot2_matmul.GEMM_SPACE.points(context))
    assert points and all(p["row_blocks"] * p["token_tile"] <= 24 for p in points)
    assert dot2_matmul.GEMM_SPACE.violations({"row_blocks": 4, "token_tile": 12}, context)
    # a layer too small for two tasks of 2 blocks: only single-block tasks remain
    assert {p["row_blocks"] for p in dot2_matmul.GEMV_SPACE.points({"n": 48, "k": 2560, "threads": 2})} == {1}


@pytest.mark.parametrize("op", ["lut_gemv", "lut_gemm", "dot2_gemv", "dot2_gemm", "f16_gemv", "i8_gemv"])
@pytest.mark.parametrize("n,k", [(2560, 2560), (3840, 2560), (13824, 2560), (2560, 6912), (128256, 2560)])
def test_defaults_are_valid_points_for_the_2b_4t_shapes(op, n, k):
    from bitnet_compile import schedule_db
    from bitnet_compile.target import parse_target

    target = parse_target("x86-avx512-vnni")
    template = registry.get_tunable(op)
    default = schedule_db.default_knobs(op, "avx512")
    for threads in (1, 2):
        assert not template.space.violations(default, template.names(n, k, target, threads)), (op, default)


# ----------------------------------------------------------------------------- the cases of the real kernels


@VNNI
def test_every_builtin_template_measures_exactly_on_odd_shapes(tmp_path):
    """One trial per kernel through the worker: its case is built, the kernel checked against
    the reference (exact for the integer kernels) and timed."""
    from bitnet_compile.target import parse_target
    from bitnet_compile.tuning.worker import Worker

    target = parse_target("llvm -mcpu=native")
    with Worker(1, log_path=tmp_path / "worker.log") as worker:
        for op in ("lut_gemv", "lut_gemm", "dot2_gemv", "dot2_gemm", "f16_gemv", "i8_gemv"):
            for n, k in ((100, 72), (33, 250)):
                point = next(iter(registry.get_tunable(op).space.points(registry.get_tunable(op).names(n, k, target, 1))))
                job = {"op": op, "n": n, "k": k, "candidates": [point], "target": target.to_json(), "threads": 1, "seed": 3,
                       "repeats": 2, "rounds": 1, "stream_bytes": 1 << 20, "timing": registry.get_tunable(op).timing, "rpc": None}  # fmt: skip
                (result,) = worker.run(job, 120)
                assert result["state"] == "ok", (op, n, k, result)
                assert result["seconds"] > 0


# ----------------------------------------------------------------------------- the study's decisions


class _ScriptedWorker:
    """Trials: faster the larger ``split``; the confirmation: each candidate's per-round times
    from ``rounds(knobs)``."""

    def __init__(self, rounds):
        self.rounds, self.jobs = rounds, []

    def run(self, job: dict, timeout: float) -> list[dict]:
        self.jobs.append(job)
        if len(job["candidates"]) == 1:
            return [{"state": "ok", "seconds": 1.0 / job["candidates"][0]["split"], "compile_s": 0.0}]
        results = []
        for knobs in job["candidates"]:
            per_round = self.rounds(knobs)
            results.append({"state": "ok", "seconds": float(np.median(per_round)), "rounds": per_round, "compile_s": 0.0})
        return results


def _scripted_study(tmp_path: Path, rounds, trials: int = 6) -> dict:
    import optuna
    import tuning_plugin  # noqa: F401 - registers toy_grid

    from bitnet_compile.target import parse_target
    from bitnet_compile.tuning.study import Study, StudySpec, run_study

    spec = StudySpec(registry.get_tunable("toy_grid"), 8, 8, 1, parse_target("x86-avx2"))
    study = Study(spec, optuna.storages.InMemoryStorage(), {"split": 1, "delay": 0.3}, records_dir=tmp_path)
    worker = _ScriptedWorker(rounds)
    record = run_study(study, worker, trials, time.monotonic() + 60, 1)
    measured = [j["candidates"][0] for j in worker.jobs if len(j["candidates"]) == 1]
    assert measured[0] == {"split": 1, "delay": 0.3}  # the default first
    assert len(measured) == trials and len({json.dumps(m, sort_keys=True) for m in measured}) == trials  # no point twice
    assert record["measured"] == trials
    return record


def test_a_candidate_replaces_the_default_by_winning_every_round(tmp_path):
    record = _scripted_study(tmp_path, lambda knobs: [1.0 / knobs["split"]] * 5)
    assert record["best"]["knobs"]["split"] > 1 and record["speedup"] > 1
    (path,) = tmp_path.glob("*.json")  # written to the records directory as it went
    assert json.loads(path.read_text())["records"][record["study"].split("/", 2)[2]]["best"] == record["best"]


def test_one_lost_round_does_not_veto_a_real_gain(tmp_path):
    def rounds(knobs):
        return [1.0, 1.0, 0.5, 1.0, 1.0] if knobs["split"] == 1 else [0.6] * 5  # the default: one fast round

    record = _scripted_study(tmp_path, rounds)
    assert record["best"]["knobs"]["split"] > 1


def test_the_default_stays_when_a_candidate_loses_two_rounds(tmp_path):
    def rounds(knobs):
        return [1.0, 0.5, 1.0, 0.5, 1.0] if knobs["split"] == 1 else [0.6] * 5

    record = _scripted_study(tmp_path, rounds)
    assert record["best"]["knobs"] == {"split": 1, "delay": 0.3} and record["speedup"] == 1.0


def test_the_default_stays_within_two_percent(tmp_path):
    record = _scripted_study(tmp_path, lambda knobs: [1.0] * 5 if knobs["split"] == 1 else [0.99] * 5)
    assert record["best"]["knobs"] == {"split": 1, "delay": 0.3}


# ----------------------------------------------------------------------------- failing candidates


def test_failing_candidates_are_recorded_and_the_study_goes_on(tmp_path):
    done = _tune(tmp_path, "-s", "8x8", "-k", "toy_flaws", "-n", "7", "--trial-timeout", "8", "--storage", f"sqlite:///{tmp_path}/s.db")
    assert done.returncode == 0, done.stderr
    record = _one_record(tmp_path, "toy_flaws")
    by_flaw = {}
    for t in record["trials"]:
        if t["state"] not in ("invalid", "duplicate"):
            by_flaw.setdefault(t["knobs"]["flaw"], []).append(t)
    assert {t["state"] for t in by_flaw["none"]} == {"complete"} and len(by_flaw["none"]) == 3
    (wrong,) = by_flaw["wrong"]
    assert wrong["state"] == "wrong" and "differ from the reference" in wrong["reason"]
    (crash,) = by_flaw["crash"]
    assert crash["state"] == "crash" and "SIGSEGV" in crash["reason"]
    (hang,) = by_flaw["hang"]
    assert hang["state"] == "timeout" and "8 s" in hang["reason"]
    (bad,) = by_flaw["compile"]
    assert bad["state"] == "error" and "cannot be built" in bad["reason"]
    assert record["best"]["knobs"]["flaw"] == "none"
    assert all(t["knobs"]["flaw"] == "none" or t["knobs"]["split"] == 1 for t in record["trials"] if t["state"] != "invalid")
    assert "7 trials (4 failed)" in done.stderr


def test_a_worker_that_closes_its_pipe_before_it_dies_is_a_crash_not_a_hang(tmp_path):
    """A segfaulting worker's pipe reaches end of file a moment before the process can be
    reaped; that moment, stretched here to a second, must not be read as a timeout."""
    from bitnet_compile.tuning.worker import Worker

    dies_slowly = "import os, signal, sys, time; sys.stdin.readline(); os.close(1); time.sleep(1); os.kill(os.getpid(), signal.SIGSEGV)"
    worker = Worker(1, log_path=tmp_path / "worker.log")
    worker.proc = subprocess.Popen([sys.executable, "-c", dies_slowly], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    with worker:
        (result,) = worker.run({"candidates": [{}]}, 20)
    assert result["state"] == "crash" and "SIGSEGV" in result["reason"], result


# ----------------------------------------------------------------------------- resume, sharing


def _measured(tmp_path: Path, op: str) -> list[dict]:
    try:
        record = _one_record(tmp_path, op)
    except (AssertionError, ValueError, json.JSONDecodeError):
        return []
    return [t for t in record["trials"] if t["state"] == "complete"]


def test_kill_9_then_the_same_command_continues(tmp_path):
    args = ["-s", "8x8", "-k", "toy_grid", "-n", "10", "--storage", f"sqlite:///{tmp_path}/s.db"]
    cmd = [sys.executable, "-m", "bitnet_compile", "tune", "--plugin", "tuning_plugin", *args]
    proc = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(_measured(tmp_path, "toy_grid")) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {t["number"]: t["knobs"] for t in _measured(tmp_path, "toy_grid")}
    assert 3 <= len(before) < 10
    done = _tune(tmp_path, *args)
    assert done.returncode == 0, done.stderr
    after = _measured(tmp_path, "toy_grid")
    assert {t["number"]: t["knobs"] for t in after if t["number"] in before} == before  # nothing finished was lost
    keys = [json.dumps(t["knobs"], sort_keys=True) for t in after]
    assert len(after) == 10 and len(set(keys)) == 10  # and nothing measured twice


def test_two_processes_share_one_study(tmp_path):
    import optuna

    storage = f"journal:{tmp_path}/study.log"
    args = ["-s", "8x8", "-k", "toy_grid", "-n", "10", "--storage", storage]
    cmd = [sys.executable, "-m", "bitnet_compile", "tune", "--plugin", "tuning_plugin", *args]
    procs = [subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    (summary,) = optuna.get_all_study_summaries(JournalStorage(JournalFileBackend(f"{tmp_path}/study.log")))
    study = optuna.load_study(study_name=summary.study_name, storage=JournalStorage(JournalFileBackend(f"{tmp_path}/study.log")))
    measured = [t for t in study.trials if t.user_attrs.get("measured")]
    assert 10 <= len(measured) <= 12  # each process stops once the study has its trials
    assert len({t.user_attrs["pid"] for t in measured}) == 2
    assert _one_record(tmp_path, "toy_grid")["measured"] == len(measured)


def test_the_time_budget_ends_the_studies_early_and_keeps_their_records(tmp_path):
    done = _tune(tmp_path, "-s", "8x8", "-k", "toy_grid", "-n", "12", "--time-budget", "2", "--storage", f"journal:{tmp_path}/s.log")
    assert done.returncode == 0, done.stderr
    record = _one_record(tmp_path, "toy_grid")
    assert 1 <= record["measured"] < 12 and record["best"]


# ----------------------------------------------------------------------------- RPC


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rpc_server(tmp_path):
    port = _free_port()
    env = dict(os.environ, TVM_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "rpc.log", "w"), start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    else:
        pytest.fail(f"RPC server did not start: {(tmp_path / 'rpc.log').read_text()}")
    yield port
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_trials_measured_through_an_rpc_server_on_loopback(tmp_path, rpc_server):
    done = _tune(tmp_path, "-s", "96x256", "-k", "lut_gemv", "-n", "3", "--threads", "1", "--rpc", f"127.0.0.1:{rpc_server}")
    assert done.returncode == 0, done.stderr
    data = json.loads(next((tmp_path / "records").glob("*.json")).read_text())
    assert data["target"]["cpu"] == "remote"
    (record,) = data["records"].values()
    complete = [t for t in record["trials"] if t["state"] == "complete"]
    assert len(complete) == 3 and all(t["seconds"] > 0 for t in complete)


def test_an_rpc_server_with_other_threads_fails_the_trials_with_the_fix(tmp_path, rpc_server):
    done = _tune(tmp_path, "-s", "96x256", "-k", "lut_gemv", "-n", "1", "--threads", "2", "--rpc", f"127.0.0.1:{rpc_server}")
    assert done.returncode == 2 and "found no working candidate" in done.stderr, done.stderr  # every trial failed
    (trial,) = [t for t in _one_record(tmp_path, "lut_gemv")["trials"] if t["state"] != "invalid"]
    assert trial["state"] == "error" and "TVM_NUM_THREADS=2" in trial["reason"]


# ----------------------------------------------------------------------------- records picked up by compile


def _write_record(directory: Path, target, op: str, n: int, k: int, best: dict, trials: list[dict]) -> Path:
    template = registry.get_tunable(op)
    fp = records.fingerprint(target)
    path = records.path_for(fp, directory)
    record = {"op": op, "version": template.version, "layout": template.layout, "n": n, "k": k, "threads": target.num_cores,
              "timing": template.timing, "tokens": template.tokens, "space": {"knobs": {}, "constraints": [], "valid_points": 1},
              "study": "handmade", "default": {"knobs": best}, "trials": trials, "measured": len(trials),
              "best": {"knobs": best, "seconds": 1e-5, "source": "trial 0"}, "speedup": 1.25}  # fmt: skip
    records.update(path, fp, records.record_key(op, template.version, template.layout, n, k, target.num_cores), record)
    return path


@VNNI
def test_compile_uses_matching_records_and_says_so(tmp_path, monkeypatch):
    from bitnet_compile import plan
    from bitnet_compile.models import Linear
    from bitnet_compile.target import parse_target

    monkeypatch.setenv(records.RECORDS_ENV, str(tmp_path))
    target = parse_target("llvm -mcpu=native")
    gemv = {"row_blocks": 3, "k_unroll": 4}
    trials = [{"number": 0, "knobs": {"row_blocks": 4, "token_tile": 2}, "state": "complete", "seconds": 1e-3},
              {"number": 1, "knobs": {"row_blocks": 3, "token_tile": 3}, "state": "complete", "seconds": 2e-3}]  # fmt: skip
    _write_record(tmp_path, target, "dot2_gemv", 2560, 1024, gemv, [])
    # the GEMM's best (4 row blocks) does not divide the GEMV's padding (162 blocks of 16): its best compatible trial is used
    _write_record(tmp_path, target, "dot2_gemm", 2560, 1024, trials[0]["knobs"], trials)
    kernels, entries = plan.plan([Linear("a", 2560, 1024), Linear("b", 512, 1024)], target, FAMILIES["dot2"])
    by_name = {k.name: k for k in kernels}
    assert by_name["dot2_gemv_n2560_k1024"].knobs["row_blocks"] == 3 and by_name["dot2_gemv_n2560_k1024"].knob_source.startswith("tuned")
    assert by_name["dot2_gemm_n2560_k1024"].knobs["token_tile"] == 3 and "compatible" in by_name["dot2_gemm_n2560_k1024"].knob_source
    assert entries[0].n_padded == 2592 and entries[0].k_padded == 1024
    assert by_name["dot2_gemv_n512_k1024"].knob_source == "default"
    line = plan.schedule_summary(kernels, target)
    assert "2 of 4 tunable kernels tuned" in line and "dot2_gemv_n512_k1024" in line


@VNNI
def test_compiled_artifact_with_tuned_knobs_is_exact(tmp_path, monkeypatch):
    """End to end: a record changes the artifact's kernels, which verify still finds exact."""
    from bitnet_compile.cli import main

    monkeypatch.setenv(records.RECORDS_ENV, str(tmp_path / "records"))
    from bitnet_compile.target import parse_target

    target = parse_target("llvm -mcpu=native")
    _write_record(tmp_path / "records", target, "dot2_gemv", 200, 300, {"row_blocks": 2, "k_unroll": 1}, [])
    out = tmp_path / "art"
    assert main(["--shapes", "200x300", "-o", str(out)]) == 0
    (gemv,) = [k for k in read_manifest(out).kernels if k.op == "dot2_gemv"]
    assert gemv.knobs["row_blocks"] == 2 and gemv.knob_source.startswith("tuned")
    assert main(["verify", str(out), "-t", "1"]) == 0


# ----------------------------------------------------------------------------- views and errors


def _handmade(tmp_path: Path, monkeypatch) -> None:
    from bitnet_compile.target import parse_target

    monkeypatch.setenv(records.RECORDS_ENV, str(tmp_path))
    trials = [{"number": i, "knobs": {"k_unroll": u, "prefetch": True}, "state": "complete", "seconds": s}
              for i, (u, s) in enumerate([(2, 3e-5), (1, 2e-5), (4, 4e-5)])]  # fmt: skip
    trials.append({"number": 3, "knobs": {"k_unroll": 8, "prefetch": False}, "state": "crash", "reason": "worker killed by SIGSEGV"})
    _write_record(tmp_path, parse_target("x86-avx512"), "f16_gemv", 1000, 256, {"k_unroll": 1, "prefetch": True}, trials)


def test_views_list_show_compare_plot_source(tmp_path, monkeypatch, capsys):
    from bitnet_compile.cli import main

    _handmade(tmp_path, monkeypatch)
    assert main(["schedules", "list"]) == 0
    assert "f16_gemv" in capsys.readouterr().out
    assert main(["schedules", "show", "f16_gemv/1000x256"]) == 0  # parts of the key, in any position
    out = capsys.readouterr().out
    assert "worker killed by SIGSEGV" in out and "best: k_unroll=1 prefetch=True" in out
    assert main(["schedules", "compare"]) == 0
    assert "geometric mean speedup over 1 kernels: 1.250x" in capsys.readouterr().out
    png = tmp_path / "curve.png"
    assert main(["schedules", "plot", "f16_gemv", "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["schedules", "source", "f16_gemv", "--form", "asm"]) == 0
    assert "vcvtph2ps" in capsys.readouterr().out
    assert main(["schedules", "source", "f16_gemv", "--form", "tir"]) == 0
    assert "T.prim_func" in capsys.readouterr().out


def test_space_view_counts_valid_points(capsys):
    from bitnet_compile.cli import main

    assert main(["schedules", "space", "dot2_gemm", "--shape", "2560x2560", "--target", "x86-avx512-vnni"]) == 0
    out = capsys.readouterr().out
    assert "row_blocks * token_tile <= 24" in out and "valid points for 2560x2560 at 2 threads on avx512: 29" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["schedules", "show", "nothing-like-this"], "no tuning record matches"),
        (["tune", "-s", "64x64", "--storage", "nonsense"], "expected sqlite:///FILE"),
        (["tune", "-s", "64x64", "--storage", "postgresql://u@127.0.0.1:1/db"], "--storage postgresql://"),
        (["tune", "-s", "64x64", "-k", "no_such_kernel"], "no tunable kernel 'no_such_kernel'"),
        (["tune", "-s", "64x64", "-n", "0"], "--trials must be at least 1"),
        (["tune", "-s", "64x64", "--rpc", "localhost"], "expected an RPC address as HOST:PORT"),
    ],
)
def test_user_mistakes_are_one_line_errors(tmp_path, monkeypatch, capsys, argv, message):
    from bitnet_compile.cli import main

    monkeypatch.setenv(records.RECORDS_ENV, str(tmp_path))
    monkeypatch.setenv("BITNET_CACHE", str(tmp_path / "cache"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_search_quality_benchmark_replays_its_measured_table():
    """The benchmark's replay (the tuner's search against a measured table, and random
    search) runs from the committed report without measuring anything."""
    table = TESTS.parent / "benchmarks" / "results" / "2026-12-01-search-quality.json"
    cmd = [sys.executable, str(TESTS.parent / "benchmarks" / "search_quality.py"), "--table", str(table), "--seeds", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| tuner (TPE, default first) |" in done.stdout and "| random (default + random points) |" in done.stdout


def test_records_tuned_over_rpc_serve_a_foreign_target(tmp_path, monkeypatch):
    """arm-neon is tuned on the device (records filed under CPU "remote"): compile on this
    x86 machine must find them, since nothing measured here could apply to it."""
    from bitnet_compile import plan
    from bitnet_compile.target import parse_target

    monkeypatch.setenv(records.RECORDS_ENV, str(tmp_path))
    target = parse_target("arm-neon")
    assert plan.knobs_for("lut_gemv", target, 2560, 2560)[1] == "default"
    template = registry.get_tunable("lut_gemv")
    fp = records.fingerprint(target, remote=True)
    best = {"kblock": 16, "row_blocks_per_task": 2}
    record = {"op": "lut_gemv", "default": {"knobs": {"kblock": 32, "row_blocks_per_task": 1}}, "trials": [], "measured": 9,
              "best": {"knobs": best, "seconds": 1e-5}, "speedup": 1.1}  # fmt: skip
    key = records.record_key("lut_gemv", template.version, template.layout, 2560, 2560, target.num_cores)
    records.update(records.path_for(fp, tmp_path), fp, key, record)
    knobs, source = plan.knobs_for("lut_gemv", target, 2560, 2560)
    assert knobs == best and source.startswith("tuned")


def test_a_run_where_every_trial_fails_is_an_error_and_keeps_the_good_record(tmp_path):
    import tuning_plugin  # noqa: F401  (registers toy_broken here too)

    from bitnet_compile.target import parse_target

    good = {"split": 2, "flaw": "compile"}
    path = _write_record(tmp_path / "records", parse_target("llvm -mcpu=native"), "toy_broken", 8, 8, good, [])
    before = json.loads(path.read_text())["records"]
    done = _tune(tmp_path, "-s", "8x8", "-k", "toy_broken", "-n", "2", "--storage", f"sqlite:///{tmp_path}/s.db")
    assert done.returncode == 2, done.stderr
    assert "1 of 1 studies found no working candidate" in done.stderr.splitlines()[-1]
    after = json.loads(path.read_text())["records"]
    assert after == before


@VNNI
@pytest.mark.parametrize("bad", [{"row_blocks": 10**9, "k_unroll": 2}, {"row_blocks": "4", "k_unroll": 2}, {"row_blocks": True, "k_unroll": 2},
                                 {"row_blocks": 4, "k_unroll": 2, "extra": 1}])  # fmt: skip
def test_records_with_knobs_outside_the_space_are_ignored(tmp_path, monkeypatch, capsys, bad):
    from bitnet_compile import plan
    from bitnet_compile.models import Linear
    from bitnet_compile.target import parse_target

    monkeypatch.setenv(records.RECORDS_ENV, str(tmp_path))
    target = parse_target("llvm -mcpu=native")
    _write_record(tmp_path, target, "dot2_gemv", 256, 512, bad, [])
    kernels, _ = plan.plan([Linear("a", 256, 512)], target, FAMILIES["dot2"])
    gemv = next(k for k in kernels if k.op == "dot2_gemv")
    assert gemv.knob_source == "default"
    assert "warning: ignoring the tuning record of dot2_gemv 256x512" in capsys.readouterr().err


def test_an_in_memory_storage_is_refused(tmp_path):
    for url in ("sqlite://", "sqlite:///:memory:"):
        done = _tune(tmp_path, "-s", "8x8", "-k", "toy_grid", "-n", "1", "--storage", url)
        assert done.returncode == 2 and "in-memory database" in done.stderr, done.stderr


@pytest.mark.parametrize("damage", [lambda d: d.update(records=[1]), lambda d: d["records"].update(x=3), lambda d: d.clear()])
def test_a_damaged_records_file_is_one_line(tmp_path, monkeypatch, damage):
    from bitnet_compile import plan
    from bitnet_compile.errors import UserError
    from bitnet_compile.models import Linear
    from bitnet_compile.target import parse_target

    monkeypatch.setenv(records.RECORDS_ENV, str(tmp_path))
    target = parse_target("llvm -mcpu=native")
    path = _write_record(tmp_path, target, "lut_gemv", 256, 512, {"kblock": 32, "row_blocks_per_task": 1}, [])
    data = json.loads(path.read_text())
    damage(data)
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="tuning records .* (damaged|have format)"):
        plan.plan([Linear("a", 256, 512)], target, FAMILIES["lut"])
