"""Load on an OpenAI-compatible server: aggregate decode throughput by concurrent streams,
inter-token latency, and time to first token of a prompt under load.

    python benchmarks/serve_load.py -m MODEL_DIR -a ARTIFACT [--streams 1,16] [--tokens 64]
        [--llama-server BIN --gguf FILE] [--rounds 2] [-t THREADS] [--out FILE.md]

Starts ``bitnet-runtime serve`` (and, given ``--llama-server``, llama.cpp's llama-server on
the GGUF of the same shape, with as many slots), and in alternating rounds measures, with
the prompt given as token ids and ``ignore_eos`` so every stream runs its full length:

- throughput at each stream count: N clients stream ``--tokens`` tokens each at once. Two
  figures: "wall", generated tokens (the servers' usage counts) over the wall time of the
  whole batch, prompts and ramp-up included; "decode", the streams' chunks (one per token
  that released text) that arrived while all N were decoding, over that window's length:
  the steady-state decode throughput the goals speak of;
- inter-token latency of one stream: its mean gap between tokens, and for this project
  beside ``bitnet-runtime run``'s decode speed on the same machine (the issue's "within 5%");
- time to first token of a 128-token prompt, alone and while ``max(streams)`` streams run.

Medians over the rounds. The client is light (it parses only the last chunk of each
stream) but shares the machine with the server, equally for both servers.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from bitnet_compile.measure import cpu_model

PROBE_PROMPT = 128  # tokens of the time-to-first-token prompt
WARM_TOKENS = 96  # a few seconds of decoding before measuring (the first second after idle measured up to 20% slower)
LOAD_TOKENS = 160  # tokens of each stream running while it is measured


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not come up")


def stream_once(url: str, model: str, prompt: list[int], tokens: int) -> dict:
    """One streamed completion: time to first chunk, wall time, tokens generated."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    times, last_data = [], ""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            times.append(time.perf_counter())
            last_data = line
    end = time.perf_counter()
    usage = json.loads(last_data[6:]).get("usage") if last_data else None
    generated = usage["completion_tokens"] if usage else len(times)
    return {"ttft": times[0] - start, "wall": end - start, "tokens": generated, "decode": end - times[0], "times": times}


def concurrent(url: str, model: str, streams: int, tokens: int, vocab: int) -> list[dict]:
    results: list[dict] = [None] * streams  # type: ignore[list-item]

    def client(i: int) -> None:
        results[i] = stream_once(url, model, [1 + (7 * i + j) % (vocab - 2) for j in range(8)], tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def throughput(url: str, model: str, streams: int, tokens: int, vocab: int) -> dict:
    start = time.perf_counter()
    results = concurrent(url, model, streams, tokens, vocab)
    wall = time.perf_counter() - start
    generated = sum(r["tokens"] for r in results)
    itl = statistics.median(r["decode"] / max(r["tokens"] - 1, 1) for r in results)
    begin, end = max(r["times"][0] for r in results), min(r["times"][-1] for r in results)
    inside = sum(begin < t <= end for r in results for t in r["times"])
    steady = inside / (end - begin) if end > begin else float("nan")
    return {"tok_s": generated / wall, "decode_tok_s": steady, "itl_ms": itl * 1e3}


def ttft_under_load(url: str, model: str, streams: int, vocab: int) -> dict:
    """TTFT of a PROBE_PROMPT-token prompt alone, then while ``streams`` streams decode."""
    probes = iter(
        [[1 + (j * 31 + 17 * start) % (vocab - 2) for j in range(PROBE_PROMPT)] for start in range(2)]
    )  # unlike any cached prompt
    alone = stream_once(url, model, next(probes), 1)["ttft"]
    done = threading.Event()
    load = threading.Thread(target=lambda: (concurrent(url, model, streams, LOAD_TOKENS, vocab), done.set()))
    load.start()
    time.sleep(2.0 + 0.15 * streams)  # the streams are admitted and decoding
    loaded = stream_once(url, model, next(probes), 1)["ttft"]
    if done.is_set():
        print("warning: the load ended before the probe; raise its length", file=sys.stderr)
    load.join()
    return {"ttft_alone_s": alone, "ttft_loaded_s": loaded}


def measure(url: str, model: str, stream_counts: list[int], tokens: int, vocab: int) -> dict:
    out = {}
    for n in stream_counts:
        r = throughput(url, model, n, tokens, vocab)
        out[f"tok_s@{n}"], out[f"decode_tok_s@{n}"] = r["tok_s"], r["decode_tok_s"]
        if n == 1:
            out["itl_ms@1"] = r["itl_ms"]
    out |= ttft_under_load(url, model, max(stream_counts), vocab)
    return out


class Served:
    def __init__(self, cmd: list[str], url: str, env: dict | None = None):
        self.url = url
        self.process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_healthy(url, self.process)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(120)


def ours(args, slots: int) -> Served:
    port = free_port()
    cmd = [sys.executable, "-m", "bitnet_runtime", "serve", "-a", args.artifact, "-m", args.model, "--name", "bench",
           "--port", str(port), "-np", str(slots), "-t", str(args.threads), "--output-layer", args.output_layer]  # fmt: skip
    return Served(cmd, f"http://127.0.0.1:{port}")


def llama(args, slots: int) -> Served:
    port = free_port()
    cmd = [args.llama_server, "-m", args.gguf, "--port", str(port), "-np", str(slots), "-t", str(args.threads),
           "-c", str(slots * args.ctx_per_slot), "-cb", "--no-webui", "-a", "bench"]  # fmt: skip
    return Served(cmd, f"http://127.0.0.1:{port}", env=dict(os.environ, LLAMA_ARG_HOST="127.0.0.1"))


def run_itl(args) -> float:
    """``bitnet-runtime run``'s decode: ms per token, same prompt length and token count; its
    second run of two back to back (the first warms the CPU up, as the servers' warm-up does)."""
    cmd = [sys.executable, "-m", "bitnet_runtime", "run", "-a", args.artifact, "-m", args.model, "-p", "hello world " * 3,
           "-n", str(args.tokens), "--json", "-t", str(args.threads), "--output-layer", args.output_layer]  # fmt: skip
    for _ in range(2):
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return 1e3 / json.loads(done.stdout)["decode_tokens_per_second"]


def median_of(rounds: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def table(results: dict, stream_counts: list[int]) -> str:
    heads = [f"{kind} tok/s, {n} streams" for n in stream_counts for kind in ("decode", "wall")]
    rows = ["| server | " + " | ".join(heads) + " | ITL 1 stream (ms) | TTFT 128 alone (s) | TTFT 128 loaded (s) |"]
    rows.append("|---" * (len(heads) + 4) + "|")
    for name, r in results.items():
        cells = [f"{r[f'{kind}@{n}']:.1f}" for n in stream_counts for kind in ("decode_tok_s", "tok_s")]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {r['itl_ms@1']:.1f} | {r['ttft_alone_s']:.2f} | {r['ttft_loaded_s']:.2f} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", required=True)
    p.add_argument("-a", "--artifact", required=True)
    p.add_argument("--streams", default="1,16")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    p.add_argument("--vocab", type=int, default=32000, help="token ids of the prompts stay below it")
    p.add_argument("--llama-server", default=None)
    p.add_argument("--gguf", default=None)
    p.add_argument("--ctx-per-slot", type=int, default=1024)
    p.add_argument(
        "--output-layer", default="f16", choices=("f16", "i8"), help="this project's output layer (llama-server's is its GGUF's)"
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    counts = [int(n) for n in args.streams.split(",")]
    slots = max(counts) + 1  # the probe of the TTFT test needs a slot beside the load
    servers = {"bitnet-compile serve": lambda: ours(args, slots)}
    if args.llama_server:
        servers["llama-server (TQ2_0)"] = lambda: llama(args, slots)
    rounds: dict[str, list[dict]] = {name: [] for name in servers}
    run_ms: list[float] = []
    for i in range(args.rounds):
        for name, start in servers.items():
            server = start()
            try:
                stream_once(server.url, "bench", [1, 2, 3, 4], WARM_TOKENS)  # warm-up: a CPU that was idle runs slower at first
                rounds[name].append(measure(server.url, "bench", counts, args.tokens, args.vocab))
                print(f"round {i + 1} {name}: {rounds[name][-1]}", file=sys.stderr, flush=True)
            finally:
                server.stop()
        run_ms.append(run_itl(args))
    results = {name: median_of(r) for name, r in rounds.items()}
    ours_r = results["bitnet-compile serve"]
    lines = [
        f"# Serving benchmark, {_dt.date.today()}",
        "",
        f"`python benchmarks/serve_load.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores; {args.threads} threads; "
        f"medians of {args.rounds} interleaved rounds; {args.tokens} tokens per stream; prompts as token ids; ignore_eos; "
        f"this project's output layer {args.output_layer}.",
        "",
        table(results, counts),
        "",
        f"- bitnet-compile, {max(counts)} streams vs 1: {ours_r[f'decode_tok_s@{max(counts)}'] / ours_r['decode_tok_s@1']:.2f}x "
        f"aggregate decode throughput ({ours_r[f'tok_s@{max(counts)}'] / ours_r['tok_s@1']:.2f}x wall)",
        f"- one stream through the server vs `bitnet-runtime run`: ITL {ours_r['itl_ms@1']:.1f} ms vs {statistics.median(run_ms):.1f} ms "
        f"({ours_r['itl_ms@1'] / statistics.median(run_ms):.3f}x)",
        f"- TTFT of a {PROBE_PROMPT}-token prompt with {max(counts)} streams running vs alone: "
        f"{ours_r['ttft_loaded_s'] / ours_r['ttft_alone_s']:.2f}x",
    ]
    if "llama-server (TQ2_0)" in results:
        peer = results["llama-server (TQ2_0)"]
        for n in counts:
            lines.append(
                f"- vs llama-server at {n} streams: {ours_r[f'decode_tok_s@{n}'] / peer[f'decode_tok_s@{n}']:.2f}x aggregate decode "
                f"throughput ({ours_r[f'tok_s@{n}'] / peer[f'tok_s@{n}']:.2f}x wall)"
            )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)
        args.out.with_suffix(".json").write_text(json.dumps({"rounds": rounds, "run_itl_ms": run_ms, "medians": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
