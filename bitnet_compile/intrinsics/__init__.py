"""Tensor intrinsics: hand-picked instruction sequences TVM substitutes into scheduled loops.

An intrinsic is declared by name with a function that parses its TVMScript description and
implementation; ``registered(name)`` parses and registers it the first time a schedule
tensorizes with it. Parsing at import time cost a compile seconds: TVMScript's decorator reads
the source of every frame on the stack, and for each import-machinery frame (which has none)
``inspect`` scans every loaded module. Parsed on demand, from a plain call stack, it is cheap,
and a compile parses only its own ISA's intrinsics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tvm.tirx import PrimFunc

_BUILDERS: dict[str, Callable[[], tuple[PrimFunc, PrimFunc]]] = {}


def declare(name: str, build: Callable[[], tuple[PrimFunc, PrimFunc]]) -> str:
    """Name a tensor intrinsic whose (description, implementation) ``build`` parses on demand."""
    _BUILDERS[name] = build
    return name


@functools.cache
def registered(name: str) -> str:
    """``name``, registered with TVM (parsed on the first call in this process)."""
    from tvm.s_tir import TensorIntrin

    desc, impl = _BUILDERS[name]()
    TensorIntrin.register(name, desc, impl, override=True)
    return name
