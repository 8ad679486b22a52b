"""Run directories: one per run, created exclusively, never reused except to resume the same run.

Layout (the contract reports and SLURM scripts read; docs/results.md):
``config.yaml`` ``results.json`` ``history.csv`` ``mlperf.log`` ``console.log`` ``state.json`` ``model.keras``
``checkpoints/`` ``masks/``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import yaml

from . import fileio
from .config import Config, config_from_dict, yaml_load
from .errors import RunDirError

CONFIG = "config.yaml"
RESULTS = "results.json"
STATE = "state.json"
HISTORY = "history.csv"
MLPERF_LOG = "mlperf.log"
CONSOLE_LOG = "console.log"
MODEL = "model.keras"


def default_run_path(cfg: Config) -> Path:
    return Path(cfg.output.root) / f"{time.strftime('%Y%m%d-%H%M%S')}-seed{cfg.seed}"


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @classmethod
    def create(cls, path: str | os.PathLike | None, cfg: Config) -> "RunDir":
        """Create a new run directory; an existing one is refused, never reused or emptied."""
        target = Path(path) if path else default_run_path(cfg)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.mkdir()
        except FileExistsError:
            raise RunDirError(f"{target}: run directory already exists",
                              "choose a new --out, or continue that run with --resume") from None
        run = cls(target)
        (run / "checkpoints").mkdir()
        fileio.write_text(run / CONFIG, cfg.to_yaml())
        return run

    @classmethod
    def for_resume(cls, path: str | os.PathLike) -> "RunDir":
        run = cls(Path(path))
        if not run.path.is_dir():
            raise RunDirError(f"{run.path}: no such run directory to resume", "check the --out path")
        if not (run / CONFIG).is_file():
            raise RunDirError(f"{run.path}: not a run directory (no {CONFIG})", "check the --out path")
        return run

    def config(self) -> Config:
        try:
            tree = yaml_load((self / CONFIG).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise RunDirError(f"{self / CONFIG}: unreadable ({e})", "the run directory is damaged") from None
        return config_from_dict(tree, str(self / CONFIG))

    def read_state(self) -> dict | None:
        path = self / STATE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RunDirError(f"{path}: unreadable ({e})", "the run cannot be resumed; start a new run") from None

    def write_state(self, state: dict) -> None:
        fileio.write_json(self / STATE, state)

    def write_results(self, results: dict) -> None:
        fileio.write_json(self / RESULTS, results)


class _Flush(logging.StreamHandler):
    def emit(self, record):
        super().emit(record)
        self.flush()


def attach_console_log(run: RunDir) -> logging.Handler:
    """Send the package's log lines to ``console.log`` in the run directory (appending on resume)."""
    handler = logging.FileHandler(run / CONSOLE_LOG, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logging.getLogger("cloudmask").addHandler(handler)
    return handler


def detach(handler: logging.Handler) -> None:
    logging.getLogger("cloudmask").removeHandler(handler)
    handler.close()


def setup_console() -> None:
    """Package log lines to stdout, once per process."""
    logger = logging.getLogger("cloudmask")
    if not any(getattr(h, "_cloudmask_console", False) for h in logger.handlers):
        handler = _Flush(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._cloudmask_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
