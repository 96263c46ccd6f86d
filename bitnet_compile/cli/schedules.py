"""``bitnet-compile schedules``: its views' options; the views themselves are ``tuning.views``."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import options


def add(sub) -> None:
    p = sub.add_parser("schedules", help="research views of the tuning records: list, show, compare, plot, source, space")
    views = p.add_subparsers(dest="view", required=True)
    for name, text in (("list", "every tuning record"), ("compare", "tuned vs default per kernel and shape")):
        q = views.add_parser(name, help=text)
        q.add_argument("--target-key", default=None, help="only records of this target (a records file name without .json)")
        options.add_records(q)
    q = views.add_parser("show", help="one record's trials and best knobs")
    q.add_argument("key", help="record key or a unique part of it")
    options.add_records(q)
    q = views.add_parser("plot", help="PNG of a record's tuning curve")
    q.add_argument("key")
    q.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
    options.add_records(q)
    q = views.add_parser("source", help="generated code of a record's knobs")
    q.add_argument("key")
    q.add_argument("--form", choices=("tir", "ll", "asm"), default="asm", help="TVM script (tir), LLVM IR (ll) or assembly (asm, default)")
    q.add_argument("--default", action="store_true", help="the default knobs instead of the best")
    options.add_records(q)
    q = views.add_parser("space", help="a kernel's search space")
    q.add_argument("kernel", nargs="?", default=None, help="kernel (default: all)")
    q.add_argument("--shape", default="2560x2560", help="NxK the constraints are evaluated for (default 2560x2560)")
    q.add_argument("--threads", type=int, default=2)
    options.add_target(q)


def run(args: argparse.Namespace) -> int:
    from ..tuning.views import run as show

    return show(args)
