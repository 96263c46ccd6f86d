"""Batched decode in process: one sequence's token vs a step of N sequences, and where the step goes.

    python benchmarks/batch_decode.py -m models/2b-4t -a artifacts/2b-4t --rows 16 --rounds 4 [--output-layer i8]

What the server's continuous batching is made of, without HTTP: ``Model.decode`` (the compiled
decode step ``run`` uses) on one sequence, and ``BatchDecode`` on ``--rows`` sequences of one
KV pool, interleaved round by round (this machine's speed drifts: only a ratio measured side
by side means anything). Each round decodes after a warm-up of a few seconds, since a CPU that
was idle runs its first second measurably slower.

Then one more batched run with every kernel call timed (by wrapping the artifact's functions:
a few microseconds per call, so the parts add up to a little more than the untimed step). The
matmuls (ternary GEMMs and the output layer) are compute-bound at 16 rows, so their sum bounds
the step from below: ``rows x alone / matmuls`` is the most batching could give on this machine
with every other kernel free.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from collections.abc import Callable

from bitnet_compile.measure import cpu_model
from bitnet_runtime.api import LLM
from bitnet_runtime.batch_step import BatchDecode

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]
WARM_S = 3.0


def alone(m, seq, tokens: int) -> float:
    """Median seconds per token of one sequence decoding ``tokens`` tokens."""
    seq.release()
    m.prefill(PROMPT, seq)
    times = []
    for _ in range(tokens):
        start = time.perf_counter()
        m.decode(5, seq)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prefilled(m, seqs) -> list:
    """The sequences, emptied and holding the prompt."""
    for seq in seqs:
        seq.release()
        m.prefill(PROMPT, seq)
    return seqs


def batched(batch: BatchDecode, seqs, steps: int) -> float:
    """Median seconds per step of ``len(seqs)`` sequences decoding together."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        batch(seqs, [5] * len(seqs))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _timed(totals: dict, role: str, function: Callable) -> Callable:
    def call(*args):
        start = time.perf_counter()
        result = function(*args)
        totals[role] += time.perf_counter() - start
        return result

    return call


def kernel_times(m, batch: BatchDecode, seqs, steps: int) -> dict[str, float]:
    """Seconds per step by kernel role, every call of the step timed."""
    totals: dict[str, float] = collections.defaultdict(float)
    batch.k = {role: _timed(totals, role, f) for role, f in batch.k.items()}
    wrapped: set[int] = set()  # layers of one shape share their buffers: wrap each once
    for layer in m.layers:
        for name, (linear, _) in layer.linears.items():
            for role in ("quantize", "rmsnorm_quantize", "dequantize"):
                setattr(linear, role, _timed(totals, role, getattr(linear, role)))
            buffer = linear._buffer(len(seqs))
            if id(buffer) not in wrapped:
                wrapped.add(id(buffer))
                buffer.matmul = _timed(totals, f"ternary GEMM {name}", buffer.matmul)
    m.output.batch = _timed(totals, "output layer", m.output.batch)
    prefilled(m, seqs)
    totals.clear()  # the prompts' calls are not the step's
    batched(batch, seqs, steps)
    return {role: t / steps for role, t in totals.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", required=True)
    p.add_argument("-a", "--artifact", required=True)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--tokens", type=int, default=48, help="tokens per round of the single sequence")
    p.add_argument("--steps", type=int, default=12, help="steps per round of the batch")
    p.add_argument("--output-layer", default="f16", choices=("f16", "i8"), help="output layer format (default f16)")
    args = p.parse_args()
    m = LLM(args.model, args.artifact, output=args.output_layer, echo=lambda line: None).model
    batch, seqs = BatchDecode(m), m.sequences(args.rows)
    deadline = time.perf_counter() + WARM_S
    while time.perf_counter() < deadline:
        alone(m, seqs[0], 8)
    one, many = [], []
    for i in range(args.rounds):
        one.append(alone(m, seqs[0], args.tokens))
        many.append(batched(batch, prefilled(m, seqs), args.steps))
        print(f"round {i + 1}: alone {one[-1] * 1e3:.1f} ms/token, {args.rows} rows {many[-1] * 1e3:.1f} ms/step", flush=True)
    t1, tn = statistics.median(one), statistics.median(many)
    parts = kernel_times(m, batch, seqs, args.steps)
    matmuls = sum(t for role, t in parts.items() if role.startswith(("ternary GEMM", "output layer")))
    print(f"\n{cpu_model()}; {args.output_layer} output layer; medians of {args.rounds} interleaved rounds; prompt {len(PROMPT)} tokens\n")
    print(f"one sequence: {t1 * 1e3:.1f} ms/token ({1 / t1:.1f} tok/s)")
    print(f"{args.rows} sequences: {tn * 1e3:.1f} ms/step ({args.rows / tn:.1f} tok/s): {args.rows * t1 / tn:.2f}x one sequence\n")
    print(f"| kernel (one {args.rows}-row step) | ms |\n|---|---|")
    for role, t in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {role} | {t * 1e3:.2f} |")
    print(f"\nmatmuls alone: {matmuls * 1e3:.1f} ms: at most {args.rows * t1 / matmuls:.2f}x one sequence with every other kernel free")


if __name__ == "__main__":
    main()
