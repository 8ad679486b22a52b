"""MLPerf logging (``mlperf_logging.mllog``) for one run, and ``check-log`` with the ruleset shipped here.

The stock compliance checker has no cloudmask rules (its HPC rulesets crash on an unknown benchmark), so the
package ships ``rules/cloudmask_1.1.0.yaml``: the HPC 3.0.0 common rules, ``submission_benchmark == cloudmask``,
and the keys a cloudmask result needs. In the closed division it also requires the reference hyper-parameters.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

from mlperf_logging.mllog import constants as C
from mlperf_logging.mllog.mllog import MLLogger

from ..errors import CloudmaskError
from ..fileio import AppendLog
from ..training.runtime import cpu_model

RULESET = "cloudmask_1.1.0.yaml"
# HPC keys that mllog.constants does not define (the reference logs all three, number_of_ranks = its `gpu`)
NUMBER_OF_RANKS = "number_of_ranks"
NUMBER_OF_NODES = "number_of_nodes"
ACCELERATORS_PER_NODE = "accelerators_per_node"
DEVIATIONS = "cloudmask_deviations"  # the ledger's deviations of this run (config/ledger.py); [] in closed
TARGET = "cloudmask_target"  # train.target: value, metadata.metric


class MLPerfLog:
    """An ``MLLogger`` writing ``:::MLLOG`` lines to one file (appending on resume), nothing to stdout."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._logger = logging.getLogger(f"cloudmask.mllog.{id(self)}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        self._handler = AppendLog(self.path)
        self._logger.addHandler(self._handler)
        # metadata.file is made relative to the package, so logs of different machines compare line by line
        self._mllog = MLLogger(self._logger, default_stack_offset=2,
                                     root_dir=str(Path(__file__).resolve().parents[2]))

    def event(self, key: str, value=None, **metadata):
        self._mllog.event(key=key, value=value, metadata=metadata or None)
        self._check()

    def start(self, key: str, value=None, **metadata):
        self._mllog.start(key=key, value=value, metadata=metadata or None)
        self._check()

    def end(self, key: str, value=None, **metadata):
        self._mllog.end(key=key, value=value, metadata=metadata or None)
        self._check()

    def _check(self):
        # a lost line makes the log fail its check: the run must not be reported as a success
        if self._handler.error is not None:
            raise self._handler.error

    def close(self):
        self._handler.close()
        self._logger.removeHandler(self._handler)


def division(cfg, backend: str | None = None) -> str:
    """closed when the run has none of the ledger's deviations (mlperf.division=auto), else open."""
    if cfg.mlperf.division != "auto":
        return cfg.mlperf.division
    return "closed" if not cfg.deviations(backend) else "open"


def platform_name(cfg, devices: list[str], nodes: int = 1) -> str:
    if cfg.mlperf.platform != "auto":
        return cfg.mlperf.platform
    device = f"{len(devices)}x {devices[0]}" if devices else f"CPU {cpu_model()}"
    host = socket.gethostname()
    return f"{host}: {device}" if nodes == 1 else f"{nodes} nodes like {host}: {device}"


def log_submission(log: MLPerfLog, cfg, platform: str, division: str) -> None:
    log.event(C.SUBMISSION_BENCHMARK, cfg.mlperf.benchmark)
    log.event(C.SUBMISSION_ORG, cfg.mlperf.org)
    log.event(C.SUBMISSION_DIVISION, division)
    log.event(C.SUBMISSION_STATUS, cfg.mlperf.status)
    log.event(C.SUBMISSION_PLATFORM, platform)


def log_hyperparameters(log: MLPerfLog, cfg, train_samples: int, eval_samples: int, topology: dict,
                        ranks: int, backend: str | None = None) -> None:
    """The run's settings; ``topology``: nodes and accelerators per node; ``ranks``: the replicas training
    together (the reference's number_of_ranks is the GPUs it trains on)."""
    log.event(C.SEED, cfg.seed)
    log.event(C.GLOBAL_BATCH_SIZE, cfg.train.batch_size)
    log.event(C.GRADIENT_ACCUMULATION_STEPS, cfg.accumulation_steps)
    log.event(C.OPT_NAME, "adam")
    log.event(C.OPT_BASE_LR, cfg.effective_learning_rate)
    log.event(C.TRAIN_SAMPLES, train_samples)
    log.event(C.EVAL_SAMPLES, eval_samples)
    log.event(NUMBER_OF_RANKS, ranks)
    log.event(NUMBER_OF_NODES, topology["nodes"])
    log.event(ACCELERATORS_PER_NODE, topology["accelerators_per_node"])
    log.event(DEVIATIONS, sorted(cfg.deviations(backend)))
    if cfg.train.target.value is not None:  # the ruleset checks the eval that ends a successful run against it
        log.event(TARGET, cfg.train.target.value, metric=cfg.train.target.metric)


def run_status(cfg, target_epoch: int | None) -> str:
    """MLPerf run_stop status: ``aborted`` when a quality target was set and never reached, else ``success``."""
    return "aborted" if cfg.train.target.value is not None and not target_epoch else "success"


def ruleset_path() -> Path:
    return Path(str(resources.files("cloudmask.run").joinpath(f"rules/{RULESET}")))


def find_log(target: str | os.PathLike) -> Path:
    path = Path(target)
    if path.is_dir():
        path = path / "mlperf.log"
    if not path.is_file():
        raise CloudmaskError(f"{path}: no MLPerf log here", "pass a run directory or an mlperf.log file")
    return path


def check_log(target: str | os.PathLike) -> tuple[bool, str]:
    """Run the real ``mlperf_logging.compliance_checker`` with the cloudmask ruleset: (passed, its output)."""
    log_file = find_log(target)
    with tempfile.TemporaryDirectory(prefix="cloudmask-check-") as tmp:
        out = Path(tmp) / "compliance.log"
        cmd = [sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "hpc", "--ruleset", "3.0.0",
               "--config", str(ruleset_path()), "--log_output", str(out), str(log_file.resolve())]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
    text = (done.stdout + done.stderr).strip()
    if done.returncode not in (0, 1) or "Traceback" in text:
        raise CloudmaskError(f"the compliance checker crashed on {log_file}: {text.splitlines()[-1] if text else ''}",
                             "is the file an MLPerf log?")
    return done.returncode == 0, text
