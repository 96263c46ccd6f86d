"""Where the compiler's data lives: ``schedules/`` (knob defaults and tuning records) and
``targets/`` (target presets). In a source checkout they are the repository's top-level
directories; a wheel carries them inside the package (pyproject.toml maps them there), so an
installed compiler finds them the same way.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """The packaged copy of a data directory where there is one, else the checkout's."""
    packaged = _PACKAGE / name
    return packaged if packaged.is_dir() else _PACKAGE.parent / name


SCHEDULES_DIR = data_dir("schedules")
TARGETS_DIR = data_dir("targets")
