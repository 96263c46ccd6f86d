"""The tuner: one optuna study per (target fingerprint, kernel, shape, thread count).

Each trial asks optuna's TPE sampler for a point of the kernel's search space and then:
- a point breaking a constraint is told PRUNED ("invalid", with the constraint) and never
  compiled; a point already measured is told its known result ("duplicate"); neither counts
  as a trial of ``--trials``, both teach the sampler;
- any other point is measured in the worker (compile, exact check, timing) and told its
  median seconds, or FAIL with the reason (compile error, wrong result, crash, timeout).
The default knobs are the first trial, so every record knows what it beats (measured even on a
shape where a constraint would prune them: they are what compile uses without a record).

Resumable: every trial is committed to the optuna storage as it finishes (SQLite by
default, transactional, so ``kill -9`` loses at most the trial being measured), and the same
command continues the same studies: a trial left RUNNING by a dead process on this host is
marked FAIL ("interrupted") and its point measured again. Several processes (or machines,
with a shared ``--storage``) may work on one study at once; each counts the trials all of
them have measured.

When a study has its trials, the fastest few and the default are timed again together in
CONFIRM_ROUNDS interleaved rounds (the "confirmation"). The record's best is the fastest of
them only if it beats the default in all rounds but at most one and by records.MIN_GAIN
overall (records.beats); otherwise the default stays. On a shared machine whose speed drifts over seconds (one study here saw the
same kernel's time rise by more than half), a lucky sample or a slow spell must not make a tuned
artifact slower than the default one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import records
from ..errors import UserError
from ..ops.operator import Operator

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..target import TargetSpec
    from .rpc import Remote
    from .worker import Worker

CONFIRM_TOP = 3  # fastest distinct points timed again with the default
TRIAL_REPEATS, TRIAL_ROUNDS = 9, 1
CONFIRM_REPEATS, CONFIRM_ROUNDS = 7, 5
STARTUP_TRIALS = 4  # random points (after the default) before TPE models the space
STUCK_ASKS = 16  # consecutive invalid/duplicate points after which an unmeasured one is enqueued
SEED = 0
STUDY_FORMAT = 2  # in study names: how knobs are encoded as optuna parameters (Codec); old studies stay apart


@dataclass(frozen=True)
class StudySpec:
    """What one study tunes, and where it measures."""

    template: Operator
    n: int
    k: int
    threads: int
    target: TargetSpec
    remote: Remote | None = None

    @property
    def fingerprint(self) -> dict:
        return records.fingerprint(self.target, remote=self.remote is not None)

    @property
    def key(self) -> str:
        t = self.template
        return records.record_key(t.op, t.version, t.layout, self.n, self.k, self.threads)

    @property
    def name(self) -> str:
        return f"tuner{STUDY_FORMAT}/{records.target_key(self.fingerprint)}/{self.key}"

    @property
    def names(self) -> dict:
        return self.template.names(self.n, self.k, self.target, self.threads)

    def label(self) -> str:
        return f"{self.template.op} {self.n}x{self.k} t{self.threads}"


# ----------------------------------------------------------------------------- storage


def default_storage_url() -> str:
    from bitnet_runtime.weights import cache_root

    path = cache_root() / "tuning" / "studies.sqlite3"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def open_storage(url: str | None):
    """An optuna storage for ``--storage``: an RDB URL (sqlite:///FILE, postgresql://...,
    mysql://...) or a journal file (journal:FILE, or a path ending in .log / .journal)."""
    import optuna

    url = url or default_storage_url()
    try:
        if url.startswith("journal:") or url.endswith((".log", ".journal")):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            path = Path(url.removeprefix("journal:")).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        if "://" not in url:
            raise UserError(f"--storage {url!r}: expected sqlite:///FILE, postgresql://..., mysql://..., or journal:FILE")
        if url.startswith("sqlite") and url.split("://", 1)[1].lstrip("/") in ("", ":memory:"):
            raise UserError(
                f"--storage {url} is an in-memory database: the study would be lost when tuning ends; give a file, sqlite:///FILE"
            )
        kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except ImportError:
        drivers = "psycopg2-binary for PostgreSQL, PyMySQL for MySQL"
        raise UserError(f"--storage {url}: the database driver is not installed (pip install it: {drivers})") from None
    except (OSError, ValueError) as err:
        raise UserError(f"--storage {url}: {err}") from None
    except Exception as err:  # sqlalchemy's connection errors
        if type(err).__module__.startswith("sqlalchemy"):
            raise UserError(f"--storage {url}: {str(err).splitlines()[0]}") from None
        raise


# ----------------------------------------------------------------------------- one study


class Codec:
    """Knob values <-> optuna parameters. Integer knobs (row blocks, unroll factors, tiles)
    are ordinal: optuna sees the index into the domain as an integer, so TPE's density model
    knows that 3 row blocks lie between 2 and 4 (as categories it learns nothing about a
    value it has not tried). Other knobs (booleans, names) are categorical."""

    def __init__(self, template: Operator):
        self.knobs = template.space.knobs
        self.ordinal = {name for name, values in self.knobs.items() if all(type(v) is int for v in values)}

    def distributions(self) -> dict:
        from optuna.distributions import CategoricalDistribution, IntDistribution

        return {
            name: IntDistribution(0, len(values) - 1) if name in self.ordinal else CategoricalDistribution(list(values))
            for name, values in self.knobs.items()
        }

    def encode(self, knobs: dict) -> dict:
        return {name: self.knobs[name].index(v) if name in self.ordinal else v for name, v in knobs.items()}

    def decode(self, params: dict) -> dict:
        return {name: self.knobs[name][v] if name in self.ordinal else v for name, v in params.items()}


def _alive_here(trial) -> bool:
    """Whether a RUNNING trial's process still exists (only knowable for this host's)."""
    if trial.user_attrs.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(trial.user_attrs.get("pid", 0)), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return int(trial.user_attrs.get("pid", 0)) > 0


def _recover_interrupted(study, storage) -> int:
    """Fail the trials a killed process left RUNNING and measure their points again."""
    from optuna.trial import TrialState

    lost = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if not _alive_here(t)]
    for t in lost:
        storage.set_trial_user_attr(t._trial_id, "state", "interrupted")
        storage.set_trial_user_attr(t._trial_id, "reason", f"process {t.user_attrs.get('pid')} ended before the trial did")
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, skip_if_exists=False)  # already in optuna's encoding
    return len(lost)


class Study:
    """One kernel/shape/threads study in a storage, and its measurement."""

    def __init__(self, spec: StudySpec, storage, default: dict, records_dir: Path | None = None, seed: int = SEED):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        self.spec, self.storage, self.records_dir = spec, storage, records_dir
        self.codec = Codec(spec.template)
        self.default = {name: default[name] for name in spec.template.space.knobs}
        problems = spec.template.space.outside_domains(self.default)
        if problems:
            raise UserError(f"the default knobs of {spec.label()} are outside its search space: {'; '.join(problems)}")
        self.points = list(spec.template.space.points(spec.names))
        self.kernels = {self.kernel_key(p) for p in self.points}
        seed = int(hashlib.sha256(spec.name.encode()).hexdigest()[:6], 16) + seed
        self.study = optuna.create_study(
            study_name=spec.name, storage=storage, direction="minimize", load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=STARTUP_TRIALS, multivariate=True),
        )  # fmt: skip
        self.recovered = _recover_interrupted(self.study, storage)
        if not self.study.get_trials(deepcopy=False):
            self.study.enqueue_trial(self.codec.encode(self.default))
        self.rng = random.Random(seed + len(self.study.get_trials(deepcopy=False)))

    def kernel_key(self, point: dict) -> str:
        """Identity of the kernel a point builds: points the shape clamps alike (a k-block
        longer than K) are one kernel, measured once."""
        _, built = self.spec.template.kernel_shape(self.spec.n, self.spec.k, point, self.spec.target)
        return json.dumps(built, sort_keys=True)

    # -- state read back from the storage (other processes may be adding to it) --

    def trials(self) -> list:
        return self.study.get_trials(deepcopy=False)

    def measured(self) -> dict[str, object]:
        """Kernel key -> the first finished trial that measured it."""
        seen: dict[str, object] = {}
        for t in self.trials():
            if t.user_attrs.get("measured") and t.state.is_finished() and t.user_attrs.get("state") != "interrupted":
                seen.setdefault(self.kernel_key(self.knobs(t)), t)
        return seen

    def knobs(self, trial) -> dict:
        return self.codec.decode(trial.params)

    def measured_count(self) -> int:
        return sum(1 for t in self.trials() if t.user_attrs.get("measured") and t.user_attrs.get("state") != "interrupted")

    def best(self):
        from optuna.trial import TrialState

        done = [t for t in self.trials() if t.state == TrialState.COMPLETE and t.user_attrs.get("measured")]
        return min(done, key=lambda t: t.value) if done else None

    def default_trial(self):
        t = self.measured().get(self.kernel_key(self.default))
        return t if t is not None and t.value is not None else None

    # -- one step --

    def _job(self, candidates: list[dict], repeats: int, rounds: int) -> dict:
        from ..measure import stream_bytes

        spec = self.spec
        return {
            "op": spec.template.op, "n": spec.n, "k": spec.k, "candidates": candidates, "target": spec.target.to_json(),
            "threads": spec.threads, "seed": SEED, "repeats": repeats, "rounds": rounds, "stream_bytes": stream_bytes(), "timing": spec.template.timing,
            "rpc": spec.remote.to_json() if spec.remote else None,
        }  # fmt: skip

    def step(self, worker: Worker, timeout: float) -> bool:
        """Ask for one point and settle it; True when it was measured (counts as a trial)."""
        from optuna.trial import TrialState

        trial = self.study.ask(self.codec.distributions())
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        point = self.codec.decode(trial.params)
        problems = self.spec.template.space.violations(point, self.spec.names)
        if problems and point != self.default:  # the default is measured even where a constraint prunes it: compile uses it
            trial.set_user_attr("state", "invalid")
            trial.set_user_attr("reason", "; ".join(problems))
            self.study.tell(trial, state=TrialState.PRUNED)
            return False
        known = self.measured().get(self.kernel_key(point))
        if known is not None:
            trial.set_user_attr("state", "duplicate")
            trial.set_user_attr("duplicate_of", known.number)
            if known.state == TrialState.COMPLETE:
                self.study.tell(trial, known.value)
            else:
                self.study.tell(trial, state=TrialState.FAIL)
            return False
        started = time.perf_counter()
        result = worker.run(self._job([point], TRIAL_REPEATS, TRIAL_ROUNDS), timeout)[0]
        trial.set_user_attr("measured", True)
        trial.set_user_attr("state", "complete" if result["state"] == "ok" else result["state"])
        trial.set_user_attr("seconds_wall", round(time.perf_counter() - started, 3))
        if result["state"] == "ok":
            trial.set_user_attr("compile_s", round(result["compile_s"], 3))
            self.study.tell(trial, result["seconds"])
        else:
            trial.set_user_attr("reason", result["reason"])
            self.study.tell(trial, state=TrialState.FAIL)
        return True

    def enqueue_unmeasured(self) -> bool:
        """Put an unmeasured valid point first in line (the sampler keeps proposing known ones)."""
        seen = self.measured()
        todo = [p for p in self.points if self.kernel_key(p) not in seen]
        if not todo:
            return False
        self.study.enqueue_trial(self.codec.encode(self.rng.choice(todo)))
        return True

    def exhausted(self) -> bool:
        return len(self.measured()) >= len(self.kernels)

    # -- the end of a study --

    def confirm(self, worker: Worker, timeout: float) -> list[dict]:
        """Time the fastest few and the default together; kept in the study for any process."""
        from optuna.trial import TrialState

        done = sorted((t for t in self.measured().values() if t.state == TrialState.COMPLETE), key=lambda t: t.value)
        picks = [self.knobs(t) for t in done[:CONFIRM_TOP]]
        if self.default not in picks and self.default_trial() is not None:
            picks.append(dict(self.default))
        if len(picks) < 2:
            return []
        results = worker.run(self._job(picks, CONFIRM_REPEATS, CONFIRM_ROUNDS), timeout * 2)
        confirmed = [{"knobs": p, "seconds": r["seconds"], "rounds": r["rounds"]} for p, r in zip(picks, results) if r["state"] == "ok"]
        self.study.set_user_attr("confirmed", confirmed)
        self.study.set_user_attr("confirmed_at", self.measured_count())
        return confirmed

    def record(self) -> dict:
        """The tuning record of this study, from what the storage holds now."""
        from optuna.trial import TrialState

        trials = []
        for t in self.trials():
            if t.state == TrialState.RUNNING:
                continue
            entry = {"number": t.number, "knobs": self.knobs(t), "state": t.user_attrs.get("state", t.state.name.lower())}
            if t.state == TrialState.COMPLETE:
                entry["seconds"] = t.value
            for attr in ("reason", "duplicate_of", "compile_s", "seconds_wall"):
                if attr in t.user_attrs:
                    entry[attr] = t.user_attrs[attr]
            if t.datetime_complete:
                entry["finished"] = t.datetime_complete.isoformat(timespec="seconds")
            trials.append(entry)
        spec, template = self.spec, self.spec.template
        record = {
            "op": template.op, "version": template.version, "layout": template.layout, "n": spec.n, "k": spec.k,
            "threads": spec.threads, "timing": template.timing, "tokens": template.tokens,
            "space": {"knobs": {k: list(v) for k, v in template.space.knobs.items()}, "constraints": [c.expr for c in template.space.constraints], "valid_points": len(self.points), "distinct_kernels": len(self.kernels)},
            "study": spec.name, "default": {"knobs": self.default}, "trials": trials,
            "measured": self.measured_count(),
        }  # fmt: skip
        confirmed = self.study.user_attrs.get("confirmed") or []
        default_t = self.default_trial()
        if default_t is not None:
            record["default"]["seconds"] = default_t.value
        best_t = self.best()
        if confirmed:
            record["confirmed"] = confirmed
            default_c = next((c for c in confirmed if c["knobs"] == self.default), None)
            winner = min(confirmed, key=lambda c: c["seconds"])
            if default_c and winner is not default_c and not records.beats(winner, default_c):
                winner = default_c  # not reliably faster: keep the default
            record["best"] = {"knobs": winner["knobs"], "seconds": winner["seconds"], "source": "confirmation"}
            if default_c:
                record["default"]["confirmed_seconds"] = default_c["seconds"]
                record["speedup"] = default_c["seconds"] / winner["seconds"]
        elif best_t is not None:
            record["best"] = {"knobs": self.knobs(best_t), "seconds": best_t.value, "source": f"trial {best_t.number}"}
            if default_t is not None:
                record["speedup"] = default_t.value / best_t.value
        return record

    def write_record(self) -> Path:
        path = records.path_for(self.spec.fingerprint, self.records_dir)
        records.update(path, self.spec.fingerprint, self.spec.key, self.record())
        return path


# ----------------------------------------------------------------------------- driving


def _bar(total: int, done: int, label: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=min(done, total), desc=label, unit="trial", file=sys.stderr, dynamic_ncols=True, leave=True)


def _postfix(study: Study) -> str:
    best, default = study.best(), study.default_trial()
    if best is None:
        return "no valid candidate yet"
    text = f"best {best.value * 1e6:,.1f} us"
    if default is not None:
        text += f", default {default.value * 1e6:,.1f} us, {default.value / best.value:.2f}x"
    return text


def run_study(study: Study, worker: Worker, trials: int, deadline: float, timeout: float) -> dict:
    """Measure until the study holds ``trials`` measured trials (all processes together), its
    space is exhausted or ``deadline`` (time.monotonic) passes; then confirm and record."""
    bar = _bar(trials, study.measured_count(), study.spec.label())
    stuck = 0
    try:
        while study.measured_count() < trials and not study.exhausted() and time.monotonic() < deadline:
            if study.step(worker, timeout):
                stuck = 0
                bar.n = min(study.measured_count(), trials)
                bar.set_postfix_str(_postfix(study), refresh=True)
                study.write_record()
            else:
                stuck += 1
                if stuck >= STUCK_ASKS and study.enqueue_unmeasured():
                    stuck = 0
    finally:
        bar.close()
    if study.study.user_attrs.get("confirmed_at") != study.measured_count():
        study.confirm(worker, timeout)
    study.write_record()
    return study.record()
