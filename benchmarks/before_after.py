"""Is a change free of speed cost end to end? ``bitnet-compile bench`` of two checkouts, interleaved.

    python benchmarks/before_after.py --before REV -m MODEL_DIR [--rounds 2] [--out FILE.md]

Checks out ``REV`` (a commit from before the change) into a temporary git worktree and runs
``bitnet-compile bench -m MODEL_DIR`` there and in this checkout in alternation, ``--rounds``
times each, with the same Python environment (the worktree's code comes first on PYTHONPATH).
A first short run of each side compiles its artifact and converts the weights, so no timed
round pays for them. The report gives, per thread count and output-layer format, the medians
over the rounds of each side and their ratio (after / before).
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

REPO = Path(__file__).resolve().parent.parent
METRICS = (("decode_tok_s", "decode tok/s"), ("prompt_tok_s", "prompt tok/s"))


def bench(checkout: Path, model: str, json_path: Path | None, extra: list[str]) -> None:
    """One ``bitnet-compile bench`` with ``checkout``'s code."""
    env = dict(os.environ, PYTHONPATH=f"{checkout}{os.pathsep}{checkout / 'runtime'}")
    command = [sys.executable, "-m", "bitnet_compile", "bench", "-m", model, *extra]
    if json_path is not None:
        command += ["--json", str(json_path)]
    subprocess.run(command, cwd=checkout, env=env, check=True, stdout=subprocess.DEVNULL)


def run_rounds(before: Path, model: str, rounds: int, out_dir: Path) -> dict[str, list[Path]]:
    """Warm both sides up, then alternate before/after ``rounds`` times; the JSON reports."""
    sides = {"before": before, "after": REPO}
    for checkout in sides.values():
        bench(checkout, model, None, ["--tokens", "16", "--repeat", "1", "-t", "1", "--output-layer", "f16"])
    reports: dict[str, list[Path]] = {name: [] for name in sides}
    for round_ in range(rounds):
        for name, checkout in sides.items():
            path = out_dir / f"{name}-{round_}.json"
            print(f"round {round_ + 1}/{rounds}: {name}", file=sys.stderr, flush=True)
            bench(checkout, model, path, [])
            reports[name].append(path)
    return reports


def medians(paths: list[Path]) -> dict[tuple[int, str], dict[str, float]]:
    """(threads, output format) -> metric -> median over the reports."""
    samples: dict[tuple[int, str], dict[str, list[float]]] = {}
    for path in paths:
        for run in json.loads(path.read_text())["runs"]:
            per = samples.setdefault((run["threads"], run["format"]), {})
            for metric, _ in METRICS:
                per.setdefault(metric, []).append(run[metric])
    return {key: {m: statistics.median(v) for m, v in per.items()} for key, per in samples.items()}


def report(reports: dict[str, list[Path]], before_rev: str, model: str) -> str:
    first = json.loads(reports["after"][0].read_text())
    after_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    before, after = medians(reports["before"]), medians(reports["after"])
    lines = [
        f"# Before and after: {before_rev} vs {after_rev}",
        "",
        f"{_dt.date.today()}, {first['cpu']}, model {model} (family {first['family']}); "
        f"`bitnet-compile bench` ({first['tokens']} tokens, medians of {first['repeat']} per run), "
        f"{len(reports['after'])} interleaved rounds per side, medians over the rounds.",
        "",
        "| threads | output layer | " + " | ".join(f"{label} before / after / ratio" for _, label in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for key in sorted(after):
        cells = [f"{before[key][m]:.1f} / {after[key][m]:.1f} / {after[key][m] / before[key][m]:.2f}x" for m, _ in METRICS]
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="git revision from before the change")
    p.add_argument("-m", "--model", required=True, help="model directory (e.g. from bitnet-compile dummy large)")
    p.add_argument("--rounds", type=int, default=2, help="timed runs per side, interleaved (default 2)")
    p.add_argument("--out", type=Path, default=None, help="also write the Markdown report (and the runs' JSON beside it)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.before], cwd=REPO, check=True, capture_output=True)
        try:
            reports = run_rounds(worktree, str(Path(args.model).resolve()), args.rounds, Path(tmp))
            text = report(reports, args.before, Path(args.model).name)
            if args.out:
                args.out.write_text(text)
                runs = {side: [json.loads(path.read_text()) for path in paths] for side, paths in reports.items()}
                args.out.with_suffix(".json").write_text(json.dumps(runs, indent=1) + "\n")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO, capture_output=True)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
