"""``bitnet-compile run``, ``chat`` and ``serve``: the runtime's commands (``bitnet_runtime.cli_text``),
plus what to compile for when no artifact is given."""

from __future__ import annotations

import argparse

from . import options


def add(sub) -> None:
    from bitnet_runtime import cli_text

    for name in cli_text.COMMANDS:
        options.add_compile_for(cli_text.add_command(sub, name, artifact_required=False))


def run(args: argparse.Namespace) -> int:
    from bitnet_runtime import cli_text

    return cli_text.HANDLERS[args.command](args, options.artifact_for(args))
