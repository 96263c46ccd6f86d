"""How a kernel is timed the way it will run, and what this machine is (its CPU's name and
last-level cache): shared by the tuner and the kernel benchmark.

- DRAM timing (decode GEMVs): each call gets the next of enough copies of the weights to
  exceed twice the last-level cache, so every call streams its weights from memory as a
  model's layers do, and the caches hold only clean lines (flushing by writing a buffer would
  leave dirty lines whose write-back the kernel would pay for). Weights already larger than
  that are simply called back to back.
- Cache timing (prompt GEMMs, whose weights are reused across token tiles): back-to-back calls
  on one copy, each repeat at least WARM_MS long.
Medians of the repeats are what the tuner and the benchmark compare.
"""

from __future__ import annotations

import time

WARM_MS = 20  # minimum length of one in-cache repeat
MIN_STREAM_BYTES = 64 << 20
MAX_STREAM_BYTES = 2 << 30  # memory the DRAM rotation may take for its weight copies


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo), part of a tuning record's target fingerprint."""
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def l3_bytes() -> int | None:
    """Largest level-3 cache size sysfs reports for cpu0, or None where there is none."""
    from pathlib import Path

    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "level").read_text().strip() != "3":
                continue
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes) if sizes else None


def stream_bytes(l3: int | None = None) -> int:
    """Bytes a DRAM measurement rotates through: twice the L3, so no weight is still cached
    when its copy comes round again."""
    l3 = l3_bytes() if l3 is None else l3
    return min(max(2 * (l3 or 0), MIN_STREAM_BYTES), MAX_STREAM_BYTES)


def weight_rotation(args: tuple, weights: int, total_bytes: int) -> list[tuple]:
    """Argument tuples cycling over enough aligned copies of ``args[weights]`` to fill ``total_bytes``."""
    from bitnet_runtime.memory import aligned_copy

    copies = max(1, -(-total_bytes // args[weights].nbytes))
    if copies == 1:
        return [args]
    return [(*args[:weights], aligned_copy(args[weights]), *args[weights + 1 :]) for _ in range(copies)]


def time_streamed(function, rotation: list[tuple], repeats: int) -> list[float]:
    """Seconds per call, each sample one pass over the rotation."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for call_args in rotation:
            function(*call_args)
        samples.append((time.perf_counter() - start) / len(rotation))
    return samples


def time_cached(module, name: str, args: tuple, repeats: int, device=None) -> list[float]:
    """Seconds per call of back-to-back calls (TVM's time_evaluator: its own loop in C++)."""
    import tvm

    timer = module.time_evaluator(name, device or tvm.cpu(), number=1, repeat=repeats, min_repeat_ms=WARM_MS)
    return list(timer(*args).results)
