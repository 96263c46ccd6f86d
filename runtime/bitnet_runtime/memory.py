"""64-byte aligned buffers. Tensorized kernels use aligned vector loads and TVM does not check
alignment at the call, so an ordinary numpy array (16-byte aligned) would crash them: every
array that reaches a kernel comes from here.
"""

from __future__ import annotations

import mmap

import numpy as np

ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    offset = (-raw.ctypes.data) % ALIGNMENT
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def aligned_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    out = aligned_empty(shape, dtype)
    out[...] = 0
    return out


def lazy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Zeros in an anonymous memory map (page-aligned), whose pages the OS maps only when first
    written: a KV cache for the whole context allocated at load costs memory only as positions
    fill. Small pages are asked for explicitly, since numpy would have a large array use 2 MB
    pages, and a head-major cache touches every head's region at the first position (measured:
    +0.5 GB peak on the 2B-4T shape)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    # private: MADV_DONTNEED then gives the pages back (a shared anonymous map would keep them)
    buffer = mmap.mmap(-1, max(count * dtype.itemsize, 1), flags=mmap.MAP_PRIVATE)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buffer, dtype, count).reshape(shape)


def release_pages(array: np.ndarray) -> None:
    """Drop the whole pages under a contiguous view of a ``lazy_zeros`` array (they read as
    zeros again and cost no memory until written): a finished sequence's slot of a KV pool,
    kept for the next one. A page the view shares with its neighbours keeps its contents."""
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "obj", None) if isinstance(base, memoryview) else getattr(base, "base", None)
    if base is None or not hasattr(mmap, "MADV_DONTNEED") or not array.flags.c_contiguous:
        return
    offset = array.ctypes.data - np.frombuffer(base, np.uint8).ctypes.data
    start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (offset + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        base.madvise(mmap.MADV_DONTNEED, start, end - start)


def aligned_copy(array: np.ndarray, dtype=None) -> np.ndarray:
    out = aligned_empty(array.shape, dtype or array.dtype)
    out[...] = array
    return out


def is_aligned(array: np.ndarray) -> bool:
    return array.flags.c_contiguous and array.ctypes.data % ALIGNMENT == 0
