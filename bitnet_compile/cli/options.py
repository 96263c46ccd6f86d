"""Options several commands share, defined once so their defaults cannot drift apart."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_TARGET = "llvm -mcpu=native"


def thread_counts(text: str) -> tuple[int, ...]:
    """``-t 1,2``: argparse type for the thread counts bench-kernels and tune measure at."""
    try:
        counts = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected thread counts like 1,2, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {text!r}")
    return counts


def add_records(p: argparse.ArgumentParser) -> None:
    """``--records``: main() exports it to every lookup of tuned knobs, here and in workers."""
    p.add_argument("--records", type=Path, default=None, help="tuning records directory (default: schedules/records, or $BITNET_RECORDS)")


def add_target(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET, help=help)


def add_family(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("-f", "--family", default="auto", help=help)


def add_model_or_shapes(p: argparse.ArgumentParser, model_help: str, shapes_help: str, default_model: str | None = None) -> None:
    """``-m/--model`` or ``-s/--shapes``, which ``models.resolve_request`` turns into linears;
    one of them is required unless the model has a default."""
    what = p.add_mutually_exclusive_group(required=default_model is None)
    what.add_argument("-m", "--model", default=default_model, help=model_help)
    what.add_argument("-s", "--shapes", help=shapes_help)


def add_compile_for(p: argparse.ArgumentParser) -> None:
    """What run, chat and bench compile for when no ``--artifact`` is given."""
    add_target(p, "target to compile for when no --artifact is given (default: this CPU)")
    add_family(p, "kernel family when compiling (default: auto)")


def artifact_for(args: argparse.Namespace) -> Path:
    """The given artifact, or one compiled for this model and target (cached). A preset
    alias (2b-4t, large) means its hub id: running needs the weights, not just the shapes."""
    from ..models import ALIASES

    if not Path(args.model).exists():
        args.model = ALIASES.get(args.model.lower(), args.model)
    if args.artifact:
        return args.artifact
    from ..model_artifact import for_model
    from ..target import parse_target

    return for_model(args.model, parse_target(args.target), args.family)
