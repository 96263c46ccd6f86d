"""``bitnet-compile bench -m MODEL``: end-to-end tokens/s of a model on its artifact.

For each thread count and output-layer format, a fresh process (TVM's thread pool is fixed
per process, and peak memory must be the run's own) loads the model, then measures:
- decode: 128 tokens generated one at a time after a short prompt (greedy, EOS ignored);
- prompt: a 128-token prompt processed as one batch;
- per decoded token, the host time outside compiled code, the native calls from Python (one
  with the compiled decode step) and the kernel launches;
- ``--decode step,kernels``: both ways of decoding, to compare them in one run;
- peak resident memory, the weight bytes read per token and the DRAM read bandwidth (a
  read-only TVM kernel over twice the L3), hence the fraction of the bandwidth limit
  (decode tok/s x bytes per token / bandwidth) reached;
- for the i8 output layer, its top-1 agreement with f16 on the same hidden states.
Medians of ``--repeat`` runs. The worker half of this module needs only bitnet_runtime.
With ``--peers DIR`` (peers.py), the f16 runs alternate with the peers' over ``--rounds``
rounds, and a second table gives medians over the rounds and the ratios.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bitnet_runtime.errors import UserError

from .isolation import module_command
from .measure import cpu_model, l3_bytes, stream_bytes

BANDWIDTH_FILE = "bandwidth.so"
DECODE_MODES = ("step", "kernels")


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, help="model directory or hub id (a dummy one: bitnet-compile dummy 2b-4t -o DIR)")
    p.add_argument("-a", "--artifact", type=Path, default=None, help="artifact directory (default: compile one for this CPU, cached)")
    p.add_argument("-t", "--threads", default="1,2", help="thread counts, e.g. 1,2 (default)")
    p.add_argument("--output-layer", default="f16,i8", help="output layer formats to measure (default f16,i8)")
    p.add_argument(
        "--decode",
        default=None,
        help="how decoded tokens run: step (the artifact's compiled decode step, one call per token), "
        "kernels (kernel by kernel from Python), or both to compare: step,kernels (default: step where the artifact has one)",
    )
    p.add_argument("--tokens", type=int, default=128, help="decoded tokens and prompt tokens per run (default 128)")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure; medians are reported (default 3)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument(
        "--peers",
        type=Path,
        default=None,
        help="also run the peers built in this directory (bitnet.cpp, llama.cpp), interleaved, and print ratios",
    )
    p.add_argument(
        "--rounds", type=int, default=2, help="with --peers: interleaved rounds of this project's f16 runs and the peers' (default 2)"
    )


def _list(text: str, kind, what: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"bad {what} list {text!r}") from None
    if not values:
        raise UserError(f"empty {what} list")
    return values


def _bandwidth_library(target_json: dict, nbytes: int, out_dir: Path) -> list[int]:
    """Compile the read-only bandwidth kernel for the artifact's target; returns its shape."""
    import tvm

    from .ops import bandwidth
    from .target import parse_target

    chunks, steps, lanes = bandwidth.shape_for(nbytes)
    func = bandwidth.build_primfunc("bandwidth_read", chunks, steps)
    t = target_json
    target = parse_target(
        json.dumps({"kind": t["kind"], "mtriple": t["triple"], "mcpu": t["mcpu"], "mattr": t["mattr"], "num-cores": t["num_cores"]})
    )
    tvm.compile(tvm.IRModule({"bandwidth_read": func}), target=target.tvm_target()).export_library(str(out_dir / BANDWIDTH_FILE))
    return [chunks, steps, lanes]


def _prepare(spec: dict, formats: list[str]) -> None:
    """Convert the weights (each output-layer format) once, in a process of its own, so no
    measured run pays for it."""
    code = (
        "import sys, json; from bitnet_runtime.api import LLM; s = json.loads(sys.argv[1])\n"
        "for f in s['formats']: LLM(s['model'], s['artifact'], output=f, echo=lambda l: print(l, file=sys.stderr))"
    )
    if subprocess.run([sys.executable, "-c", code, json.dumps(spec | {"formats": formats})]).returncode != 0:
        raise UserError("loading the model for the benchmark failed (see above)")


def _worker_run(spec: dict, threads: int, fmt: str) -> dict:
    env = dict(os.environ, TVM_NUM_THREADS=str(threads))
    cmd = module_command("bitnet_compile.model_bench", "--worker", json.dumps(spec | {"threads": threads, "format": fmt}))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"benchmark worker ({threads} threads, {fmt}) failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace, artifact_dir: Path) -> int:
    from bitnet_runtime.checkpoint import locate
    from bitnet_runtime.manifest import read_manifest

    threads = _list(args.threads, int, "thread count")
    formats = _list(args.output_layer, str, "output layer")
    if min(threads) < 1 or args.tokens < 1 or args.repeat < 1:
        raise UserError("--threads, --tokens and --repeat must be at least 1")
    if set(formats) - {"f16", "i8"}:
        raise UserError(f"unknown output layer format in {args.output_layer!r}: f16, i8")
    model_dir = locate(args.model)
    manifest = read_manifest(Path(artifact_dir))
    modes = _list(args.decode, str, "decode") if args.decode else ["step" if manifest.program else "kernels"]
    if set(modes) - set(DECODE_MODES):
        raise UserError(f"unknown decode mode in {args.decode!r}: {', '.join(DECODE_MODES)}")
    if "step" in modes and manifest.program is None:
        raise UserError(f"artifact {artifact_dir} has no compiled decode step: --decode kernels, or compile it for the model")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        nbytes = stream_bytes(l3_bytes())
        shape = _bandwidth_library(manifest.target, nbytes, Path(tmp))
        spec = {
            "model": str(model_dir),
            "artifact": str(artifact_dir),
            "tokens": args.tokens,
            "repeat": args.repeat,
            "bandwidth": {"library": str(Path(tmp) / BANDWIDTH_FILE), "shape": shape},
        }
        _prepare(spec, formats)
        runs = []
        for mode in modes:
            for fmt in formats:
                for t in threads:
                    print(f"measuring {t} thread{'s' if t > 1 else ''}, {fmt} output layer, decode {mode} ...", file=sys.stderr, flush=True)
                    runs.append(_worker_run(spec | {"decode": mode}, t, fmt))
        side_by_side = _with_peers(args, spec | {"decode": modes[0]}, threads, model_dir, runs) if args.peers else None
    report = {
        "date": _dt.date.today().isoformat(),
        "cpu": cpu_model(),
        "model": str(args.model),
        "artifact": str(artifact_dir),
        "family": manifest.family,
        "tokens": args.tokens,
        "repeat": args.repeat,
        "seconds": time.perf_counter() - start,
        "runs": runs,
        **({"peers": side_by_side} if side_by_side else {}),
    }
    print(format_report(report))
    if side_by_side:
        print(format_peers(side_by_side))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _with_peers(args: argparse.Namespace, spec: dict, threads: list[int], model_dir: Path, first: list[dict]) -> list[dict]:
    """Per thread count, this project's f16 decode/prompt and each peer's, medians over
    ``--rounds`` interleaved rounds (the first round reuses the f16 runs just made)."""
    import statistics

    from bitnet_runtime.model_config import load_config

    from . import peers

    if args.rounds < 1:
        raise UserError("--rounds must be at least 1")
    found = peers.available(args.peers, load_config(model_dir).hidden)
    samples: dict[tuple[int, str], list[dict]] = {}
    for round_ in range(args.rounds):
        for t in threads:
            mine = [r for r in first if (r["threads"], r["format"], r["decode"]) == (t, "f16", spec["decode"])]
            ours = mine[0] if round_ == 0 and mine else None
            samples.setdefault((t, "this project"), []).append(ours or _worker_run(spec, t, "f16"))
            for peer in found:
                print(f"round {round_ + 1}/{args.rounds}: {peer.name}, {t} thread{'s' if t > 1 else ''} ...", file=sys.stderr, flush=True)
                samples.setdefault((t, peer.name), []).append(peers.measure(peer, t, args.tokens, args.repeat))
    table = []
    for t in threads:
        row: dict = {"threads": t}
        for name in ["this project", *(p.name for p in found)]:
            runs = samples[(t, name)]
            row[name] = {key: statistics.median(r[key] for r in runs) for key in ("decode_tok_s", "prompt_tok_s")}
        table.append(row)
    return table


def format_peers(table: list[dict]) -> str:
    """Decode / prompt tokens/s side by side, and this project's ratio to each peer."""
    names = [name for name in table[0] if name not in ("threads", "this project")]
    head = ["threads", "this project (f16) decode / prompt"] + [f"{n} decode / prompt" for n in names] + [f"vs {n}" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        ours = row["this project"]
        cells = [str(row["threads"]), f"{ours['decode_tok_s']:.1f} / {ours['prompt_tok_s']:.1f}"]
        cells += [f"{row[n]['decode_tok_s']:.1f} / {row[n]['prompt_tok_s']:.1f}" for n in names]
        cells += [
            f"{ours['decode_tok_s'] / row[n]['decode_tok_s']:.2f}x / {ours['prompt_tok_s'] / row[n]['prompt_tok_s']:.2f}x" for n in names
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_report(report: dict) -> str:
    head = [
        "threads",
        "output layer",
        "decode",
        "decode tok/s",
        "prompt tok/s",
        "ms/token",
        "host ms/token",
        "calls/token",
        "launches/token",
        "peak memory",
        "MB read/token",
        "DRAM GB/s",
        "of limit",
        "top-1 vs f16",
    ]
    rows = []
    for r in report["runs"]:
        agree = f"{100 * r['top1_agreement']:.1f}%" if r.get("top1_agreement") is not None else "-"
        rows.append(
            [
                str(r["threads"]),
                r["format"],
                r["decode"],
                f"{r['decode_tok_s']:.1f}",
                f"{r['prompt_tok_s']:.1f}",
                f"{1000 / r['decode_tok_s']:.1f}",
                f"{1000 * r['host_s_per_token']:.2f}",
                f"{r['calls_per_token']:.0f}",
                f"{r['launches_per_token']:.0f}",
                f"{r['peak_rss_bytes'] / 1e9:.2f} GB",
                f"{r['bytes_per_token'] / 1e6:.0f}",
                f"{r['bandwidth_gb_s']:.1f}",
                f"{100 * r['fraction_of_limit']:.0f}%",
                agree,
            ]
        )
    lines = [
        f"{report['model']} on {report['artifact']} ({report['family']}), {report['cpu']}, {report['date']}; "
        f"medians of {report['repeat']}, {report['tokens']} tokens decoded / in the prompt",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---- worker: runs in its own process, bitnet_runtime only ----


def _weight_bytes(model) -> int:
    """Bytes a decode step reads: every packed linear, its scales and the output layer."""
    total = 0
    for layer in model.layers:
        for linear, _ in layer.linears.values():
            total += linear.packed.nbytes + linear.weight_scale.nbytes
    return total + model.output.nbytes


def _decode_seconds(model, prompt: list[int], tokens: int) -> float:
    logits = model.prefill(prompt)
    start = time.perf_counter()
    for _ in range(tokens):
        logits = model.decode(int(np.argmax(logits)))
    return time.perf_counter() - start


def _host_and_launches(spec: dict, prompt: list[int], tokens: int) -> tuple[float, float, float]:
    """Per decoded token: seconds outside compiled code, native calls from Python, and kernel
    launches (inside the compiled decode step where the artifact has one). A second load of
    the model whose artifact counts and times every call from Python (the decode step is one);
    the prompt's calls are left out (they would make decoding look cheaper than it is)."""
    from bitnet_runtime.api import LLM
    from bitnet_runtime.artifact import Artifact, LaunchStats

    stats = LaunchStats()
    artifact = Artifact(spec["artifact"], stats=stats)
    model = LLM(spec["model"], artifact, output=spec["format"], threads=spec["threads"], echo=lambda line: None).model
    if spec["decode"] == "kernels":
        model.compiled_step = False
    if model.step is not None:
        model.step.function = stats.counted(model.step.function)
    logits = model.prefill(prompt)
    stats.reset()
    start = time.perf_counter()
    for _ in range(tokens):
        logits = model.decode(int(np.argmax(logits)))
    inside = model.step.kernel_calls if model.step is not None else stats.calls / tokens
    return (time.perf_counter() - start - stats.seconds) / tokens, stats.calls / tokens, inside


def _bandwidth(spec: dict) -> float:
    import tvm_ffi

    from bitnet_runtime.memory import aligned_empty

    chunks, steps, lanes = spec["shape"]
    kernel = tvm_ffi.load_module(spec["library"])["bandwidth_read"]
    buf = aligned_empty((chunks, steps, lanes), np.uint32)
    buf[...] = 1
    out = aligned_empty((chunks, lanes), np.uint32)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        kernel(buf, out)
        times.append(time.perf_counter() - start)
    return buf.nbytes / float(np.median(times)) / 1e9


def _agreement(model, prompt: list[int], tokens: int) -> float:
    """Top-1 agreement of the i8 output layer with f16 on the hidden states of a greedy f16 decode."""
    from bitnet_runtime.output_layer import make_output_layer

    f16 = make_output_layer(model.artifact, model.weights, "f16")
    model.reset()
    h, same = model.hidden(prompt), 0
    for _ in range(tokens):
        exact = f16(h)
        same += int(np.argmax(exact) == np.argmax(model.output(h)))
        h = model.hidden([int(np.argmax(exact))])
    return same / tokens


def worker(spec: dict) -> dict:
    from bitnet_runtime.api import LLM

    llm = LLM(spec["model"], spec["artifact"], output=spec["format"], threads=spec["threads"], echo=lambda line: None)
    model, n, repeat = llm.model, spec["tokens"], spec["repeat"]
    if spec["decode"] == "kernels":
        model.compiled_step = False
    rng = np.random.default_rng(0)
    short = rng.integers(0, model.config.vocab, 8).tolist()
    prompt = rng.integers(0, model.config.vocab, n).tolist()
    if len(prompt) + n + len(short) > model.context_length:
        raise UserError(f"--tokens {n} does not fit the model's context of {model.context_length}")
    _decode_seconds(model, short, 4)  # warm-up: first-call buffers, page faults of the mapping
    decode = [n / _decode_seconds(model, short, n) for _ in range(repeat)]
    prompt_speed = []
    for _ in range(repeat):
        start = time.perf_counter()
        model.prefill(prompt)
        prompt_speed.append(n / (time.perf_counter() - start))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the f16 copy and bandwidth buffer below
    agreement = _agreement(model, short, n) if spec["format"] == "i8" else None
    bandwidth = _bandwidth(spec["bandwidth"])
    bytes_per_token = _weight_bytes(model)
    decode_tok_s = float(np.median(decode))
    return {
        "threads": spec["threads"],
        "format": spec["format"],
        "decode": spec["decode"],
        "decode_tok_s": decode_tok_s,
        "prompt_tok_s": float(np.median(prompt_speed)),
        **dict(zip(("host_s_per_token", "calls_per_token", "launches_per_token"), _host_and_launches(spec, short, min(n, 32)))),
        "peak_rss_bytes": peak,
        "bytes_per_token": bytes_per_token,
        "bandwidth_gb_s": bandwidth,
        "fraction_of_limit": decode_tok_s * bytes_per_token / (bandwidth * 1e9),
        "top1_agreement": agreement,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bitnet_compile.model_bench")
    p.add_argument("--worker", required=True, help="JSON spec (internal)")
    print(json.dumps(worker(json.loads(p.parse_args(argv).worker))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
