"""A run's state (``state.json``): where the run is and what it has committed, so that ``--resume`` and a requeued
job continue it. One typed record, and the only code that changes it: every other module reads its fields and
calls its methods; ``commit`` writes it atomically.

The file's keys are the record's fields. A state.json written by an earlier version of the bundle (the same
keys, some missing) still loads; keys this version does not know are ignored with a warning.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .. import fileio
from ..errors import RunDirError
from .run_dir import MLPERF_LOG

log = logging.getLogger(__name__)

STATE = "state.json"
PHASES = ("training", "inference", "results", "done")


@dataclass
class RunState:
    phase: str = "training"  # training -> inference (or results) -> results -> done
    attempts: int = 0  # starts of this run: the first, then every resume or requeue
    run_started: bool = False  # the MLPerf init block is closed and run_start logged
    # training, committed with each epoch's checkpoint
    epochs_done: int = 0
    latest: str | None = None  # checkpoint of the last finished epoch, relative to the run directory
    best: str | None = None  # checkpoint of the lowest val_loss so far
    best_epoch: int | None = None
    best_val_loss: float | None = None
    early_stopping: dict | None = None  # Keras EarlyStopping's counters, restored on resume
    stopped_early: bool = False
    target_epoch: int | None = None  # train.target: the epoch that reached it
    restored_best_epoch: int | None = None  # early_stopping.restore_best_weights: the epoch restored at train end
    fit_s: float = 0.0  # seconds inside training (fit), summed over attempts
    # the run's setting, recorded for results.json
    replicas: int = 1
    strategy: str | None = None
    global_batch_size: int | None = None
    topology: dict | None = None  # workers, nodes, accelerators per node, hosts
    staging: list = field(default_factory=list)  # one record per attempt that staged the data
    worker_reports: list = field(default_factory=list)  # multi-worker: every worker's share, for the chief
    energy_attempts: list = field(default_factory=list)  # energy of earlier attempts, merged by the finishing one
    # integrity (recovery.py): mlperf.log's length at the last commit that closed a step of the run (what follows
    # it belongs to work a resume redoes), and the SHA-256 of each checkpoint the state names
    log_bytes: int | None = None
    checkpoint_sha256: dict = field(default_factory=dict)
    path: Path | None = field(default=None, repr=False, compare=False)  # where commit() writes; not in the file

    # -- the file --------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, run_path: Path) -> "RunState":
        """The state of the run at ``run_path``; a new one where nothing was committed yet."""
        path = Path(run_path) / STATE
        if not path.is_file():
            return cls(path=path)
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RunDirError(f"{path}: unreadable ({e})", "the run cannot be resumed; start a new run") from None
        if not isinstance(saved, dict):
            raise RunDirError(f"{path}: not a JSON object", "the run cannot be resumed; start a new run")
        return cls.from_dict(saved, path)

    @classmethod
    def exists(cls, run_path: Path) -> bool:
        return (Path(run_path) / STATE).is_file()

    @classmethod
    def from_dict(cls, saved: dict, path: Path | None = None) -> "RunState":
        known = {f.name for f in fields(cls)} - {"path"}
        unknown = sorted(set(saved) - known)
        if unknown:
            log.warning("%s: ignoring keys this version does not know: %s", path or STATE, ", ".join(unknown))
        return cls(**{k: v for k, v in saved.items() if k in known}, path=path)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("path")
        return out

    def commit(self, step_done: bool = True) -> None:
        """Write state.json atomically (a temporary file renamed over the old one). ``step_done``: the MLPerf log
        is whole up to here (a start, an epoch, the end of training or of the run), so its length is recorded;
        a commit in the middle of a step (an interruption keeping its energy) leaves the mark where it was."""
        if self.path is None:
            return
        if step_done:
            log_file = self.path.parent / MLPERF_LOG
            self.log_bytes = log_file.stat().st_size if log_file.is_file() else 0
        fileio.write_json(self.path, self.to_dict())

    def moved_to(self, run_path: Path) -> "RunState":
        """This state, committed from now on into ``run_path`` (a worker's own scratch run directory)."""
        self.path = Path(run_path) / STATE
        return self

    # -- changes, in the order a run makes them --------------------------------------------------------------
    def begin_attempt(self) -> int:
        self.attempts += 1
        return self.attempts

    def record_plan(self, replicas: int, strategy: str | None, global_batch_size: int) -> None:
        self.replicas, self.strategy, self.global_batch_size = replicas, strategy, global_batch_size

    def record_topology(self, topology: dict) -> None:
        self.topology = topology

    def record_staging(self, record: dict) -> None:
        self.staging.append({"attempt": self.attempts, **record})

    def start_run(self) -> None:
        """The MLPerf run has started (run_start is logged once, by the first attempt)."""
        self.run_started = True

    def commit_epoch(self, done: int, latest: str, best: tuple[str, float] | None, early_stopping: dict | None,
                     stopped_early: bool, sha256: dict | None = None) -> None:
        """Epoch ``done`` finished and its checkpoints are on disk (``best``: its file and val_loss when it is
        the best so far; ``sha256``: the digest of each file written); committed by the caller right after."""
        if best is not None:
            self.best, self.best_val_loss = best
            self.best_epoch = done
        self.latest, self.epochs_done = latest, done
        kept = {self.latest, self.best}
        self.checkpoint_sha256 = {k: v for k, v in {**self.checkpoint_sha256, **(sha256 or {})}.items() if k in kept}
        if early_stopping is not None:
            self.early_stopping, self.stopped_early = early_stopping, stopped_early

    def follow_chief(self, epochs_done: int) -> None:
        """A non-chief worker's count of finished epochs (the chief commits the checkpoints)."""
        self.epochs_done = epochs_done

    def reach_target(self, epoch: int) -> None:
        self.target_epoch = epoch

    def add_fit_time(self, seconds: float) -> None:
        self.fit_s += seconds

    def restore_best(self) -> None:
        """Keras restored the best epoch's weights at the end of training."""
        self.restored_best_epoch = self.best_epoch

    def end_training(self, infer: bool) -> None:
        self.phase = "inference" if infer else "results"

    def record_workers(self, reports: list[dict]) -> None:
        self.worker_reports = reports

    def keep_energy(self, energy: dict) -> None:
        """An attempt that did not finish: its energy is merged into the results of the one that does."""
        self.energy_attempts.append(energy)

    def finish(self) -> None:
        self.phase = "done"

    # -- questions -------------------------------------------------------------------------------------------
    @property
    def trains_on(self) -> bool:
        """Whether a resumed run still has epochs to train (not stopped early, target not reached)."""
        return not (self.target_epoch or self.stopped_early)

    def checkpoint(self, which: str) -> str | None:
        """The run-relative file of the ``best`` or ``latest`` checkpoint, if any."""
        if which not in ("best", "latest"):
            raise ValueError(which)
        return getattr(self, which)
