"""``bitnet-compile tune``: its options; what it tunes and how is ``tuning.command``."""

from __future__ import annotations

import argparse

from . import options


def add(sub) -> None:
    from ..tuning.command import DEFAULT_BUDGET_S, DEFAULT_TIMEOUT_S, DEFAULT_TRIALS

    p = sub.add_parser("tune", help="autotune the kernels' schedule knobs (optuna), writing records compile picks up")
    options.add_target(p, f'target to tune for (default: "{options.DEFAULT_TARGET}")')
    options.add_model_or_shapes(
        p,
        "tune every kernel this model needs (preset, hub id, config.json or model dir)",
        "tune these NxK linear shapes (out x in features)",
    )
    p.add_argument(
        "-k",
        "--kernels",
        default=None,
        help="only these kernels, e.g. dot2_gemv,f16_gemv (default: the family's and, with --model, the output layer's)",
    )
    options.add_family(p, "kernel family whose kernels to tune (default: auto, as compile picks)")
    p.add_argument(
        "-n",
        "--trials",
        type=int,
        default=DEFAULT_TRIALS,
        help=f"measured trials per kernel and shape (default {DEFAULT_TRIALS}); a resumed study counts its earlier ones",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"seconds for the whole command, shared out over the studies (default {DEFAULT_BUDGET_S})",
    )
    p.add_argument(
        "-t",
        "--threads",
        type=options.thread_counts,
        default=None,
        help="thread counts to tune for, e.g. 1,2 (default: the target's cores)",
    )
    p.add_argument(
        "--storage", default=None, help="optuna storage: sqlite:///FILE, postgresql://..., journal:FILE (default: SQLite in the cache)"
    )
    p.add_argument("--rpc", default=None, help="measure on a device: HOST:PORT of its TVM RPC server (or of a tracker with --rpc-key)")
    p.add_argument("--rpc-key", default=None, help="device key to request from the tracker at --rpc")
    p.add_argument(
        "--trial-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds one candidate may take to compile, check and time (default {DEFAULT_TIMEOUT_S})",
    )
    p.add_argument(
        "--plugin", action="append", default=[], help="import this module first (it may register extra kernel templates); repeatable"
    )
    options.add_records(p)


def run(args: argparse.Namespace) -> int:
    from ..tuning.command import run as tune

    return tune(args)
