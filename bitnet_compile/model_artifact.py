"""The artifact a model needs, compiled on first use and kept in the cache.

``bitnet-compile run/chat/bench -m MODEL`` without ``--artifact`` come here; a cached artifact
is found without importing TVM (seconds saved on every start), and a changed model shape,
target, family, schedule knob or compiler version compiles a new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

from bitnet_runtime.manifest import FORMAT_VERSION, MANIFEST_FILE
from bitnet_runtime.weights import cache_root

from . import __version__, models, schedule_db
from .families import choose
from .target import TargetSpec


def for_model(model: str, target: TargetSpec, family_name: str = "auto", echo=lambda line: print(line, file=sys.stderr)) -> Path:
    """The artifact a model needs on ``target``, compiled once into the cache (keyed by the
    model's shapes, the target, the family, the schedule knobs and the compiler's version)."""
    request = models.resolve_request(model)
    vocab, hidden = request.output_layer
    family = choose(target, family_name, schedule_db.family_preference(target.isa))
    linear_shapes = [(lin.name, lin.n, lin.k) for lin in request.linears]
    decoder = request.decoder and dataclasses.asdict(request.decoder)
    ident = [
        __version__,
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
