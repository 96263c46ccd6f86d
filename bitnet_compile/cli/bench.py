"""``bitnet-compile bench``: a model's end-to-end decode and prompt tokens/s (``model_bench``)."""

from __future__ import annotations

import argparse

from . import options


def add(sub) -> None:
    from ..model_bench import add_options

    p = sub.add_parser("bench", help="end-to-end decode and prompt tokens/s of a model at 1 and 2 threads")
    add_options(p)
    options.add_compile_for(p)


def run(args: argparse.Namespace) -> int:
    from ..model_bench import run as bench_model

    return bench_model(args, options.artifact_for(args))
