"""The one interface every kernel has, whatever it computes.

An operator module (``ops/<name>.py``) holds a kernel whole: its knobs and their search space,
its TE compute definition, its schedules per target, its numpy reference and how to make a
test case. It exposes them as ``Operator`` values in ``OPERATORS``; ``registry.py`` lists the
modules. The compiler plans and builds kernels through this interface only, and the tuner
searches the operators whose space has knobs, so neither has a table of its own per op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError
from .case import Case
from .space import SearchSpace

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..target import TargetSpec

KernelShape = Callable[[int, int, dict, "TargetSpec"], tuple[dict, dict]]
MakeCase = Callable[[dict, dict, np.random.Generator, int], Case]
Build = Callable[[str, dict, dict, "TargetSpec"], Any]
CPU_ISAS = frozenset({"avx2", "avx512", "neon"})  # every CPU ISA variant the kernels have
GPU_ISAS = frozenset({"cuda", "metal"})
FIXED = SearchSpace(knobs={})  # a kernel without schedule knobs
GEMM_TOKENS = 128  # prompt length a GEMM is tuned and checked for (the runtime's prefill chunks are this long)


def no_context(target: TargetSpec) -> dict:
    return {}


def unplanned(op: str) -> KernelShape:
    """The ``kernel_shape`` of a decode-step kernel: its shape is the model's (heads, head
    size, ffn), which ``program.plan_kernels`` gives it, not an [n, k] linear's."""

    def kernel_shape(n: int, k: int, knobs: dict, target: TargetSpec) -> tuple[dict, dict]:
        raise UserError(f"{op} is a kernel of the compiled decode step: program.plan_kernels plans it, not a linear layer")

    return kernel_shape


@dataclass(frozen=True)
class Operator:
    """A kernel the compiler can plan, build, check and (when ``space`` has knobs) tune.

    op: its name in the manifest. version: bump it when the schedule changes, so old tuning
    records stop matching. layout: the weight layout it reads (None: no weights). isas: the
    ISA variants it has schedules for. kernel_shape(n, k, knobs, target) -> (manifest shape,
    knobs as built): the padded shape of an [n, k] layer. make_case(shape, knobs, rng, tokens)
    -> Case: inputs and the check against ``reference``. build(name, shape, knobs, target) ->
    the scheduled PrimFunc. timing ("dram" or "cache") and tokens: how the tuner times it;
    context(target): constants its constraints may use; case_knobs: the knobs its case depends
    on beyond the shape (a case is reused across trials that agree on them: making a
    128256-row vocabulary's weights costs seconds). launch(shape, knobs): a GPU kernel's grid.
    """

    op: str
    version: str
    layout: str | None
    isas: frozenset[str]
    space: SearchSpace
    kernel_shape: KernelShape
    make_case: MakeCase
    build: Build
    reference: Callable[..., Any]
    timing: str = "dram"
    tokens: int = 1
    context: Callable[[TargetSpec], dict] = no_context
    case_knobs: tuple[str, ...] = ()
    launch: Callable[[dict, dict], dict] | None = None

    @property
    def tunable(self) -> bool:
        return bool(self.space.knobs)

    def names(self, n: int, k: int, target: TargetSpec, threads: int) -> dict:
        """What the constraints see: the layer shape, the thread count, the target's constants."""
        return {"n": n, "k": k, "threads": threads, **self.context(target)}


def knobs_of(cls: type, knobs: dict) -> Any:
    """``knobs`` as the knob dataclass ``cls``, every field given: defaults live in
    schedules/defaults.json only, so a missing or unknown knob is an error here, not a
    silent second default."""
    names = {f.name for f in fields(cls)}
    missing, unknown = sorted(names - set(knobs)), sorted(set(knobs) - names)
    if missing or unknown:
        problems = [f"{what} {', '.join(names)}" for what, names in (("missing", missing), ("unknown", unknown)) if names]
        raise UserError(f"knobs {knobs} for {cls.__name__}: {'; '.join(problems)}")
    return cls(**knobs)
