"""The artifact a model needs, compiled on first use and kept in the cache.

``bitnet-compile run/chat/bench -m MODEL`` without ``--artifact`` come here; a cached artifact
is found without importing TVM (seconds saved on every start), and a changed model shape,
target, family, schedule knob or compiler (its version and the content of its code) compiles
a new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import bitnet_runtime
from bitnet_runtime.manifest import FORMAT_VERSION, MANIFEST_FILE
from bitnet_runtime.weights import cache_root

from . import __version__, models, schedule_db
from .families import choose
from .target import TargetSpec


def code_fingerprint() -> str:
    """A hash of the compiler's and the runtime's source files: a kernel whose code changed
    (a development checkout, an upgrade that kept the version number) is compiled again, not
    taken from the cache. A few milliseconds; no TVM import."""
    digest = hashlib.sha256()
    for package in (Path(__file__).parent, Path(bitnet_runtime.__file__).parent):
        for path in sorted(p for p in package.rglob("*") if p.suffix in (".py", ".c") and "__pycache__" not in p.parts):
            digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def for_model(model: str, target: TargetSpec, family_name: str = "auto", echo=lambda line: print(line, file=sys.stderr)) -> Path:
    """The artifact a model needs on ``target``, compiled once into the cache (keyed by the
    model's shapes, the target, the family, the schedule knobs and the compiler's code)."""
    request = models.resolve_request(model)
    vocab, hidden = request.output_layer
    family = choose(target, family_name, schedule_db.family_preference(target.isa))
    linear_shapes = [(lin.name, lin.n, lin.k) for lin in request.linears]
    decoder = request.decoder and dataclasses.asdict(request.decoder)
    ident = [
        __version__,
        code_fingerprint(),
        FORMAT_VERSION,
        linear_shapes,
        vocab,
        hidden,
        decoder,
        target.to_json(),
        family.name,
        schedule_db.fingerprint(target),
    ]
    key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    out = cache_root() / "artifacts" / f"{hidden}h-{vocab}v-{family.name}-{target.isa}-{key}"
    if (out / MANIFEST_FILE).is_file():
        echo(f"using artifact {out}")
        return out
    echo(f"compiling the kernels of {request.name} for {target.mcpu} ({target.isa}, {family.name}) into {out} (once)")
    from .artifact import build  # imports TVM: only when there is something to compile

    build(
        target,
        request.linears,
        out,
        family,
        model_name=request.name,
        output_layer=request.output_layer,
        decoder=request.decoder,
        if_missing=True,
    )
    return out
