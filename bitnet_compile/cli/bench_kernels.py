"""``bitnet-compile bench-kernels``: the kernel families against a plain int8 TVM kernel
(``bitnet_compile.bench``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import options


def add(sub) -> None:
    p = sub.add_parser("bench-kernels", help="benchmark the kernel families against a plain int8 TVM kernel")
    options.add_target(p)
    options.add_model_or_shapes(
        p, "model whose linear shapes to time (default: 2b-4t)", "time these NxK shapes instead of a model's", default_model="2b-4t"
    )
    p.add_argument("-t", "--threads", type=options.thread_counts, default=(1, 2), help="thread counts to measure, e.g. 1,2 (default)")
    p.add_argument("--stream-mib", type=int, default=None, help="MiB of weight copies a DRAM measurement rotates over (default: 2x the L3)")
    p.add_argument("--tokens", type=int, default=128, help="tokens for the GEMM (prompt) figures (default 128)")
    p.add_argument("--repeat", type=int, default=15, help="timed repetitions; medians are reported (default 15)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    from ..bench import run as bench_kernels

    return bench_kernels(args)
