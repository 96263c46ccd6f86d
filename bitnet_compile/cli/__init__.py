"""The ``bitnet-compile`` command.

    bitnet-compile [--target T] (--model M | --shapes NxK,...) [-o DIR]   compile an artifact
    bitnet-compile verify DIR [-t N]                                    check it against numpy
    bitnet-compile run -m M -p PROMPT [-a DIR]                          generate text
    bitnet-compile chat -m M [-a DIR]                                   interactive chat
    bitnet-compile serve -m M [-a DIR] [--host H] [--port P]            OpenAI-compatible server
    bitnet-compile bench -m M [-a DIR]                                  end-to-end tokens/s
    bitnet-compile bench-kernels [--target T] [--model M]               kernel benchmark
    bitnet-compile dummy PRESET -o DIR                                  dummy model for benchmarks
    bitnet-compile tune [--target T] (--model M | --shapes NxK,...)     autotune kernel schedules
    bitnet-compile schedules list|show|compare|plot|source|space        study the tuning records
    bitnet-compile targets [-v]                                         every target and its status here

One module per command, each with ``add(subparsers)`` and ``run(args) -> int``; ``COMMANDS``
names them, so a new command is a module and a line there. Every parser is built before any
command runs, so a module imports what its command needs inside ``run`` (``--help`` must not
load TVM). Options several commands share are in ``options``.

User mistakes print one ``error:`` line and exit with status 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import os
import sys
from types import ModuleType

from bitnet_runtime.errors import exit_status

from . import bench, bench_kernels, compile, dummy, schedules, targets, text, tune, verify

# Subcommand -> its module, in --help order; "run", "chat" and "serve" share one module (and one add()).
COMMANDS: dict[str, ModuleType] = {
    "compile": compile,
    "verify": verify,
    "run": text,
    "chat": text,
    "serve": text,
    "bench": bench,
    "bench-kernels": bench_kernels,
    "dummy": dummy,
    "tune": tune,
    "schedules": schedules,
    "targets": targets,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bitnet-compile", description="Compile ternary (BitNet b1.58) kernels with TVM, and run models on them."
    )
    sub = p.add_subparsers(dest="command", required=True)
    for module in dict.fromkeys(COMMANDS.values()):
        module.add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        parser().print_help(sys.stderr)
        return 2
    if argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "compile")
    args = parser().parse_args(argv)
    if getattr(args, "records", None):  # read by every lookup of tuned knobs, in this process and its workers
        from ..records import RECORDS_ENV

        os.environ[RECORDS_ENV] = str(args.records.resolve())
    return exit_status(lambda: COMMANDS[args.command].run(args))
