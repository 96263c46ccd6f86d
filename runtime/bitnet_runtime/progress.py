"""Progress bars for long work (compiling, converting weights): shown when a person watches
stderr, plain iteration in logs, CI and tests."""

from __future__ import annotations

import sys
from collections.abc import Iterable


def progress(items: Iterable, desc: str, unit: str) -> Iterable:
    if not sys.stderr.isatty():
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, leave=False)
