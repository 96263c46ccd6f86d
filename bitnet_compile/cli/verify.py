"""``bitnet-compile verify``: every kernel of an artifact against its numpy reference."""

from __future__ import annotations

import argparse
from pathlib import Path


def add(sub) -> None:
    p = sub.add_parser("verify", help="run every kernel of an artifact against its numpy reference")
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("-t", "--threads", type=int, default=None, help="kernel threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    """On the device's architecture the runtime's verify; for another one (an arm-neon
    artifact on an x86 workstation) the same checks with the kernels run under qemu."""
    from bitnet_runtime.__main__ import run_verify as verify_artifact
    from bitnet_runtime.manifest import read_manifest

    from .. import cross

    manifest = read_manifest(Path(args.artifact))
    target = manifest.target
    if manifest.device or not cross.is_foreign(target.get("arch", "")):  # GPU artifacts: the runtime says where they run
        return verify_artifact(args.artifact, args.threads, args.seed)
    from bitnet_runtime.verify import verify

    from ..emulation import EmulatedArtifact

    with EmulatedArtifact(args.artifact, args.threads or 1) as emulated:
        print(
            f"verifying {len(emulated.kernel_names)} kernels of {args.artifact} ({target['arch']}, {target.get('isa')}) under qemu emulation"
        )
        return 0 if verify(emulated, args.seed) else 1
