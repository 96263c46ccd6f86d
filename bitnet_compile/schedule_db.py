"""Schedule knobs as data. ``schedules/defaults.json`` holds, per kernel and vector ISA, the
knobs used where no tuning record matches (the only place a knob has a default: the knob
dataclasses in ops/ have none), and the kernel families in order of preference;
``schedules/records/*.json`` (records.py) hold tuned knobs per target fingerprint, kernel,
layout, shape and thread count, and win where they match (plan.knobs_for). Why the defaults
are what they are: docs/tuning.md.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from typing import TYPE_CHECKING

from . import records
from .data import SCHEDULES_DIR
from .errors import UserError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .target import TargetSpec

DEFAULTS_FILE = SCHEDULES_DIR / "defaults.json"


@cache
def _defaults() -> dict:
    try:
        return json.loads(DEFAULTS_FILE.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read schedule defaults {DEFAULTS_FILE}: {err}") from None


def family_preference(isa: str) -> list[str]:
    """The kernel families ``auto`` tries for an ISA variant, in order (first runnable wins)."""
    return list(_defaults()["families"].get(isa, []))


def default_knobs(op: str, isa: str) -> dict:
    try:
        return dict(_defaults()["knobs"][op][isa])
    except KeyError:
        raise UserError(f"no schedule defaults for kernel {op!r} on ISA {isa!r} in {DEFAULTS_FILE}") from None


def fingerprint(target: TargetSpec) -> str:
    """Changes whenever any knob the target's kernels could get does (defaults, or its tuning
    records): part of cached artifacts' keys."""
    tuned = b"".join(p.read_bytes() for p in records.paths_for(target) if p.is_file())
    return hashlib.sha256(json.dumps(_defaults(), sort_keys=True).encode() + tuned).hexdigest()[:16]
