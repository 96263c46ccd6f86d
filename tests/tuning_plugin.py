"""Toy operators for the tuner's tests, loaded with ``--plugin tuning_plugin``: a doubling
kernel whose ``flaw`` knob makes a candidate wrong, crash its worker, hang, or fail to
compile, and a slow grid for resuming and sharing studies."""

from __future__ import annotations

import ctypes
import time

import numpy as np
import tvm
from tvm import te

from bitnet_compile.ops import registry
from bitnet_compile.ops.case import Case, exact
from bitnet_compile.ops.operator import Operator
from bitnet_compile.ops.space import Constraint, SearchSpace


def _shape(n: int, k: int, knobs: dict, target) -> tuple[dict, dict]:
    return {"n": n, "k": k}, knobs


def _case(shape: dict, knobs: dict, rng: np.random.Generator, tokens: int) -> Case:
    a = rng.integers(-1000, 1000, shape["n"] * shape["k"], dtype=np.int32)
    out = np.zeros_like(a)
    return Case((a, out), 0, out, exact(lambda: out, _reference(a)))


def _build(name: str, shape: dict, knobs: dict, target):
    flaw = knobs.get("flaw", "none")
    if flaw == "crash":
        ctypes.string_at(0)  # a segmentation fault in the worker process
    if flaw == "hang":
        time.sleep(3600)
    if flaw == "compile":
        raise ValueError("this schedule cannot be built")
    time.sleep(knobs.get("delay", 0.0))
    size = shape["n"] * shape["k"]
    a = te.placeholder((size,), "int32", name="a")
    b = te.compute((size,), lambda i: a[i] * (3 if flaw == "wrong" else 2), name="b")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b]))
    outer, inner = sch.split(sch.get_loops(sch.get_sblock("b"))[0], [None, knobs["split"]])
    sch.parallel(outer)
    return sch.mod["main"].with_attr("global_symbol", name)


def _reference(a: np.ndarray) -> np.ndarray:
    return a * 2


def _template(op: str, space: SearchSpace) -> Operator:
    x86 = frozenset({"avx2", "avx512"})
    return Operator(op, f"{op}-1", "toy-v1", x86, space, _shape, _case, _build, _reference, timing="cache")


registry.register(_template("toy_flaws", SearchSpace(
    knobs={"split": (1, 2, 4), "flaw": ("none", "wrong", "crash", "hang", "compile")},
    constraints=(Constraint("flaw == 'none' or split == 1", "one flawed candidate of each kind is enough"),),
)))  # fmt: skip
registry.register(_template("toy_grid", SearchSpace(knobs={"split": (1, 2, 4, 8), "delay": (0.3, 0.31, 0.32)})))
registry.register(_template("toy_broken", SearchSpace(knobs={"split": (1, 2), "flaw": ("compile",)})))  # every candidate fails
