"""What a resume finds after a kill at any instant, made consistent before the run goes on (under the run's lock).

A run commits in one order: checkpoint files → ``history.csv`` → MLPerf lines → ``state.json``; at the end
``results.json`` → ``result``/``run_stop`` lines → ``state.json`` (phase done). ``state.json`` is the commit
point: it records the MLPerf log's length and each checkpoint's SHA-256 at every commit. So whatever instant a
kill hits, the files hold the last commit plus, at most, the first part of the next step, and a resume:

* cuts ``mlperf.log`` back to the recorded length (a second init block, epoch or ``result`` never follows a
  first), while the rows of ``history.csv`` past the committed epoch are dropped as the run reads it;
* with no ``state.json`` at all: starts the run over when nothing was committed (a kill during start-up), and
  refuses when the run has trained (a deleted state: its progress cannot be known);
* refuses a checkpoint whose bytes are not the ones the run wrote (damaged, or copied from another run).

Temporary files of the killed writer are removed when the lock is taken (run_dir.RunDir.lock).
"""

from __future__ import annotations

import logging
import os

from .. import fileio
from ..errors import RunDirError
from .run_dir import HISTORY, MLPERF_LOG, MODEL, RESULTS, RunDir
from .state import STATE, RunState

log = logging.getLogger(__name__)


def resumable_state(run: RunDir) -> RunState:
    """The run's state once its files agree with it (see the module's description)."""
    if not RunState.exists(run.path):
        return _uncommitted(run)
    state = RunState.load(run.path)
    _cut_log(run, state.log_bytes)
    _check_checkpoints(run, state)
    return state


def _uncommitted(run: RunDir) -> RunState:
    """No state.json: a run killed before its first commit starts over; a run with trained files is refused."""
    trained = sorted(str(p.relative_to(run.path)) for p in (run.path / "checkpoints").glob("*.keras"))
    trained += [name for name in (HISTORY, MODEL, RESULTS) if (run / name).exists()]
    if trained:
        raise RunDirError(f"{run / STATE}: missing, though the run has trained ({', '.join(trained[:3])})",
                          "its progress cannot be known: start a new run (its checkpoints are kept here)")
    _cut_log(run, 0)
    return RunState.load(run.path)


def _cut_log(run: RunDir, length: int | None) -> None:
    """``mlperf.log`` back to ``length`` bytes (None: a state of an earlier version, which kept no length)."""
    path = run / MLPERF_LOG
    if length is None or not path.is_file():
        return
    size = path.stat().st_size
    if size < length:
        raise RunDirError(f"{path}: {size} bytes, shorter than the {length} the run had committed",
                          "the log was damaged or edited; the run cannot be resumed: start a new run")
    if size > length:
        log.info("%s: %d bytes after the last commit (a step the stop cut short) removed; it is run again",
                 path, size - length)
        with fileio.writing(path):
            os.truncate(path, length)


def _check_checkpoints(run: RunDir, state: RunState) -> None:
    for name, digest in state.checkpoint_sha256.items():
        path = run / name
        if not path.is_file():
            continue  # a missing checkpoint is reported where it is loaded
        if fileio.file_sha256(path) != digest:
            raise RunDirError(f"{path}: not the checkpoint this run wrote (its SHA-256 differs from state.json's)",
                              "the file was damaged or replaced: restore it, or start a new run")
