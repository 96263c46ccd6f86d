"""``bitnet-compile bench``: time the ternary kernels against a plain int8 TVM kernel, and the
machine's DRAM read bandwidth, on a model's linear shapes; print a Markdown report.

Why it is built this way:
- Every kernel family the target can run (``lut``, and ``dot2`` where VNNI exists) is timed,
  each beside the same int8 baseline on the same weights and tokens. Family kernels come from
  ``plan.plan``, so they are exactly what an artifact holds; with the baseline and the
  read-only bandwidth kernel they are compiled once into one library in a temporary directory.
- TVM's thread pool takes its size from TVM_NUM_THREADS once, at first use, so each thread
  count is measured in its own process (``python -m bitnet_compile.bench --worker DIR
  --threads N``), which loads that library and writes its results as JSON.
- "DRAM" figures are what decoding sees: before every single call, time_evaluator copies a
  buffer of 2x the L3 size (at least 64 MiB), so the weights come from memory. "cache"
  figures are back-to-back calls, at least 20 ms per repeat. Medians are reported.
- Each kernel is checked against its numpy reference before it is timed: a wrong kernel is
  never benchmarked.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bitnet_runtime import services

from .errors import UserError
from .measure import WARM_MS, cpu_model, l3_bytes, time_cached, time_streamed, weight_rotation
from .measure import stream_bytes as default_stream_bytes
from .models import Linear

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .families import Family
    from .target import TargetSpec

THREADS = (1, 2)
ROUNDS = 3  # passes over all measurements, each taking 1/ROUNDS of the repeats
LIBRARY = "bench_kernels.so"
SPEC = "spec.json"
BANDWIDTH_KERNEL = "bandwidth_read"
SEED = 0
BASELINE = "int8"


# ----------------------------------------------------------------------------- building


def families_for(target: TargetSpec) -> list[Family]:
    """Every kernel family the target can run, in the compiler's order of preference."""
    from . import schedule_db
    from .families import FAMILIES

    return [FAMILIES[name] for name in schedule_db.family_preference(target.isa) if not FAMILIES[name].missing(target)]


def build(target: TargetSpec, linears: list[Linear], out_dir: Path, tokens: int, repeat: int, stream_bytes: int) -> dict:
    """Compile every kernel into ``out_dir/LIBRARY`` and describe the work in ``out_dir/SPEC``.

    Family kernels come from ``plan.plan``, so they have exactly the names, padded shapes
    and knobs an artifact would give them; quantize/dequantize are left out (not timed here).
    """
    import tvm

    from .ops import bandwidth, int8_matmul, registry
    from .plan import plan

    families = families_for(target)
    if not families:
        raise UserError(f"no kernel family runs on {target.mcpu} ({target.isa}): nothing to benchmark")
    funcs: dict = {}
    work = [{"name": lin.name, "n": lin.n, "k": lin.k, "kernels": {}} for lin in linears]
    for family in families:
        kernels, entries = plan(linears, target, family)
        for k in kernels:
            if k.op not in ("quantize", "dequantize") and k.name not in funcs:
                funcs[k.name] = registry.get(k.op).build(k.name, k.shape, k.knobs, target)
        for item, entry in zip(work, entries):
            keep = ("n_padded", "k_padded", "layout", "layout_params", "kernels")
            item["kernels"][family.name] = {key: getattr(entry, key) for key in keep}
    for item in work:
        n, k8 = item["n"], int8_matmul.padded_k(item["k"])
        names = {"gemv": f"int8_gemv_n{n}_k{item['k']}", "gemm": f"int8_gemm_n{n}_k{item['k']}"}
        for op, name in names.items():
            funcs.setdefault(name, int8_matmul.build_primfunc(name, n, k8, gemv=op == "gemv"))
        item["kernels"][BASELINE] = {"n_padded": n, "k_padded": k8, "layout": "int8", "layout_params": {}, "kernels": names}
    chunks, steps, lanes = bandwidth.shape_for(stream_bytes)
    funcs[BANDWIDTH_KERNEL] = bandwidth.build_primfunc(BANDWIDTH_KERNEL, chunks, steps)
    _progress(
        f"compiling {len(funcs)} kernels ({', '.join(f.name for f in families)} families, int8 baseline) for {target.mcpu} ({target.isa}) ..."
    )
    start = time.perf_counter()
    tvm.compile(tvm.IRModule(funcs), target=target.tvm_target()).export_library(str(out_dir / LIBRARY))
    _progress(f"compiled in {time.perf_counter() - start:.1f} s")
    spec = {
        "tokens": tokens,
        "repeat": repeat,
        "stream_bytes": stream_bytes,
        "families": [f.name for f in families],
        "bandwidth": {"kernel": BANDWIDTH_KERNEL, "shape": [chunks, steps, lanes]},
        "linears": work,
    }
    (out_dir / SPEC).write_text(json.dumps(spec, indent=1))
    return spec


# ----------------------------------------------------------------------------- measuring (worker)


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class _Timings:
    """Every timing of a worker, taken in interleaved rounds.

    On a shared or virtual machine speed drifts over seconds (we saw one kernel at 22 ms in
    one process and 36 ms in the next), so each measurement gets its repeats spread over
    ROUNDS passes through all of them, alternating the order: a slow spell then hits every
    kernel alike, and the median over all repeats ignores it unless it lasts most of the run.

    "DRAM" jobs stream their weights as decoding a model does: each call gets the next of
    enough copies of the weights to exceed twice the caches, so every call reads its weights
    from memory and the caches hold only clean lines (a cache flush by copying a buffer would
    leave dirty lines whose write-back the kernel would pay for).
    """

    def __init__(self, mod, repeat: int, stream_bytes: int):
        self.mod, self.stream_bytes = mod, stream_bytes
        self.rounds = min(ROUNDS, repeat)
        self.per_round = -(-repeat // self.rounds)
        self.jobs: list[tuple[str, str, tuple, bool]] = []
        self.samples: dict[str, list[float]] = {}

    def add(self, key: str, name: str, args: tuple, dram: bool = False) -> None:
        self.jobs.append((key, name, args, dram))
        self.samples[key] = []

    def _streamed(self, name: str, args: tuple) -> list[float]:
        """Seconds per call, calls rotating over copies of args[1] (the weights)."""
        rotation = weight_rotation(args, 1, max(self.stream_bytes, 2 * args[1].nbytes))
        return time_streamed(self.mod[name], rotation, self.per_round)

    def run(self, label: str) -> dict[str, float]:
        for r in range(self.rounds):
            start = time.perf_counter()
            for key, name, args, dram in self.jobs if r % 2 == 0 else reversed(self.jobs):
                if dram:
                    self.samples[key] += self._streamed(name, args)
                else:  # back-to-back calls, as many as fill WARM_MS per repeat
                    self.samples[key] += time_cached(self.mod, name, args, self.per_round)
            _progress(f"{label} round {r + 1}/{self.rounds} of {len(self.jobs)} measurements took {time.perf_counter() - start:.0f} s")
        return {key: float(np.median(values)) for key, values in self.samples.items()}


def _check(name: str, got: np.ndarray, want: np.ndarray) -> None:
    if not np.array_equal(got, want):
        raise RuntimeError(f"kernel {name} does not match its numpy reference: not benchmarking a wrong kernel")


def _padded(a: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """An int8 matrix (tokens or weight rows) zero-padded to [rows, cols], 64-byte aligned."""
    from bitnet_runtime.memory import aligned_zeros

    out = aligned_zeros((rows, cols), np.int8)
    out[: a.shape[0], : a.shape[1]] = a
    return out


def _cases(kind: dict, w: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, dict]:
    """Packed weights, and per op (gemv: the first token, gemm: all) the kernel name, its
    arguments, and a function giving its [tokens, n] result, for one kernel kind. The family
    kernels are called as BitLinear calls them: through their layout's bind."""
    from bitnet_runtime import layout, reference
    from bitnet_runtime.linear import MATMULS, pack_weights
    from bitnet_runtime.manifest import LinearEntry
    from bitnet_runtime.memory import aligned_zeros

    (n, k), tokens = w.shape, q.shape[0]
    n_p, k_p, names = kind["n_padded"], kind["k_padded"], kind["kernels"]
    if kind["layout"] in MATMULS:
        entry = LinearEntry("bench", n, k, n_p, k_p, kind["layout"], kind["layout_params"], names)
        packed, cases = pack_weights(entry, w), {}
        for op, rows in (("gemv", 1), ("gemm", tokens)):
            call = MATMULS[entry.layout]({}, entry.params, rows)
            call.q[:, :k] = q[:rows]
            if entry.layout == layout.VERSION:  # the tables are the LUT kernels' input: made here, timed apart
                reference.write_lut_tables(call.q, call.tables)
            cases[op] = (names[op], call.args(packed), lambda call=call: call.out[:, :n])
        return packed, cases
    packed = _padded(w, n, k_p)  # the int8 baseline: weights as plain int8 rows
    out1, out = aligned_zeros((1, n), np.int32), aligned_zeros((tokens, n), np.int32)
    return packed, {
        "gemv": (names["gemv"], (_padded(q[:1], 1, k_p), packed, out1), lambda: out1),
        "gemm": (names["gemm"], (_padded(q, tokens, k_p), packed, out), lambda: out),
    }


def _setup_linear(mod, lin: dict, tokens: int, rng: np.random.Generator, timings: _Timings) -> dict:
    """Check every kernel kind of one linear shape (same weights and tokens for all) against
    numpy, and queue its timings; returns the result skeleton that ``worker`` fills with the timings."""
    from bitnet_runtime import layout, reference
    from bitnet_runtime.memory import aligned_zeros

    n, k, key = lin["n"], lin["k"], lin["name"]
    w = rng.integers(-1, 2, (n, k), dtype=np.int8)
    q = rng.integers(-128, 128, (tokens, k), dtype=np.int8)
    want1 = reference.ternary_matmul(q[:1], w)
    want = (q.astype(np.float64) @ w.T.astype(np.float64)).astype(np.int32)  # exact (< 2**53), BLAS-fast
    result = {"name": key, "n": n, "k": k, "kernels": {}, "tables": {}}
    for kind_name, kind in lin["kernels"].items():
        packed, cases = _cases(kind, w, q)
        for op, (name, args, got) in cases.items():
            mod[name](*args)
            _check(name, got(), want if op == "gemm" else want1)
        timings.add(f"{key}/{kind_name}/gemv_cache_s", *cases["gemv"][:2])
        timings.add(f"{key}/{kind_name}/gemv_dram_s", *cases["gemv"][:2], dram=True)
        timings.add(f"{key}/{kind_name}/gemm_s", *cases["gemm"][:2])
        result["kernels"][kind_name] = {"n_padded": kind["n_padded"], "k_padded": kind["k_padded"], "weight_bytes": packed.nbytes}
        table = kind["kernels"].get("lut_table")
        if table:  # LUT tables: timed apart, reported in a note
            q_pad = _padded(q, tokens, kind["k_padded"])
            tables = aligned_zeros(layout.table_shape(tokens, kind["k_padded"]), np.int8)
            mod[table](q_pad, tables)
            _check(table, tables, reference.lut_tables(q_pad))
            timings.add(f"{key}/table/table_1_s", table, (q_pad[:1], tables[:1]))
            timings.add(f"{key}/table/table_m_s", table, (q_pad, tables))
            result["tables"] = {"k_padded": kind["k_padded"]}
    return result


def _setup_bandwidth(mod, spec: dict, timings: _Timings) -> dict:
    from bitnet_runtime.memory import aligned_empty, aligned_zeros

    from .ops import bandwidth

    chunks, steps, lanes = spec["bandwidth"]["shape"]
    buf = aligned_empty((chunks, steps, lanes), np.uint32)
    flat = buf.reshape(-1)
    flat[:] = np.arange(flat.size, dtype=np.uint32)
    flat *= np.uint32(2654435761)  # not all-equal data, in case anything compresses
    out = aligned_zeros((chunks, lanes), np.uint32)
    name = spec["bandwidth"]["kernel"]
    mod[name](buf, out)
    _check(name, out, bandwidth.reference(buf))
    timings.add("bandwidth/seconds", name, (buf, out))  # larger than the caches and only read: always from DRAM
    return {"bytes": buf.nbytes}


def worker(directory: Path, threads: int) -> dict:
    """Measure everything in ``directory/SPEC`` on ``threads`` threads; results to JSON there."""
    import tvm

    got = tvm.get_global_func("runtime.NumThreads")()
    if got != threads:
        raise RuntimeError(f"TVM's pool has {got} threads, not {threads}: start the worker with TVM_NUM_THREADS={threads}")
    spec = json.loads((directory / SPEC).read_text())
    mod = tvm.runtime.load_module(str(directory / LIBRARY))
    label = f"[{threads} thread{'s' if threads > 1 else ''}]"
    rng = np.random.default_rng(SEED)
    timings = _Timings(mod, spec["repeat"], spec["stream_bytes"])
    bandwidth = _setup_bandwidth(mod, spec, timings)
    linears = [_setup_linear(mod, lin, spec["tokens"], rng, timings) for lin in spec["linears"]]
    _progress(f"{label} every kernel matches numpy; timing ...")
    medians = timings.run(label)
    bandwidth["seconds"] = medians["bandwidth/seconds"]
    bandwidth["gb_per_s"] = bandwidth["bytes"] / bandwidth["seconds"] / 1e9
    _progress(f"{label} DRAM read bandwidth: {bandwidth['gb_per_s']:.1f} GB/s ({bandwidth['bytes'] >> 20} MiB read)")
    tables: dict[int, dict] = {}
    for lin in linears:
        for kind, r in lin["kernels"].items():
            r |= {m: medians[f"{lin['name']}/{kind}/{m}"] for m in ("gemv_cache_s", "gemv_dram_s", "gemm_s")}
            _progress(
                f"{label} {lin['name']} {lin['n']}x{lin['k']} {kind}: GEMV {_fmt(r['gemv_cache_s'] * 1e6)} us cache, "
                f"{_fmt(r['gemv_dram_s'] * 1e6)} us DRAM; GEMM {_fmt(r['gemm_s'] * 1e3)} ms"
            )
        table = lin.pop("tables")
        if table and table["k_padded"] not in tables:
            tables[table["k_padded"]] = table | {m: medians[f"{lin['name']}/table/{m}"] for m in ("table_1_s", "table_m_s")}
    result = {"threads": threads, "bandwidth": bandwidth, "linears": linears, "lut_tables": list(tables.values())}
    (directory / f"result-{threads}.json").write_text(json.dumps(result, indent=1))
    return result


# ----------------------------------------------------------------------------- reporting


def _fmt(value: float, digits: int | None = None) -> str:
    """Fixed decimals, or by default three significant digits (tiny test shapes and 2B-4T alike)."""
    if digits is None:
        digits = max(0, 2 - math.floor(math.log10(abs(value)))) if value else 0
    return f"{value:,.{digits}f}"


def _with_total(run: dict) -> list[dict]:
    """The run's linears plus an "all" row: times and bytes summed per kernel kind."""
    lins = run["linears"]
    total = {"name": f"all {len(lins)}", "n": 0, "k": 0, "ops": sum(r["n"] * r["k"] for r in lins), "kernels": {}}
    for kind in lins[0]["kernels"]:
        keys = ("weight_bytes", "gemv_cache_s", "gemv_dram_s", "gemm_s")
        total["kernels"][kind] = {key: sum(r["kernels"][kind][key] for r in lins) for key in keys}
    return [*lins, total]


def _vs(base: float, mine: float, kind: str) -> str:
    return "-" if kind == BASELINE else f"{base / mine:.2f}x"


def _gemv_rows(run: dict) -> list[list[str]]:
    rows = []
    for lin in _with_total(run):
        base = lin["kernels"][BASELINE]
        for kind, r in lin["kernels"].items():
            gbps = r["weight_bytes"] / r["gemv_dram_s"] / 1e9
            rows.append(
                [
                    lin["name"], f"{lin['n']}x{lin['k']}" if lin["n"] else "", str(run["threads"]), kind,
                    _fmt(r["weight_bytes"] / 1e6), _fmt(r["gemv_cache_s"] * 1e6), _fmt(r["gemv_dram_s"] * 1e6),
                    _fmt(gbps), f"{100 * gbps / run['bandwidth']['gb_per_s']:.0f}%",
                    _vs(base["gemv_cache_s"], r["gemv_cache_s"], kind), _vs(base["gemv_dram_s"], r["gemv_dram_s"], kind),
                ]
            )  # fmt: skip
    return rows


def _gemm_rows(run: dict, tokens: int) -> list[list[str]]:
    rows = []
    for lin in _with_total(run):
        ops = 2 * tokens * (lin.get("ops") or lin["n"] * lin["k"])
        base = lin["kernels"][BASELINE]
        for kind, r in lin["kernels"].items():
            rows.append(
                [
                    lin["name"], f"{lin['n']}x{lin['k']}" if lin["n"] else "", str(run["threads"]), kind,
                    _fmt(r["gemm_s"] * 1e3), _fmt(ops / r["gemm_s"] / 1e9), _vs(base["gemm_s"], r["gemm_s"], kind),
                ]
            )  # fmt: skip
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    align = "|" + "|".join("---" if i < 4 else "---:" for i in range(len(header))) + "|"
    return "\n".join(["| " + " | ".join(header) + " |", align, *("| " + " | ".join(row) + " |" for row in rows)])


def format_report(report: dict) -> str:
    """The Markdown report: a header that says what, where and how, then two tables."""
    t, m = report["target"], report["machine"]
    tokens, repeat = report["tokens"], report["repeat"]
    runs = report["runs"]
    l3 = f"L3 {m['l3_bytes'] >> 20} MiB" if m["l3_bytes"] else "L3 size unknown"
    bw = ", ".join(f"{r['threads']} thread{'s' if r['threads'] > 1 else ''} {r['bandwidth']['gb_per_s']:.1f} GB/s" for r in runs)
    from .families import FAMILIES

    kinds = "; ".join(f"{name} = {FAMILIES[name].summary}, layout {FAMILIES[name].layout}" for name in report["families"])
    lines = [
        "## bitnet-compile bench",
        "",
        f"- date: {report['date']}",
        f"- CPU: {m['cpu']} ({m['cores']} cores usable, {l3})",
        f"- target: {t['mcpu']} ({t['triple']}), {t['isa']} kernel variants; TVM {report['versions']['tvm']}, bitnet-compile {report['versions']['bitnet_compile']}",
        f"- command: `{report['command']}`",
        f"- shapes: {report['model']}; GEMM over {tokens} tokens; medians of {repeat} repeats",
        f"- DRAM read bandwidth (read-only TVM kernel streaming {report['bandwidth_bytes'] >> 20} MiB): {bw}",
        f'- "DRAM": calls rotate over copies of the weights totalling {report["stream_bytes"] >> 20} MiB (2x L3), as decoding '
        f'streams a model\'s layers; "cache": back-to-back calls on one copy, >= {WARM_MS} ms per repeat',
        f"- kernels: {kinds}; int8 = the baseline, a plain int8 x int8 -> int32 TVM kernel (TE, parallel rows, "
        'LLVM vectorizes) with the weights as int8. "vs int8" = int8 time / kernel time, same threads and cache state',
        "- MB and GB/s count the weight bytes each kernel reads (2-bit kinds: N_padded*K_padded/4; int8: N*K, K padded to 32)",
    ]
    tables = runs[0].get("lut_tables") if runs else None
    if tables:
        note = "; ".join(
            f"K={tb['k_padded']}: {_fmt(tb['table_1_s'] * 1e6)} us for 1 token, {_fmt(tb['table_m_s'] * 1e6)} us for {tokens}"
            for tb in tables
        )
        lines.append(f"- lut times exclude building the activation tables ({runs[0]['threads']} thread: {note})")
    lines += [
        "",
        "### GEMV (1 token)",
        "",
        _table(
            [
                "layer",
                "N x K",
                "threads",
                "kernel",
                "weights MB",
                "cache us",
                "DRAM us",
                "DRAM GB/s",
                "of DRAM BW",
                "vs int8 cache",
                "vs int8 DRAM",
            ],
            [row for run in runs for row in _gemv_rows(run)],
        ),  # fmt: skip
        "",
        f"### GEMM ({tokens} tokens, weights in cache; GOP/s = 2*M*N*K)",
        "",
        _table(
            ["layer", "N x K", "threads", "kernel", "ms", "GOP/s", "vs int8"],
            [row for run in runs for row in _gemm_rows(run, tokens)],
        ),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- driver


def measure(
    target: TargetSpec,
    linears: list[Linear],
    label: str,
    tokens: int = 128,
    repeat: int = 15,
    threads: tuple[int, ...] = THREADS,
    stream_bytes: int | None = None,
    command: str = "",
) -> dict:
    """Build, run one worker per thread count, and collect everything into one report dict."""
    import tvm

    from . import __version__

    if tokens < 1:
        raise UserError(f"--tokens must be at least 1, got {tokens}")
    if repeat < 1:
        raise UserError(f"--repeat must be at least 1, got {repeat}")
    cores = services.usable_cores()
    counts = [t for t in threads if t <= cores]
    if len(counts) < len(threads):
        _progress(f"skipping thread counts above the {cores} usable cores: {[t for t in threads if t > cores]}")
    l3 = l3_bytes()
    stream = stream_bytes or default_stream_bytes(l3)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bitnet-bench-") as tmp:
        directory = Path(tmp)
        spec = build(target, linears, directory, tokens, repeat, stream)
        runs = []
        for n in counts:
            _progress(f"measuring with {n} thread{'s' if n > 1 else ''} ...")
            env = dict(os.environ, TVM_NUM_THREADS=str(n))
            cmd = [sys.executable, "-m", "bitnet_compile.bench", "--worker", str(directory), "--threads", str(n)]
            done = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL)
            if done.returncode != 0:
                raise RuntimeError(f"the benchmark worker for {n} threads failed (exit status {done.returncode}); see above")
            runs.append(json.loads((directory / f"result-{n}.json").read_text()))
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "model": label,
        "machine": {"cpu": cpu_model(), "cores": cores, "l3_bytes": l3},
        "target": target.to_json(),
        "versions": {"tvm": tvm.__version__, "bitnet_compile": __version__},
        "tokens": tokens,
        "repeat": repeat,
        "stream_bytes": stream,
        "families": spec["families"],
        "bandwidth_bytes": runs[0]["bandwidth"]["bytes"] if runs else 0,
        "seconds": time.perf_counter() - started,
        "runs": runs,
    }


def run(args: argparse.Namespace) -> int:
    """The CLI entry point (options: see ``bitnet-compile bench --help``)."""
    from . import cross, models
    from .target import parse_target

    target = parse_target(args.target)
    if target.is_gpu or cross.is_foreign(target.arch):
        raise UserError(f"bench-kernels times kernels on this machine, which cannot run {target.name} code; benchmark on the device")
    request = models.resolve_request(args.model, args.shapes)
    stream_mib = args.stream_mib
    report = measure(
        target,
        request.linears,
        f"{request.name} linear layers" if request.name else request.label,
        tokens=args.tokens,
        repeat=args.repeat,
        threads=args.threads,
        stream_bytes=stream_mib << 20 if stream_mib else None,
        command=shlex.join(["bitnet-compile", *sys.argv[1:]]),
    )
    print(format_report(report), flush=True)
    if args.json:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as err:
            raise UserError(f"cannot write {args.json}: {err}") from None
        _progress(f"wrote {args.json}")
    _progress(f"bench finished in {report['seconds']:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bitnet_compile.bench --worker DIR --threads N``: one thread count's measurements."""
    p = argparse.ArgumentParser(prog="python -m bitnet_compile.bench")
    p.add_argument("--worker", type=Path, required=True)
    p.add_argument("--threads", type=int, required=True)
    args = p.parse_args(argv)
    worker(args.worker, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
