"""Schedule knobs as data: ``schedules/*.json`` holds, per kernel and vector ISA, the knob
values the compiler uses, and the kernel families in order of preference. Only defaults exist
yet; tuned per-shape records come with the tuner.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path

from .errors import UserError

SCHEDULES_DIR = Path(__file__).resolve().parent.parent / "schedules"


@cache
def _defaults() -> dict:
    path = SCHEDULES_DIR / "defaults.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read schedule defaults {path}: {err}") from None


def family_preference() -> list[str]:
    return list(_defaults()["families"])


def knobs_for(op: str, isa: str) -> tuple[dict, str]:
    """Knob values for a kernel on an ISA, and where they came from (for the manifest)."""
    try:
        return dict(_defaults()[op][isa]), "default"
    except KeyError:
        raise UserError(f"no schedule defaults for kernel {op!r} on ISA {isa!r} in {SCHEDULES_DIR}/defaults.json") from None


def fingerprint() -> str:
    """Changes whenever any knob value does: part of cached artifacts' keys."""
    return hashlib.sha256(json.dumps(_defaults(), sort_keys=True).encode()).hexdigest()[:16]
