"""Kernel families: the ways a ternary linear layer can be computed, each with its weight
layout and what the target must have. Which one a target gets is data (``families`` in
schedules/defaults.json, per ISA variant, first available wins) or the user's choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .errors import UserError
from .target import TargetSpec


@dataclass(frozen=True)
class Family:
    name: str
    layout: str
    variants: Mapping[str, frozenset[str]]  # ISA variant it has kernels for -> LLVM features those need beyond it
    summary: str

    @property
    def isas(self) -> frozenset[str]:
        return frozenset(self.variants)

    def missing(self, target: TargetSpec) -> list[str]:
        """What the target lacks for this family (empty: available)."""
        if target.isa not in self.variants:
            return [f"an {'/'.join(sorted(self.isas))} kernel variant (target is {target.isa})"]
        return sorted(self.variants[target.isa] - target.features)


FAMILIES = {
    "lut": Family(
        "lut",
        "lut4-v1",
        {"avx2": frozenset(), "avx512": frozenset(), "neon": frozenset()},
        "table lookup with vpshufb (AVX2 ymm, AVX-512 zmm) or tbl (NEON)",
    ),
    "dot2": Family(
        "dot2",
        "dot2-v1",
        {"avx512": frozenset({"avx512vnni"}), "neon": frozenset({"dotprod"})},
        "2-bit weights with VNNI vpdpbusd (AVX-512) or sdot (NEON)",
    ),
    "gpu2": Family(
        "gpu2",
        "dot2-v1",
        {"cuda": frozenset(), "metal": frozenset()},
        "2-bit weights decoded in registers, __dp4a on CUDA, int32 byte products on Metal",
    ),
}


def choose(target: TargetSpec, requested: str, preference: list[str]) -> Family:
    """The requested family, or with "auto" the first preferred one the target can run."""
    if requested == "auto":
        for name in preference:
            if not FAMILIES[name].missing(target):
                return FAMILIES[name]
        raise UserError(f"no kernel family runs on {target.mcpu} ({target.isa}); families: {', '.join(FAMILIES)}")
    if requested not in FAMILIES:
        raise UserError(f"unknown kernel family {requested!r}; choose auto, {', '.join(FAMILIES)}")
    family = FAMILIES[requested]
    lacks = family.missing(target)
    if lacks:
        raise UserError(f"kernel family {family.name} needs {', '.join(lacks)}, which target {target.mcpu} lacks")
    return family
