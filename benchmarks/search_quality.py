"""Quality of the search: does the tuner find (nearly) the best schedule in few trials?

    python benchmarks/search_quality.py [--kernel dot2_gemm --shape 3840x2560] [--seeds 50] [--out FILE.md]

1. Exhaustive: every distinct kernel of the space is compiled, checked and timed in ONE worker
   job (interleaved rounds, like the tuner's confirmation), giving each point's time and the
   optimum.
2. Replay: the tuner's own search (tuning/study.py with optuna TPE, in memory) runs against
   that table for many seeds with a budget of 25% of the space; reported: how often the best
   point it found is within 5% of the optimum, median and worst ratio, against random
   search on the same budget. Replaying a measured table separates the search from the
   machine's noise.
3. Real: one real ``bitnet-compile tune`` of the same kernel with that budget; its pick is
   looked up in the exhaustive table.
4. With ``--model 2b-4t``: every kernel shape that model's tuning covers is measured
   exhaustively, and the record's pick (from ``bitnet-compile tune -m 2b-4t``) is placed
   against that optimum: is every kernel within 5% of its best?
5. The tuned-vs-default table of the records for this machine (``schedules compare``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUDGET = 0.25
WITHIN = 0.05


def exhaustive(op: str, n: int, k: int, threads: int, target) -> tuple[dict[str, float], dict[str, dict]]:
    """Kernel key -> seconds, and kernel key -> knobs, for every distinct kernel of the space."""
    from bitnet_compile.measure import stream_bytes
    from bitnet_compile.ops import registry
    from bitnet_compile.tuning.study import CONFIRM_REPEATS, CONFIRM_ROUNDS
    from bitnet_compile.tuning.worker import Worker

    template = registry.get_tunable(op)
    distinct: dict[str, dict] = {}
    for point in template.space.points(template.names(n, k, target, threads)):
        _, built = template.kernel_shape(n, k, point, target)
        distinct.setdefault(json.dumps(built, sort_keys=True), point)
    job = {"op": op, "n": n, "k": k, "candidates": list(distinct.values()), "target": target.to_json(), "threads": threads,
           "seed": 0, "repeats": CONFIRM_REPEATS, "rounds": CONFIRM_ROUNDS, "stream_bytes": stream_bytes(), "timing": template.timing,
           "rpc": None}  # fmt: skip
    print(f"exhaustive: {len(distinct)} kernels of {op} {n}x{k} at {threads} threads ...", file=sys.stderr, flush=True)
    with Worker(threads) as worker:
        results = worker.run(job, 1800)
    table = {key: r["seconds"] for key, r in zip(distinct, results) if r["state"] == "ok"}
    return table, distinct


class TableWorker:
    """Stands in for the measuring worker: answers from the exhaustive table."""

    def __init__(self, study, table: dict[str, float]):
        self.study, self.table = study, table

    def run(self, job: dict, timeout: float) -> list[dict]:
        return [{"state": "ok", "seconds": self.table[self.study.kernel_key(p)], "compile_s": 0.0} for p in job["candidates"]]


def replay(op: str, n: int, k: int, threads: int, target, table: dict[str, float], budget: int, seed: int) -> float:
    """Best true time the tuner's search finds in ``budget`` measured trials (one seed)."""
    import optuna

    from bitnet_compile import schedule_db
    from bitnet_compile.ops import registry
    from bitnet_compile.tuning import study as study_mod

    spec = study_mod.StudySpec(registry.get_tunable(op), n, k, threads, target)
    s = study_mod.Study(spec, optuna.storages.InMemoryStorage(), schedule_db.default_knobs(op, target.isa), seed=seed)
    worker = TableWorker(s, table)
    stuck = 0
    while s.measured_count() < budget and not s.exhausted():
        if s.step(worker, 0):
            stuck = 0
        else:
            stuck += 1
            if stuck >= study_mod.STUCK_ASKS and s.enqueue_unmeasured():
                stuck = 0
    return min(table[s.kernel_key(s.knobs(t))] for t in s.measured().values() if t.value is not None)


def random_search(table: dict[str, float], default_key: str, budget: int, seed: int) -> float:
    """The default plus random distinct points: the baseline a sampler must beat."""
    others = [key for key in table if key != default_key]
    picks = random.Random(seed).sample(others, min(budget - 1, len(others)))
    return min(table[key] for key in [default_key, *picks])


def real_tune(op: str, n: int, k: int, budget: int, table: dict[str, float]) -> dict:
    """One real tune of the kernel with the budget; its pick's time in the exhaustive table."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, BITNET_RECORDS=tmp)
        cmd = [
            sys.executable,
            "-m",
            "bitnet_compile",
            "tune",
            "-s",
            f"{n}x{k}",
            "-k",
            op,
            "-n",
            str(budget),
            "--storage",
            f"sqlite:///{tmp}/s.db",
        ]
        subprocess.run(cmd, env=env, check=True, stderr=subprocess.DEVNULL)
        (path,) = Path(tmp).glob("*.json")
        (record,) = json.loads(path.read_text())["records"].values()
    from bitnet_compile.ops import registry
    from bitnet_compile.target import parse_target

    template, target = registry.get_tunable(op), parse_target("llvm -mcpu=native")
    _, built = template.kernel_shape(n, k, record["best"]["knobs"], target)
    key = json.dumps(built, sort_keys=True)
    return {"knobs": record["best"]["knobs"], "seconds": table[key], "ratio": table[key] / min(table.values())}


def _key(template, n: int, k: int, knobs: dict, target) -> str:
    return json.dumps(template.kernel_shape(n, k, knobs, target)[1], sort_keys=True)


def check_records(model: str, target, threads: int, only: str | None = None) -> tuple[list[str], dict]:
    """Markdown rows: each kernel shape's default and record pick against its exhaustive
    optimum; and the exhaustive tables (knobs -> seconds) by record key."""
    from bitnet_compile import records, schedule_db
    from bitnet_compile.ops import registry
    from bitnet_compile.tuning import views
    from bitnet_compile.tuning.command import plan_work

    args = argparse.Namespace(model=model, shapes=None, kernels=None, family="auto")
    work, _ = plan_work(args, target)
    data = records.read(records.path_for(records.fingerprint(target)))["records"]
    rows, tables = [], {}
    for item in work:
        template = registry.get_tunable(item.op)
        key = records.record_key(item.op, template.version, template.layout, item.n, item.k, threads)
        if only and only not in key:
            continue
        record = data.get(key)
        if not record or not record.get("best"):
            rows.append(f"| {item.op} | {item.n}x{item.k} | no record | | | | | |")
            continue
        table, distinct = exhaustive(item.op, item.n, item.k, threads, target)
        tables[key] = {json.dumps(distinct[k]): s for k, s in sorted(table.items(), key=lambda kv: kv[1])}
        optimum = min(table.values())
        default = table[_key(template, item.n, item.k, schedule_db.default_knobs(item.op, target.isa), target)]
        picked = table[_key(template, item.n, item.k, record["best"]["knobs"], target)]
        best_knobs = views._knobs(distinct[min(table, key=table.get)])
        rows.append(f"| {item.op} | {item.n}x{item.k} | {len(table)} | {record['measured']} | {best_knobs} | {views._knobs(record['best']['knobs'])} "
                    f"| {default / optimum:.3f} | {picked / optimum:.3f} |")  # fmt: skip
    return rows, tables


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", default="dot2_gemm")
    p.add_argument("--shape", default="3840x2560")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seeds", type=int, default=50)
    p.add_argument(
        "--table", type=Path, default=None, help="replay against the exhaustive table of an earlier report's JSON (no measuring)"
    )
    p.add_argument("--model", default=None, help="also place this model's tuning records against exhaustive optima (e.g. 2b-4t)")
    p.add_argument("--only", default=None, help="with --model: only the records whose key contains this (e.g. dot2_gemv)")
    p.add_argument("--out", type=Path, default=None, help="also write the report (Markdown) and a .json beside it")
    args = p.parse_args()
    from bitnet_compile import schedule_db
    from bitnet_compile.measure import cpu_model
    from bitnet_compile.ops import registry
    from bitnet_compile.target import parse_target
    from bitnet_compile.tuning import views

    target = parse_target("llvm -mcpu=native")
    threads = args.threads or target.num_cores
    n, k = (int(v) for v in args.shape.lower().split("x"))
    if args.table:
        template = registry.get_tunable(args.kernel)
        points = [json.loads(point) for point in json.loads(args.table.read_text())["table"]]
        seconds = list(json.loads(args.table.read_text())["table"].values())
        distinct = {_key(template, n, k, point, target): point for point in points}
        table = {_key(template, n, k, point, target): s for point, s in zip(points, seconds)}
    else:
        table, distinct = exhaustive(args.kernel, n, k, threads, target)
    optimum = min(table.values())
    best_key = min(table, key=table.get)
    template = registry.get_tunable(args.kernel)
    _, default_built = template.kernel_shape(n, k, schedule_db.default_knobs(args.kernel, target.isa), target)
    default_key = json.dumps(default_built, sort_keys=True)
    budget = max(2, math.ceil(BUDGET * len(table)))
    tuner = [replay(args.kernel, n, k, threads, target, table, budget, seed) / optimum for seed in range(args.seeds)]
    rand = [random_search(table, default_key, budget, seed) / optimum for seed in range(args.seeds)]
    real = real_tune(args.kernel, n, k, budget, table) if not args.table else None
    within = lambda ratios: sum(r <= 1 + WITHIN for r in ratios) / len(ratios)  # noqa: E731
    report = {
        "date": _dt.date.today().isoformat(), "cpu": cpu_model(), "target": target.mcpu, "kernel": args.kernel, "shape": [n, k],
        "threads": threads, "space": len(table), "budget": budget, "optimum": {"knobs": distinct[best_key], "seconds": optimum},
        "default": {"knobs": distinct.get(default_key), "seconds": table.get(default_key)},
        "tuner": {"within": within(tuner), "median": statistics.median(tuner), "worst": max(tuner)},
        "random": {"within": within(rand), "median": statistics.median(rand), "worst": max(rand)},
        "real": real, "table": {json.dumps(distinct[key]): s for key, s in sorted(table.items(), key=lambda kv: kv[1])},
    }  # fmt: skip
    lines = [
        f"## Search quality: {args.kernel} {n}x{k}, {threads} threads",
        "",
        f"- date {report['date']}, CPU {report['cpu']} (LLVM {target.mcpu}); command: `python {shlex.join(sys.argv)}`",
        f"- space: {len(table)} distinct kernels, all measured (interleaved rounds); optimum {views._knobs(distinct[best_key])} "
        f"{optimum * 1e6:,.1f} us; default {views._knobs(distinct.get(default_key) or {})} {table.get(default_key, float('nan')) * 1e6:,.1f} us "
        f"({table.get(default_key, float('nan')) / optimum:.2f}x the optimum)",
        f"- budget: {budget} measured trials ({BUDGET:.0%} of the space), {args.seeds} seeds replayed against the measured table",
        "",
        "| search | runs within 5% of the optimum | median best / optimum | worst best / optimum |",
        "|---|---:|---:|---:|",
        f"| tuner (TPE, default first) | {within(tuner):.0%} | {statistics.median(tuner):.3f} | {max(tuner):.3f} |",
        f"| random (default + random points) | {within(rand):.0%} | {statistics.median(rand):.3f} | {max(rand):.3f} |",
        "",
        f"- one real `bitnet-compile tune` with {budget} trials picked {views._knobs(real['knobs'])}: {real['ratio']:.3f}x the optimum"
        if real
        else f"- replayed against the table of {args.table}",
    ]
    if args.model:
        rows, report["record_tables"] = check_records(args.model, target, threads, args.only)
        lines += [
            "",
            f"### The records of `bitnet-compile tune -m {args.model}` against exhaustive optima",
            "",
            "Each kernel shape's whole space measured in one interleaved job; time / optimum of the default and of the record's pick.",
            "",
            "| kernel | N x K | space | trials | exhaustive optimum | record's pick | default / optimum | pick / optimum |",
            "|---|---|---:|---:|---|---|---:|---:|",
            *rows,
        ]
    lines += [
        "",
        "### Tuned vs default (records for this machine, `bitnet-compile schedules compare`)",
        "",
        "```",
        views.compare_view(None),
        "```",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
