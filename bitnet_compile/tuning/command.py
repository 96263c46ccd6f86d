"""``bitnet-compile tune``: which studies a model or shape list needs, the time budget split
over them, one worker per thread count, and the summary at the end."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import records
from ..errors import UserError

if TYPE_CHECKING:
    from .study import StudySpec

DEFAULT_TRIALS = 20
DEFAULT_BUDGET_S = 600
DEFAULT_TIMEOUT_S = 120
OUTPUT_LAYER_OPS = ("f16_gemv", "i8_gemv")


@dataclass(frozen=True)
class Work:
    op: str
    n: int
    k: int


def plan_work(args: argparse.Namespace, target) -> tuple[list[Work], str]:
    """Distinct (kernel, shape) pairs to tune: layers sharing a shape are tuned once."""
    from .. import models, schedule_db
    from ..families import choose
    from ..ops import registry

    family = choose(target, args.family, schedule_db.family_preference(target.isa))
    request = models.resolve_request(args.model, args.shapes)
    layers = [(lin.n, lin.k) for lin in request.linears]
    output = [request.output_layer] if request.output_layer else []
    family_ops = [op for op, t in registry.tunable().items() if t.layout == family.layout and target.isa in t.isas]
    wanted = args.kernels.split(",") if args.kernels else family_ops + (list(OUTPUT_LAYER_OPS) if output else [])
    work: list[Work] = []
    for op in wanted:
        template = registry.get_tunable(op.strip())
        if target.isa not in template.isas:
            raise UserError(f"kernel {template.op} has no {target.isa} variant (it has {', '.join(sorted(template.isas))})")
        for n, k in output if op in OUTPUT_LAYER_OPS and output else layers:
            item = Work(template.op, n, k)
            if item not in work:
                work.append(item)
    return work, request.label


def run(args: argparse.Namespace) -> int:
    from bitnet_runtime.cpu import host_arch

    from .. import cross
    from ..ops import registry
    from ..target import parse_target
    from .rpc import Remote
    from .study import Study, StudySpec, open_storage, run_study
    from .worker import Worker, WorkerError

    for module in args.plugin:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise UserError(f"--plugin {module}: {err}") from None
    if args.trials < 1:
        raise UserError(f"--trials must be at least 1, got {args.trials}")
    if args.time_budget <= 0:
        raise UserError(f"--time-budget must be positive, got {args.time_budget}")
    target = parse_target(args.target)
    remote = Remote.parse(args.rpc, args.rpc_key) if args.rpc else None
    if args.rpc_key and not args.rpc:
        raise UserError("--rpc-key needs --rpc HOST:PORT (the tracker)")
    if target.is_gpu:
        raise UserError(f"tuning {target.kind} kernels is not implemented yet (their defaults are in schedules/defaults.json)")
    if remote is None and cross.is_foreign(target.arch):
        raise UserError(
            f"{target.arch} kernels cannot be timed on this {host_arch()} machine: tune on the device over RPC "
            "(there: python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090; here: --rpc DEVICE:9090)"
        )
    work, label = plan_work(args, target)
    counts = args.threads or (target.num_cores,)
    storage = open_storage(args.storage)
    fp = records.fingerprint(target, remote=remote is not None)
    where = f"RPC {args.rpc}" + (f" key {args.rpc_key}" if args.rpc_key else "") if remote else fp["cpu"]
    print(
        f"tuning {len(work)} kernel shapes of {label} for {target.mcpu} ({target.isa}) on {where}, {'/'.join(map(str, counts))} threads; "
        f"{args.trials} trials each, {args.time_budget:.0f} s budget\nrecords: {records.path_for(fp)}",
        file=sys.stderr,
    )
    from bitnet_runtime.weights import cache_root

    start = time.monotonic()
    end = start + args.time_budget
    summary = []
    total = len(work) * len(counts)
    done = 0
    for threads in counts:
        try:
            with Worker(threads, tuple(args.plugin), log_path=cache_root() / "tuning" / "worker.log") as worker:
                for item in work:
                    share = (end - time.monotonic()) / (total - done)
                    done += 1
                    template = registry.get_tunable(item.op)
                    spec = StudySpec(template, item.n, item.k, threads, target, remote)
                    study = Study(spec, storage, _default_for(template, target))
                    if study.recovered:
                        print(f"{spec.label()}: {study.recovered} interrupted trial(s) will be measured again", file=sys.stderr)
                    record = run_study(study, worker, args.trials, time.monotonic() + max(share, 0), args.trial_timeout)
                    summary.append(record)
                    print(_summary_line(spec, record), file=sys.stderr)
        except WorkerError as err:
            raise UserError(str(err)) from None
    print(f"tuned {len(summary)} studies in {time.monotonic() - start:.0f} s; records in {records.path_for(fp)}", file=sys.stderr)
    failed = [record for record in summary if not record.get("best")]
    if failed:
        log = cache_root() / "tuning" / "worker.log"
        raise UserError(
            f"{len(failed)} of {len(summary)} studies found no working candidate (every trial failed, see {log}); their earlier records were kept"
        )
    return 0


def _default_for(template, target) -> dict:
    """The knobs compile uses without a record; a plugin's template, which has no entry in
    defaults.json, starts from each knob's first value."""
    from .. import schedule_db

    try:
        return schedule_db.default_knobs(template.op, target.isa)
    except UserError:
        return {name: values[0] for name, values in template.space.knobs.items()}


def _summary_line(spec: StudySpec, record: dict) -> str:
    states = [t["state"] for t in record["trials"] if t["state"] not in ("invalid", "duplicate")]
    failed = sum(1 for s in states if s != "complete")
    best = record.get("best")
    if not best:
        return f"{spec.label()}: no candidate worked ({failed} failed)"
    speed = f", {record['speedup']:.2f}x over default" if "speedup" in record else ""
    knobs = " ".join(f"{k}={v}" for k, v in best["knobs"].items())
    return f"{spec.label()}: {record['measured']} trials ({failed} failed), best {knobs} {best['seconds'] * 1e6:,.1f} us{speed}"
