"""Tuning records: the best knobs and the whole trial history of every study, one JSON file
per target fingerprint in ``schedules/records/``, read by the compiler and the research views.

A target fingerprint is what makes a measured schedule transferable: the CPU model (when the
kernels run on this machine; "remote" for a device measured over RPC), LLVM's cpu and triple,
the ISA extensions the code is compiled with, and the core count. Within a file a record is
keyed by kernel (operator and template version), weight layout, layer shape and thread count:
``dot2_gemv/dot2_gemv-1/dot2-v1/2560x2560/t2``. A changed schedule bumps the template version,
so stale records stop matching instead of misleading.

Several tuners may write one file (several shapes, or one study from several processes):
updates are read-modify-write under an exclusive lock, and land by atomic rename, so a killed
tuner never leaves a torn file.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from .data import SCHEDULES_DIR
from .errors import UserError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .target import TargetSpec

FORMAT_VERSION = 1
RECORDS_ENV = "BITNET_RECORDS"  # overrides the records directory (tests, private record sets)


def records_dir(override: Path | None = None) -> Path:
    return override or Path(os.environ.get(RECORDS_ENV) or SCHEDULES_DIR / "records")


@lru_cache(maxsize=1)
def _host_identity() -> tuple[str, str, frozenset[str]]:
    from .target import parse_target

    host = parse_target("native")
    return host.triple, host.mcpu, host.features


def runs_here(target: TargetSpec) -> bool:
    """Whether code for ``target`` is code for this very CPU (so its model name applies)."""
    return (target.triple, target.mcpu, target.features) == _host_identity()


def fingerprint(target: TargetSpec, remote: bool = False) -> dict:
    from .measure import cpu_model

    cpu = "remote" if remote else (cpu_model() if runs_here(target) else "any")
    return {"cpu": cpu, "mcpu": target.mcpu, "triple": target.triple, "features": target.required_features, "cores": target.num_cores}


def target_key(print_: dict) -> str:
    """A file name that a reader recognizes and that changes with any part of the fingerprint."""
    digest = hashlib.sha256(json.dumps(print_, sort_keys=True).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9]+', '-', print_['mcpu'])}-{print_['cores']}c-{digest}"


def record_key(op: str, version: str, layout: str, n: int, k: int, threads: int) -> str:
    return f"{op}/{version}/{layout}/{n}x{k}/t{threads}"


def path_for(print_: dict, directory: Path | None = None) -> Path:
    return records_dir(directory) / f"{target_key(print_)}.json"


def paths_for(target: TargetSpec, directory: Path | None = None) -> list[Path]:
    """The records files that apply to ``target``, preferred first: measured here, then (for
    another machine's target, e.g. arm-neon tuned on the device over RPC) measured remotely."""
    paths = [path_for(fingerprint(target), directory)]
    if not runs_here(target):
        paths.append(path_for(fingerprint(target, remote=True), directory))
    return paths


def read(path: Path) -> dict:
    """A records file (an empty one where none exists yet)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"format_version": FORMAT_VERSION, "target": None, "records": {}}
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read tuning records {path}: {err}") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        version = data.get("format_version") if isinstance(data, dict) else None
        raise UserError(f"tuning records {path} have format {version}, this compiler reads {FORMAT_VERSION}")
    records = data.get("records")
    if not isinstance(records, dict) or not all(isinstance(r, dict) for r in records.values()):
        raise UserError(
            f"tuning records {path} are damaged: 'records' must map keys to objects (re-run bitnet-compile tune, or delete the file)"
        )
    return data


def all_files(directory: Path | None = None) -> list[Path]:
    return sorted(records_dir(directory).glob("*.json"))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".lock", "w") as lock:  # one per directory; hidden, never committed
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def update(path: Path, print_: dict, key: str, record: dict) -> bool:
    """Replace one record of a file, atomically and under the file's lock; False (nothing
    written) where the new record found no working candidate and the old one had a best."""
    with _locked(path):
        data = read(path)
        old = data["records"].get(key)
        if not record.get("best") and isinstance(old, dict) and old.get("best"):
            return False
        data["target"] = print_
        data["records"][key] = record | {"updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        data["records"] = dict(sorted(data["records"].items()))
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
        return True


MIN_GAIN = 0.02  # a candidate must beat the default by 2% in the confirmation to replace it


def beats(candidate: dict, default: dict) -> bool:
    """Faster than the default in all interleaved confirmation rounds but at most one (one
    noise spike of a shared machine must not veto a real gain; with 5 rounds a chance 4:1 is
    a 1-in-5 event, and the median must gain MIN_GAIN too)."""
    rounds = list(zip(candidate.get("rounds", []), default.get("rounds", [])))
    wins = sum(c < d for c, d in rounds)
    return len(rounds) >= 3 and wins >= len(rounds) - 1 and candidate["seconds"] <= default["seconds"] * (1 - MIN_GAIN)


def compatible_best(record: dict, accept: Callable[[dict], bool]) -> dict | None:
    """The knobs to use when the record's best is not allowed: among the confirmed candidates
    ``accept`` allows, one that beats the default as the best had to, else the default, else
    (no confirmation or default allowed) the fastest allowed trial."""
    default = next((c for c in record.get("confirmed", []) if c["knobs"] == record["default"]["knobs"]), None)
    allowed = sorted((c for c in record.get("confirmed", []) if accept(c["knobs"])), key=lambda c: c["seconds"])
    for candidate in allowed:
        if default is not None and candidate is not default and beats(candidate, default):
            return candidate["knobs"]
    if accept(record["default"]["knobs"]):
        return record["default"]["knobs"]
    trials = sorted((t for t in record["trials"] if t["state"] == "complete" and accept(t["knobs"])), key=lambda t: t["seconds"])
    return trials[0]["knobs"] if trials else None


def lookup(
    target: TargetSpec,
    op: str,
    version: str,
    layout: str,
    n: int,
    k: int,
    threads: int,
    accept: Callable[[dict], bool] = lambda knobs: True,
    directory: Path | None = None,
) -> tuple[dict, str] | None:
    """The record's best knobs that ``accept`` allows (e.g. sharing the GEMV's padding), and a
    description of where they came from; None without a matching record."""  # fmt: skip
    key = record_key(op, version, layout, n, k, threads)
    found = next(((p, r) for p in paths_for(target, directory) if p.is_file() and (r := read(p)["records"].get(key))), None)
    if found is None:
        return None
    path, record = found
    try:
        best = record.get("best")
        if best and accept(best["knobs"]):
            return dict(best["knobs"]), f"tuned ({path.name}, {float(record.get('speedup', 1)):.2f}x over default)"
        knobs = compatible_best(record, accept)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(
            f"tuning record {key} in {path} is damaged ({type(err).__name__}: {err}): re-run bitnet-compile tune, or delete it"
        ) from None
    if knobs is None:
        return None
    return dict(knobs), f"tuned ({path.name}, best compatible of {record['measured']} trials)"
