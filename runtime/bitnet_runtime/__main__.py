"""Device-side command line, no compiler needed:

bitnet-runtime verify DIR [--threads N] [--seed S]
bitnet-runtime run -a DIR -m MODEL -p PROMPT [...]
bitnet-runtime chat -a DIR -m MODEL [...]
bitnet-runtime serve -a DIR -m MODEL [--host H] [--port P] [...]
"""

from __future__ import annotations

import argparse
import sys

from . import cli_text
from .errors import exit_status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bitnet-runtime", description="bitnet-compile device runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    verify_cmd = sub.add_parser("verify", help="check every kernel of an artifact against its numpy reference")
    verify_cmd.add_argument("artifact", help="artifact directory (holds manifest.json)")
    verify_cmd.add_argument("-t", "--threads", type=int, default=None, help="kernel threads (default: all cores)")
    verify_cmd.add_argument("--seed", type=int, default=0, help="random inputs seed (default 0)")
    for name in cli_text.COMMANDS:
        cli_text.add_command(sub, name, artifact_required=True)
    args = parser.parse_args(argv)
    if args.command == "verify":
        return exit_status(lambda: run_verify(args.artifact, args.threads, args.seed))
    return exit_status(lambda: cli_text.HANDLERS[args.command](args, args.artifact))


def run_verify(artifact_dir: str, threads: int | None, seed: int) -> int:
    from . import services
    from .artifact import Artifact
    from .verify import verify

    if threads is not None:
        services.set_num_threads(threads)
    artifact = Artifact(artifact_dir)
    target = artifact.manifest.target
    print(f"verifying {len(artifact.kernel_names)} kernels of {artifact_dir} ({target.get('mcpu')}, {target.get('isa')})")
    return 0 if verify(artifact, seed) else 1


if __name__ == "__main__":
    sys.exit(main())
