"""A kernel that only reads memory: the machine's DRAM read bandwidth, measured the way the
matmul kernels read their weights (same compiler, same thread pool, same cache flushing).

GEMV from DRAM (decoding one token) can go no faster than reading the weights at this rate,
so the benchmark reports each kernel's weight bytes per second against it.

out[c, l] = sum over i of buf[c, i, l] in uint32 (wrapping): chunks c in parallel, each a
contiguous stream; LANES independent vector accumulators per chunk so the adds never limit the
loads. ``reference`` is the same sum in numpy.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te

LANES = 64  # uint32 accumulators per chunk: 4 zmm (8 ymm) registers
CHUNKS = 64  # parallel tasks: even shares for 1, 2, 4, 8... threads


def shape_for(nbytes: int, chunks: int = CHUNKS) -> tuple[int, int, int]:
    """(chunks, steps, LANES) of a uint32 buffer of at most ``nbytes`` (at least one step)."""
    steps = max(1, nbytes // (chunks * LANES * 4))
    return chunks, steps, LANES


def reference(buf: np.ndarray) -> np.ndarray:
    return buf.sum(axis=1, dtype=np.uint32)


def compute(chunks: int, steps: int) -> tuple[te.Tensor, te.Tensor]:
    buf = te.placeholder((chunks, steps, LANES), "uint32", name="buf")
    i = te.reduce_axis((0, steps), "i")
    out = te.compute((chunks, LANES), lambda c, l: te.sum(buf[c, i, l], axis=i), name="out")
    return buf, out


def schedule(func: tvm.tirx.PrimFunc) -> tvm.s_tir.Schedule:
    """Chunks in parallel; per chunk the stream in order, the LANES sums in vector registers."""
    sch = tvm.s_tir.Schedule(func)
    out = sch.get_sblock("out")
    c, lane, i = sch.get_loops(out)
    sch.parallel(c)
    acc = sch.cache_write(out, 0, "local")
    sch.reverse_compute_at(acc, c)
    sch.reorder(i, lane)
    sch.vectorize(lane)
    sch.decompose_reduction(out, i)
    sch.vectorize(sch.get_loops(acc)[-1])
    return sch


def build_primfunc(name: str, chunks: int, steps: int) -> tvm.tirx.PrimFunc:
    sch = schedule(te.create_prim_func(list(compute(chunks, steps))))
    return sch.mod["main"].with_attr("global_symbol", name)
