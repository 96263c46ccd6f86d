"""A kernel's test case: its arguments in kernel order (weights in the kernel's layout), the
array it writes, and the check of that array against the numpy reference. Every operator
makes one (``Operator.make_case``); the tuner and the tests check candidates with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class Case:
    """One kernel invocation with known-right output: ``args`` in kernel order, ``weights``
    the index of the argument that streams (the one copied for DRAM timing), ``output`` the
    array the kernel writes (poisoned before each check), ``check`` what differs (None: right)."""

    args: tuple
    weights: int
    output: np.ndarray
    check: Callable[[], str | None]

    def poison(self) -> None:
        self.output[...] = np.nan if self.output.dtype.kind == "f" else -1


def exact(got: Callable[[], np.ndarray], want: np.ndarray) -> Callable[[], str | None]:
    """A check that ``got()`` equals ``want`` bit for bit, saying how far off it is when not."""

    def check() -> str | None:
        have = got()
        if np.array_equal(have, want, equal_nan=want.dtype.kind == "f"):  # NaN where NaN is wanted
            return None
        wrong = have != want
        diff = np.abs(have.astype(np.float64) - want.astype(np.float64))  # exact for every int32 and float32
        worst = "nan" if np.isnan(diff).any() else f"{diff.max():g}"
        return f"{int(wrong.sum())} of {want.size} outputs differ from the reference (max |difference| {worst})"

    return check


def exact_product(q: np.ndarray, w: np.ndarray) -> np.ndarray:
    """int32 q @ w.T through float64 BLAS: exact while sums stay below 2**53, and fast enough
    for 128-token GEMM checks that an integer matmul in numpy is not."""
    return (q.astype(np.float64) @ w.T.astype(np.float64)).astype(np.int32)


def within(got: Callable[[], np.ndarray], want: np.ndarray, bound: np.ndarray | float, what: str) -> Callable[[], str | None]:
    """A check that ``got()`` is within ``bound`` (elementwise, or one number) of ``want``: for
    float kernels whose multiply-adds LLVM fuses (one rounding where numpy rounds twice)."""

    def check() -> str | None:
        excess = np.abs(got().astype(np.float64) - want) - bound
        if not np.any(excess > 0) and not np.isnan(excess).any():
            return None
        return f"{what}: {int(np.sum(~(excess <= 0)))} of {want.size} outputs off by more than the bound"

    return check
