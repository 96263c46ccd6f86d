"""The ``bitnet-compile`` command.

    bitnet-compile [--target T] (--model M | --shapes NxK,...) [-o DIR]   compile an artifact
    bitnet-compile verify DIR [-t N]                                    check it against numpy
    bitnet-compile run -m M -p PROMPT [-a DIR]                          generate text
    bitnet-compile chat -m M [-a DIR]                                   interactive chat
    bitnet-compile bench -m M [-a DIR]                                  end-to-end tokens/s
    bitnet-compile bench-kernels [--target T] [--model M]               kernel benchmark
    bitnet-compile dummy PRESET -o DIR                                  dummy model for benchmarks
    bitnet-compile tune [--target T] (--model M | --shapes NxK,...)     autotune kernel schedules
    bitnet-compile schedules list|show|compare|plot|source|space        study the tuning records
    bitnet-compile targets [-v]                                         every target and its status here

User mistakes print one ``error:`` line and exit with status 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from .errors import UserError

SUBCOMMANDS = ("compile", "verify", "run", "chat", "bench", "bench-kernels", "dummy", "tune", "schedules", "targets")
DEFAULT_TARGET = "llvm -mcpu=native"
VERIFY_HINTS = {
    "llvm": "verify on the device with: python -m bitnet_runtime verify {out}",
    "foreign": "verify here under qemu with: bitnet-compile verify {out}; on the device with: python -m bitnet_runtime verify {out}",
    "cuda": "verify on a machine with an NVIDIA GPU with: python -m bitnet_runtime verify {out}",
    "metal": "Metal source in {out}: build and run it on macOS as README 'Metal' describes",
}


def _add_compile(sub) -> None:
    p = sub.add_parser("compile", help="compile the kernels a model needs into an artifact (the default command)")
    p.add_argument("--target", default=DEFAULT_TARGET, help=f'TVM target string, JSON, or preset name (default: "{DEFAULT_TARGET}")')
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("-m", "--model", help="model preset (2b-4t, large, or a hub id), a config.json, or a directory holding one")
    what.add_argument("-s", "--shapes", help="linear shapes as NxK[,NxK...] (out x in features)")
    p.add_argument("-o", "--output", type=Path, default=None, help="artifact directory (default: artifacts/<model>-<family>-<isa>)")
    p.add_argument("-f", "--family", default="auto", help="kernel family: auto (default: dot2 where AVX-512 VNNI exists, gpu2 on GPUs, else lut), lut, dot2, gpu2")
    _add_records_option(p)


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="run every kernel of an artifact against its numpy reference")
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("-t", "--threads", type=int, default=None, help="kernel threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)


def _add_model_target(p) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET, help="target to compile for when no --artifact is given (default: this CPU)")
    p.add_argument("-f", "--family", default="auto", help="kernel family when compiling (default: auto)")


def _add_text(sub) -> None:
    """``run`` and ``chat``: the runtime's commands, plus what to compile for when no artifact is given."""
    from bitnet_runtime import cli_text

    for name in cli_text.COMMANDS:
        _add_model_target(cli_text.add_command(sub, name, artifact_required=False))


def _add_model_bench(sub) -> None:
    from .model_bench import add_options

    p = sub.add_parser("bench", help="end-to-end decode and prompt tokens/s of a model at 1 and 2 threads")
    add_options(p)
    _add_model_target(p)


def _add_dummy(sub) -> None:
    from .dummy_models import PRESETS, preset_table

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


def _add_bench(sub) -> None:
    p = sub.add_parser("bench-kernels", help="benchmark the kernel families against a plain int8 TVM kernel")
    p.add_argument("--target", default=DEFAULT_TARGET)
    what = p.add_mutually_exclusive_group()
    what.add_argument("-m", "--model", default="2b-4t", help="model whose linear shapes to time (default: 2b-4t)")
    what.add_argument("-s", "--shapes", help="time these NxK shapes instead of a model's")
    p.add_argument("-t", "--threads", type=_thread_counts, default=(1, 2), help="thread counts to measure, e.g. 1,2 (default)")
    p.add_argument("--stream-mib", type=int, default=None, help="MiB of weight copies a DRAM measurement rotates over (default: 2x the L3)")
    p.add_argument("--tokens", type=int, default=128, help="tokens for the GEMM (prompt) figures (default 128)")
    p.add_argument("--repeat", type=int, default=15, help="timed repetitions; medians are reported (default 15)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")


def _thread_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected thread counts like 1,2, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {text!r}")
    return counts


def _add_tune(sub) -> None:
    from .tuning.command import add_options

    p = sub.add_parser("tune", help="autotune the kernels' schedule knobs (optuna), writing records compile picks up")
    add_options(p)
    _add_records_option(p)


def _add_schedules(sub) -> None:
    from .tuning.views import add_commands

    p = sub.add_parser("schedules", help="research views of the tuning records: list, show, compare, plot, source, space")
    add_commands(p, _add_records_option)


def _add_records_option(p) -> None:
    p.add_argument("--records", type=Path, default=None, help="tuning records directory (default: schedules/records, or $BITNET_RECORDS)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitnet-compile", description="Compile ternary (BitNet b1.58) kernels with TVM, and run models on them.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_compile(sub)
    _add_verify(sub)
    _add_text(sub)
    _add_model_bench(sub)
    _add_bench(sub)
    _add_dummy(sub)
    _add_tune(sub)
    _add_schedules(sub)
    targets = sub.add_parser("targets", help="list every target with its kernel features, status on this machine, and tuning records")
    targets.add_argument("-v", "--verbose", action="store_true", help="also print each target's description")
    return p


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text.split("/")[-1]).strip("-") or "model"


def run_compile(args: argparse.Namespace) -> int:
    from . import artifact, models, schedule_db
    from .families import choose
    from .target import parse_target

    target = parse_target(args.target)
    family = choose(target, args.family, schedule_db.family_preference(target.isa))
    if args.model:
        shape = models.resolve(args.model)
        linears, label = shape.linears(), shape.name
    else:
        linears, label = models.parse_shapes(args.shapes), "shapes"
    out = args.output or Path("artifacts") / f"{_slug(label)}-{family.name}-{target.isa}"
    shapes = ", ".join(f"{lin.name} {lin.n}x{lin.k}" for lin in linears)
    print(f"target {target.mcpu} ({target.triple}, {target.isa}, {target.num_cores} cores); kernel family {family.name} ({family.summary})", file=sys.stderr)
    print(f"linears: {shapes}", file=sys.stderr)
    output_layer = (shape.vocab, shape.hidden) if args.model else None
    manifest = artifact.build(target, linears, out, family, model_name=label if args.model else None, output_layer=output_layer)
    for path in sorted(out.iterdir()):
        if path.is_file():
            print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    from .cross import is_foreign

    hint = "foreign" if target.kind == "llvm" and is_foreign(target.arch) else target.kind
    print(VERIFY_HINTS[hint].format(out=out), file=sys.stderr)
    return 0 if manifest.is_file() else 1


def run_verify(args: argparse.Namespace) -> int:
    """On the device's architecture the runtime's verify; for another one (an arm-neon
    artifact on an x86 workstation) the same checks with the kernels run under qemu."""
    from bitnet_runtime.__main__ import run_verify as verify_artifact
    from bitnet_runtime.manifest import read_manifest

    from . import cross

    manifest = read_manifest(Path(args.artifact))
    target = manifest.target
    if manifest.device or not cross.is_foreign(target.get("arch", "")):  # GPU artifacts: the runtime says where they run
        return verify_artifact(args.artifact, args.threads, args.seed)
    from bitnet_runtime.verify import verify

    from .emulation import EmulatedArtifact

    with EmulatedArtifact(args.artifact, args.threads or 1) as emulated:
        print(f"verifying {len(emulated.kernel_names)} kernels of {args.artifact} ({target['arch']}, {target.get('isa')}) under qemu emulation")
        return 0 if verify(emulated, args.seed) else 1


def run_bench(args: argparse.Namespace) -> int:
    from .bench import run

    return run(args)


def _artifact_for(args: argparse.Namespace) -> Path:
    """The given artifact, or one compiled for this model and target (cached). A preset
    alias (2b-4t, large) means its hub id: running needs the weights, not just the shapes."""
    from .models import ALIASES

    if not Path(args.model).exists():
        args.model = ALIASES.get(args.model.lower(), args.model)
    if args.artifact:
        return args.artifact
    from .model_artifact import for_model
    from .target import parse_target

    return for_model(args.model, parse_target(args.target), args.family)


def run_text(args: argparse.Namespace) -> int:
    from bitnet_runtime import cli_text

    return cli_text.run(args, _artifact_for(args))


def run_chat(args: argparse.Namespace) -> int:
    from bitnet_runtime import cli_text

    return cli_text.chat(args, _artifact_for(args))


def run_model_bench(args: argparse.Namespace) -> int:
    from .model_bench import run

    return run(args, _artifact_for(args))


def run_tune(args: argparse.Namespace) -> int:
    from .tuning.command import run

    return run(args)


def run_schedules(args: argparse.Namespace) -> int:
    from .tuning.views import run

    return run(args)


def run_targets(args: argparse.Namespace) -> int:
    from .target_table import run

    return run(args.verbose)


def run_dummy(args: argparse.Namespace) -> int:
    from .dummy_models import write_dummy_model

    out = write_dummy_model(args.preset, args.output, seed=args.seed, layers=args.layers)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        parser().print_help(sys.stderr)
        return 2
    if argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "compile")
    args = parser().parse_args(argv)
    if getattr(args, "records", None):  # read by every lookup of tuned knobs, in this process and its workers
        from .tuning.records import RECORDS_ENV

        os.environ[RECORDS_ENV] = str(args.records.resolve())
    try:
        commands = {"compile": run_compile, "verify": run_verify, "run": run_text, "chat": run_chat, "bench": run_model_bench, "bench-kernels": run_bench, "dummy": run_dummy,
                    "tune": run_tune, "schedules": run_schedules, "targets": run_targets}
        return commands[args.command](args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
