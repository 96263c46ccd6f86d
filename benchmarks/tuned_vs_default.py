"""Is a tuned artifact at least as fast as the default one, end to end?

    python benchmarks/tuned_vs_default.py -m MODEL_DIR [-t 2] [--rounds 4] [--out FILE.md]

Compiles the model's artifact twice, with this machine's tuning records and without any (an
empty records directory), then measures both in the same processes: each of two worker
processes loads both models and alternates between them for ``--rounds`` rounds (a 128-token
prompt, then 48 decoded tokens). Measured in separate processes, two artifacts with the same
decode kernels differed in decode; in one process, whichever model is loaded first decodes
slower, whatever its artifact. So one worker loads the tuned model first, the other
the default one, and the report gives medians over both and their ratio.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT, DECODE = 128, 48


def artifacts(model: str, records: str | None) -> str:
    """The cached artifact for ``model`` on this CPU with ``records`` as the records directory."""
    from bitnet_compile.model_artifact import for_model
    from bitnet_compile.records import RECORDS_ENV
    from bitnet_compile.target import parse_target

    saved = os.environ.get(RECORDS_ENV)
    if records is None:
        os.environ.pop(RECORDS_ENV, None)
    else:
        os.environ[RECORDS_ENV] = records
    try:
        return str(for_model(model, parse_target("llvm -mcpu=native")))
    finally:
        if saved is None:
            os.environ.pop(RECORDS_ENV, None)
        else:
            os.environ[RECORDS_ENV] = saved


def worker(spec: dict) -> dict:
    """Load the models in ``spec["order"]`` and alternate between them; tokens/s per round."""
    from bitnet_runtime.api import LLM

    llms = {name: LLM(spec["model"], spec["artifacts"][name], echo=lambda line: None) for name in spec["order"]}
    result: dict = {name: {"decode": [], "prompt": []} for name in llms}
    for r in range(spec["rounds"]):
        for name in spec["order"] if r % 2 == 0 else list(reversed(spec["order"])):
            model = llms[name].model
            start = time.perf_counter()
            model.prefill(list(range(1, PROMPT + 1)))
            result[name]["prompt"].append(PROMPT / (time.perf_counter() - start))
            model.prefill([1])
            start = time.perf_counter()
            for i in range(DECODE):
                model.decode(5 + i)
            result[name]["decode"].append(DECODE / (time.perf_counter() - start))
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    from bitnet_compile.isolation import module_command
    from bitnet_compile.measure import cpu_model

    with tempfile.TemporaryDirectory() as tmp:
        paths = {"tuned": artifacts(args.model, None), "default": artifacts(args.model, str(Path(tmp) / "no-records"))}
    runs = []
    for order in (["tuned", "default"], ["default", "tuned"]):
        print(f"measuring, {order[0]} loaded first ...", file=sys.stderr, flush=True)
        spec = {"model": args.model, "artifacts": paths, "order": order, "rounds": args.rounds}
        env = dict(os.environ, TVM_NUM_THREADS=str(args.threads), PYTHONPATH=str(Path(__file__).parent))
        done = subprocess.run(
            module_command("tuned_vs_default", "--worker", json.dumps(spec)), env=env, capture_output=True, text=True, check=True
        )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    med = {name: {m: statistics.median(v for run in runs for v in run[name][m]) for m in ("decode", "prompt")} for name in paths}
    n = 2 * args.rounds
    lines = [
        f"## Tuned vs default artifact, end to end ({args.threads} threads, f16 output layer)",
        "",
        f"- date {_dt.date.today().isoformat()}, CPU {cpu_model()}; command: `python {shlex.join(sys.argv)}`",
        f"- both artifacts in each of two processes (one loads the tuned model first, one the default), {args.rounds} alternating "
        f"rounds each: a {PROMPT}-token prompt, then {DECODE} decoded tokens; medians of the {n} runs per artifact",
        f"- tuned artifact: {paths['tuned']}; default: {paths['default']}",
        "",
        "| artifact | decode tok/s | prompt tok/s |",
        "|---|---:|---:|",
        *(f"| {name} | {m['decode']:.1f} | {m['prompt']:.1f} |" for name, m in med.items()),
        f"| tuned / default | {med['tuned']['decode'] / med['default']['decode']:.3f} | {med['tuned']['prompt'] / med['default']['prompt']:.3f} |",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"artifacts": paths, "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
