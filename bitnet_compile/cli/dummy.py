"""``bitnet-compile dummy``: a dummy BitNet checkpoint (random ternary weights) for benchmarks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add(sub) -> None:
    from ..dummy_models import PRESETS, preset_table

    p = sub.add_parser(
        "dummy",
        help="write a dummy BitNet checkpoint (random ternary weights, 2B-4T format) for benchmarks",
        epilog="presets:\n" + preset_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("preset", help=f"model shape: {', '.join(PRESETS)}")
    p.add_argument("-o", "--output", type=Path, required=True, help="model directory to write")
    p.add_argument("--layers", type=int, default=None, help="keep only this many layers (a short version of a big preset)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from ..dummy_models import write_dummy_model

    out = write_dummy_model(args.preset, args.output, seed=args.seed, layers=args.layers)
    print(f"wrote {out}", file=sys.stderr)
    return 0
