"""Schedule knobs as data. ``schedules/defaults.json`` holds, per kernel and vector ISA, the
knobs used where no tuning record matches, and the kernel families in order of preference;
``schedules/records/*.json`` (tuning/records.py) hold tuned knobs per target fingerprint,
kernel, layout, shape and thread count, and win where they match.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import UserError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .target import TargetSpec

SCHEDULES_DIR = Path(__file__).resolve().parent.parent / "schedules"


@cache
def _defaults() -> dict:
    path = SCHEDULES_DIR / "defaults.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read schedule defaults {path}: {err}") from None


def family_preference(isa: str) -> list[str]:
    """The kernel families ``auto`` tries for an ISA variant, in order (first runnable wins)."""
    return list(_defaults()["families"].get(isa, []))


def default_knobs(op: str, isa: str) -> dict:
    try:
        return dict(_defaults()[op][isa])
    except KeyError:
        raise UserError(f"no schedule defaults for kernel {op!r} on ISA {isa!r} in {SCHEDULES_DIR}/defaults.json") from None


def knobs_for(op: str, target: "TargetSpec", n: int, k: int, accept: Callable[[dict], bool] | None = None) -> tuple[dict, str]:
    """Knobs for one kernel of an (n, k) layer on ``target`` at its core count, and where they
    came from (for the manifest and the compile log): the matching tuning record's best that
    ``accept`` allows, else the defaults."""
    from .tuning import records, templates

    template = templates.TEMPLATES.get(op)
    if template is not None:
        found = records.lookup(target, op, template.version, template.layout, n, k, target.num_cores, accept or (lambda _: True))
        if found:
            return found
    return default_knobs(op, target.isa), "default"


def fingerprint(target: "TargetSpec") -> str:
    """Changes whenever any knob the target's kernels could get does (defaults, or its tuning
    records): part of cached artifacts' keys."""
    from .tuning import records

    tuned = b"".join(p.read_bytes() for p in records.paths_for(target) if p.is_file())
    return hashlib.sha256(json.dumps(_defaults(), sort_keys=True).encode() + tuned).hexdigest()[:16]
