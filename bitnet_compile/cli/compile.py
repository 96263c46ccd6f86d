"""``bitnet-compile [compile]``: the kernels a model (or a list of shapes) needs, as an artifact."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from . import options

VERIFY_HINTS = {
    "llvm": "verify on the device with: bitnet-runtime verify {out}",
    "foreign": "verify here under qemu with: bitnet-compile verify {out}; on the device with: bitnet-runtime verify {out}",
    "cuda": "verify on a machine with an NVIDIA GPU with: bitnet-runtime verify {out}",
    "metal": "Metal source in {out}: build and run it on macOS as docs/targets.md 'Metal' describes",
}


def add(sub) -> None:
    p = sub.add_parser("compile", help="compile the kernels a model needs into an artifact (the default command)")
    options.add_target(p, f'TVM target string, JSON, or preset name (default: "{options.DEFAULT_TARGET}")')
    options.add_model_or_shapes(
        p,
        "model preset (2b-4t, large, or a hub id), a config.json, or a directory holding one",
        "linear shapes as NxK[,NxK...] (out x in features)",
    )
    p.add_argument("-o", "--output", type=Path, default=None, help="artifact directory (default: artifacts/<model>-<family>-<isa>)")
    options.add_family(p, "kernel family: auto (default: dot2 where AVX-512 VNNI exists, gpu2 on GPUs, else lut), lut, dot2, gpu2")
    options.add_records(p)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text.split("/")[-1]).strip("-") or "model"


def run(args: argparse.Namespace) -> int:
    from .. import artifact, models, schedule_db
    from ..cross import is_foreign
    from ..families import choose
    from ..target import parse_target

    target = parse_target(args.target)
    family = choose(target, args.family, schedule_db.family_preference(target.isa))
    request = models.resolve_request(args.model, args.shapes)
    out = args.output or Path("artifacts") / f"{_slug(request.name or 'shapes')}-{family.name}-{target.isa}"
    shapes = ", ".join(f"{lin.name} {lin.n}x{lin.k}" for lin in request.linears)
    print(
        f"target {target.mcpu} ({target.triple}, {target.isa}, {target.num_cores} cores); kernel family {family.name} ({family.summary})",
        file=sys.stderr,
    )
    print(f"linears: {shapes}", file=sys.stderr)
    manifest = artifact.build(
        target, request.linears, out, family, model_name=request.name, output_layer=request.output_layer, decoder=request.decoder
    )
    for path in sorted(out.iterdir()):
        if path.is_file():
            print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    hint = "foreign" if target.kind == "llvm" and is_foreign(target.arch) else target.kind
    print(VERIFY_HINTS[hint].format(out=out), file=sys.stderr)
    return 0 if manifest.is_file() else 1
