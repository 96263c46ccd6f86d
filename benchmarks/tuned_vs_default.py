"""Is a tuned artifact at least as fast as the default one, end to end?

    python benchmarks/tuned_vs_default.py -m MODEL_DIR [--rounds 2] [-t 2] [--out FILE.md]

Runs ``bitnet-compile bench`` alternately with this machine's tuning records and without any
(an empty records directory), ``--rounds`` times each (A B A B ...: a slow spell of a shared
machine then hits both), and reports the medians and their ratio for decode and prompt
tokens/s. The two artifacts differ only in the kernels whose records beat the defaults.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def bench(model: str, threads: str, records: str | None, out: Path) -> dict:
    env = dict(os.environ)
    if records is not None:
        env["BITNET_RECORDS"] = records
    cmd = [sys.executable, "-m", "bitnet_compile", "bench", "-m", model, "-t", threads, "--output-layer", "f16", "--json", str(out)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    (run,) = json.loads(out.read_text())["runs"]
    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", required=True)
    p.add_argument("-t", "--threads", default="2")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    from bitnet_compile.tuning.measure import cpu_model

    runs: dict[str, list[dict]] = {"tuned": [], "default": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for label in ("tuned", "default") if r % 2 == 0 else ("default", "tuned"):
                print(f"round {r + 1}/{args.rounds}: {label} ...", file=sys.stderr, flush=True)
                records = None if label == "tuned" else str(Path(tmp) / "no-records")
                runs[label].append(bench(args.model, args.threads, records, Path(tmp) / f"{label}-{r}.json"))
    med = {label: {key: statistics.median(run[key] for run in rs) for key in ("decode_tok_s", "prompt_tok_s")} for label, rs in runs.items()}
    lines = [
        f"## Tuned vs default artifact, end to end ({args.threads} threads, f16 output layer)",
        "",
        f"- date {_dt.date.today().isoformat()}, CPU {cpu_model()}; command: `python benchmarks/tuned_vs_default.py -m {args.model} -t {args.threads} --rounds {args.rounds}`",
        f"- {args.rounds} alternating rounds of `bitnet-compile bench` each (each a median of 3); medians of the rounds",
        "",
        "| artifact | decode tok/s | prompt tok/s |",
        "|---|---:|---:|",
        *(f"| {label} | {m['decode_tok_s']:.1f} | {m['prompt_tok_s']:.1f} |" for label, m in med.items()),
        f"| tuned / default | {med['tuned']['decode_tok_s'] / med['default']['decode_tok_s']:.3f} | {med['tuned']['prompt_tok_s'] / med['default']['prompt_tok_s']:.3f} |",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
