"""``bitnet-compile targets``: every target preset, its kernel features and its status here."""

from __future__ import annotations

import argparse


def add(sub) -> None:
    p = sub.add_parser("targets", help="list every target with its kernel features, status on this machine, and tuning records")
    p.add_argument("-v", "--verbose", action="store_true", help="also print each target's description")


def run(args: argparse.Namespace) -> int:
    from ..target_table import run as list_targets

    return list_targets(args.verbose)
