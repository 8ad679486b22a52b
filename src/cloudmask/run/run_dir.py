"""The run directory: one run's files, created exclusively and never reused except to resume the same run.

Its layout is the contract that reports, SLURM scripts and users read (docs/results.md). Every file is
written to a temporary name and renamed into place (fileio). The process that writes a run holds its lock
(lock.py) from creation, or from the start of a resume, to its end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from .. import fileio
from ..config import Config, config_from_dict, yaml_load
from ..errors import RunDirError
from .lock import RunLock

CONFIG = "config.yaml"
RESULTS = "results.json"
HISTORY = "history.csv"
MLPERF_LOG = "mlperf.log"
CONSOLE_LOG = "console.log"
MODEL = "model.keras"

HISTORY_FIELDS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "epoch_s", "train_s", "val_s",
                  "samples_per_s", "run_s"]


def default_run_path(cfg: Config) -> Path:
    return Path(cfg.output.root) / f"{time.strftime('%Y%m%d-%H%M%S')}-seed{cfg.seed}"


def _reserve(target: Path, numbered: bool) -> Path:
    """Create ``target`` (mkdir is atomic: of two processes asking for one name, one gets it). ``numbered``: a
    taken name gets the next free ``-2``, ``-3``, … suffix instead of an error."""
    with fileio.writing(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        name = target if n == 1 else target.with_name(f"{target.name}-{n}")
        try:
            with fileio.writing(name):
                name.mkdir()
            return name
        except FileExistsError:
            if not numbered:
                if not name.is_dir():
                    raise RunDirError(f"{name}: a file of that name already exists", "choose a new --out") from None
                raise RunDirError(f"{name}: run directory already exists",  # bench and infer have no --resume
                                  f"choose a new --out, or continue that run: cloudmask train --resume --out "
                                  f"{name}") from None
    raise RunDirError(f"{target}: 10,000 run directories of that name", "clean up output.root")


class RunDir:
    def __init__(self, path: Path, scratch: bool = False):
        self.path = Path(path)
        self.scratch = scratch  # a temporary directory of a process whose files are not kept
        self._lock: RunLock | None = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @classmethod
    def create(cls, path: str | os.PathLike | None, cfg: Config) -> "RunDir":
        """Create a new run directory; an existing ``path`` is refused, never reused or emptied. Without ``path``
        the default name, numbered when another run took it first. If its first files cannot be written (a full
        disk) nothing is left: a stub directory could neither be resumed nor reused."""
        target = _reserve(Path(path) if path else default_run_path(cfg), numbered=not path)
        lock = None
        try:
            lock = RunLock.take(target)  # before its first file: a --resume of the new name finds it in use
            run = cls._populate(target, cfg)
            run._lock = lock
            return run
        except BaseException:
            if lock is not None:
                lock.release()
            shutil.rmtree(target, ignore_errors=True)
            raise

    @classmethod
    def create_scratch(cls, cfg: Config, prefix: str) -> "RunDir":
        """A run directory under $TMPDIR for a process whose files are not kept (``remove`` deletes it)."""
        target = Path(tempfile.mkdtemp(prefix=prefix)) / "run"
        target.mkdir()
        run = cls._populate(target, cfg)
        run.scratch = True
        return run

    @classmethod
    def _populate(cls, target: Path, cfg: Config) -> "RunDir":
        run = cls(target)
        with fileio.writing(run / "checkpoints"):
            (run / "checkpoints").mkdir()
        fileio.write_text(run / CONFIG, cfg.to_yaml())
        return run

    def lock(self) -> None:
        """Hold this run's lock until ``release`` (the end of the process at the latest)."""
        if self._lock is None:
            self._lock = RunLock.take(self.path)
            fileio.remove_leftovers(self.path)  # ours alone now: a temporary file here is a dead writer's
            fileio.remove_leftovers(self.path / "checkpoints")

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def remove(self) -> None:
        if self.scratch:
            shutil.rmtree(self.path.parent, ignore_errors=True)

    @classmethod
    def existing(cls, path: str | os.PathLike, use: str = "resume") -> "RunDir":
        """A run directory that must exist already: to ``use`` ("resume" it, or "score" its model)."""
        run = cls(Path(path))
        flag = "--out" if use == "resume" else "the run path"
        if not run.path.exists():
            raise RunDirError(f"{run.path}: no such run directory to {use}", f"check {flag}")
        if not run.path.is_dir():
            raise RunDirError(f"{run.path}: is a file, not a run directory", f"check {flag}")
        if not (run / CONFIG).is_file():
            raise RunDirError(f"{run.path}: not a run directory (no {CONFIG})", f"check {flag}")
        return run

    def config(self) -> Config:
        try:
            tree = yaml_load((self / CONFIG).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise RunDirError(f"{self / CONFIG}: unreadable ({e})", "the run directory is damaged") from None
        return config_from_dict(tree, str(self / CONFIG))

    def write_results(self, results: dict) -> None:
        fileio.write_json(self / RESULTS, results)

    def read_history(self) -> list[dict]:
        return [{k: (None if v == "" else int(v) if k == "epoch" else float(v)) for k, v in row.items()}
                for row in fileio.read_csv(self / HISTORY)]

    def write_history(self, rows: list[dict]) -> None:
        fields = HISTORY_FIELDS + [k for k in (rows[0] if rows else {}) if k not in HISTORY_FIELDS]
        fileio.write_csv(self / HISTORY, fields, rows)
