"""Where the package's log lines go: stdout for the user (once per process) and ``console.log`` of the run."""

from __future__ import annotations

import logging
import sys

from .fileio import AppendLog
from .rundir import CONSOLE_LOG, RunDir

LOGGER = "cloudmask"


class _Flush(logging.StreamHandler):
    def emit(self, record):
        super().emit(record)
        self.flush()


def setup() -> None:
    """Package log lines to stdout, once per process."""
    logger = logging.getLogger(LOGGER)
    if not any(getattr(h, "_cloudmask_console", False) for h in logger.handlers):
        handler = _Flush(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._cloudmask_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def quiet() -> None:
    """Only warnings and errors on stdout (a worker that is not the chief: every line would repeat the chief's;
    a JSON report on stdout)."""
    for h in logging.getLogger(LOGGER).handlers:
        if getattr(h, "_cloudmask_console", False):
            h.setLevel(logging.WARNING)


def attach(run: RunDir) -> logging.Handler:
    """Send the package's log lines to ``console.log`` in the run directory (appending on resume). A write that
    fails there (a full disk) drops the file's later lines; stdout still has them, and the failing write of a
    checkpoint or result stops the run with the reason."""
    handler = AppendLog(run / CONSOLE_LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logging.getLogger(LOGGER).addHandler(handler)
    return handler


def detach(handler: logging.Handler) -> None:
    logging.getLogger(LOGGER).removeHandler(handler)
    handler.close()
