"""The tunable kernels ("templates"): for each manifest operator with schedule knobs, its
search space, how its shape is padded under given knobs, how a test case is made, how it is
timed and its version.

Every built-in kernel is timed with its weights streaming from DRAM, GEMMs included: in a
model each layer's weights are cold when its turn comes. Timed in cache, the 2B-4T gate|up
GEMM picked row_blocks 4 / token_tile 3, which made whole-model prompts slower and is slower
than the default from DRAM (version 2 of the GEMM templates times from DRAM).

Everything here points into the operator modules (``ops/*.py``), which hold the knob spaces
and cases beside the compute, schedule and reference; this table only says which of them the
tuner may touch. A researcher's own template is one ``register`` call in a module passed to
``bitnet-compile tune --plugin``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..errors import UserError
from .measure import Case
from .space import SearchSpace

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..target import TargetSpec

GEMM_TOKENS = 128  # prompt length a GEMM is tuned for (the runtime's prefill chunks are this long)


@dataclass(frozen=True)
class Template:
    """op: the manifest operator; version: bump it when the schedule changes, so old records
    stop matching; layout: the weight layout it reads; timing: "dram" or "cache"; tokens:
    activation rows per call; isas: vector ISAs it has a variant for; context: constants the
    constraints may use (e.g. the ISA's rows per block); shape: (n, k, knobs, target) ->
    (manifest shape, knobs as built); case: (shape, knobs, rng, tokens) -> Case; build:
    (name, shape, knobs, target) -> PrimFunc; case_knobs: the knobs the case depends on beyond
    the shape (a case is reused across trials that agree on them: making a 128256-row
    vocabulary's weights and reference costs seconds)."""

    op: str
    version: str
    layout: str
    timing: str
    tokens: int
    isas: frozenset[str]
    space: SearchSpace
    context: Callable[["TargetSpec"], dict]
    shape: Callable[[int, int, dict, "TargetSpec"], tuple[dict, dict]]
    case: Callable[[dict, dict, np.random.Generator, int], Case]
    build: Callable[[str, dict, dict, "TargetSpec"], object]
    case_knobs: tuple[str, ...] = ()

    def names(self, n: int, k: int, target: "TargetSpec", threads: int) -> dict:
        """What the constraints see: the layer shape, the thread count, the target's constants."""
        return {"n": n, "k": k, "threads": threads, **self.context(target)}


TEMPLATES: dict[str, Template] = {}


def register(template: Template) -> Template:
    TEMPLATES[template.op] = template
    return template


def get(op: str) -> Template:
    try:
        return TEMPLATES[op]
    except KeyError:
        raise UserError(f"no tunable kernel {op!r}; tunable: {', '.join(TEMPLATES)}") from None


def _builder(op: str) -> Callable:
    def build(name: str, shape: dict, knobs: dict, target: "TargetSpec"):
        from ..artifact import KernelPlan

        return KernelPlan(name, op, shape, knobs).primfunc(target.isa)

    return build


def _register_builtin() -> None:
    from ..ops import dot2_matmul, f16_gemv, i8_gemv, lut_matmul
    from ..intrinsics.lut_shuffle import VECTOR_ISAS

    from bitnet_runtime import layout, layout_dot2, layout_f16, layout_i8

    cpus = frozenset({"avx2", "avx512", "neon"})  # every CPU ISA variant the kernels have
    lut_context = lambda t: {"rows": VECTOR_ISAS[t.isa].rows}  # noqa: E731
    no_context = lambda t: {}  # noqa: E731
    for op, gemv in (("lut_gemv", True), ("lut_gemm", False)):
        register(Template(
            op, f"{op}-{1 if gemv else 2}", layout.VERSION, "dram", 1 if gemv else GEMM_TOKENS, cpus,
            lut_matmul.SPACE, lut_context, lambda n, k, kn, t: lut_matmul.kernel_shape(n, k, kn, t.isa),
            lut_matmul.make_case, _builder(op), case_knobs=("kblock",),
        ))  # fmt: skip
    for op, gemv in (("dot2_gemv", True), ("dot2_gemm", False)):
        register(Template(
            op, f"{op}-{1 if gemv else 2}", layout_dot2.VERSION, "dram", 1 if gemv else GEMM_TOKENS,
            frozenset({"avx512", "neon"}), dot2_matmul.GEMV_SPACE if gemv else dot2_matmul.GEMM_SPACE, no_context,
            (lambda g: lambda n, k, kn, t: dot2_matmul.kernel_shape(n, k, kn, g))(gemv), dot2_matmul.make_case, _builder(op),
            case_knobs=() if gemv else ("token_tile",),
        ))  # fmt: skip
    register(Template(
        "f16_gemv", "f16_gemv-1", layout_f16.VERSION, "dram", 1, cpus, f16_gemv.SPACE, no_context,
        lambda n, k, kn, t: f16_gemv.kernel_shape(n, k, kn), f16_gemv.make_case, _builder("f16_gemv"),
    ))  # fmt: skip
    register(Template(
        "i8_gemv", "i8_gemv-1", layout_i8.VERSION, "dram", 1, cpus, i8_gemv.SPACE, no_context,
        lambda n, k, kn, t: i8_gemv.kernel_shape(n, k, kn, i8_gemv.variant_for(t.isa, t.features)), i8_gemv.make_case,
        _builder("i8_gemv"),
    ))  # fmt: skip


_register_builtin()
