"""The training phase: Keras ``fit`` (or, under a cluster, the multi-worker loop of worker_loop.py) over the batch
streams, instrumented with the callbacks of callbacks.py.

``train_run`` is a run's training: from ``state['epochs_done']`` to ``train.epochs``, checkpointed and committed
per epoch, stopped cleanly by a signal. ``time_steps`` is the throughput mode's: a fixed number of steps with
no validation, checkpoint or record, timed after a warm-up.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras

from . import worker_loop
from .callbacks import (Checkpointer, EpochRecorder, Interrupter, ProgressLines, ResumableEarlyStopping, StepTimer,
                        TargetStopper)
from .errors import TrainingInterrupted
from .progress import resolve as resolve_progress
from .rundir import RunDir
from .signals import StopSignals
from .worker_loop import StopTraining


@dataclass
class FitOutcome:
    history: list[dict]
    epochs_run: int
    stopped_early: bool
    fit_s: float
    callbacks: list = field(default_factory=list)
    worker: dict | None = None  # multi-worker: this worker's time in training steps and patches fed


class ValidationPasses(keras.utils.PyDataset):
    """The validation batches as Keras's indexed dataset: item ``i`` is always the ``i``-th batch of a pass.

    Given the endless stream itself, Keras (3.15, ``peek_and_restore``) re-chains the two batches it peeked at
    first in front of the live stream every time it starts a validation pass, so from epoch 2 on validation saw
    a shifted set of batches, and a resumed run (one peek, later) a different one than an uninterrupted run."""

    def __init__(self, stream):
        super().__init__(workers=1, use_multiprocessing=False)
        self.stream = stream
        self._pass, self._next = None, 0

    def __len__(self) -> int:
        return self.stream.steps

    def __getitem__(self, i: int):
        if self._pass is None or i != self._next:  # a new pass (each epoch), or Keras asked out of order
            if self._pass is not None:
                self._pass.close()
            self._pass, self._next = iter(self.stream), 0
            for _ in range(i):
                next(self._pass)
            self._next = i
        self._next += 1
        return next(self._pass)


def fit_loop(model, train_stream, val_stream, callbacks: list, epochs: int, start: int = 0,
             steps_per_epoch: int | None = None, cluster=None, global_batch: int | None = None, verbose=0,
             stop_requested=lambda: False) -> worker_loop.LoopResult | None:
    """Keras ``fit``, or the multi-worker loop under ``cluster`` (which returns its LoopResult); a stop asked for
    by a signal raises StopTraining. ``val_stream`` None: no validation."""
    steps = steps_per_epoch or train_stream.steps
    try:
        if cluster is None:
            model.fit(iter(train_stream), steps_per_epoch=steps, epochs=epochs, initial_epoch=start,
                      validation_data=ValidationPasses(val_stream) if val_stream is not None else None,
                      callbacks=callbacks, verbose=verbose, shuffle=False)
            return None
        chief = cluster.is_chief
        listed = keras.callbacks.CallbackList(callbacks, add_progbar=bool(verbose) and chief, model=model,
                                              verbose=verbose, epochs=epochs, steps=steps)
        return worker_loop.fit(cluster, model, train_stream, val_stream, listed, epochs, start, global_batch,
                               stop_requested, steps_per_epoch)
    except StopTraining:
        raise
    except Exception:
        # tf.data and Keras re-wrap an exception raised in the input generator; surface the original DataError
        for stream in (train_stream, val_stream):
            if stream is not None and stream.error is not None:
                raise stream.error from None
        raise


def train_run(cfg, run: RunDir, model, td, mlog, state: dict, stop: StopSignals,
              extra_callbacks: list | None = None, cluster=None, checkpoints: Path | None = None) -> FitOutcome:
    """Train from ``state['epochs_done']`` to ``cfg.train.epochs``; ``state`` is updated and committed per epoch.

    ``cluster``: train as one of several workers; only the chief checkpoints. ``checkpoints``: the run directory
    checkpoints are read from when it is not ``run`` (a non-chief worker writes into a scratch directory but
    resumes from the chief's files). ``stop``: the run's stop request, checked at every batch."""
    chief = cluster is None or cluster.is_chief
    history = run.read_history()[: state.get("epochs_done", 0)]
    start = state.get("epochs_done", 0)
    recorder = EpochRecorder(run, mlog, td.train_stream.batches * cfg.train.batch_size, history, cfg.train.epochs)
    es = _early_stopping(cfg, state, checkpoints or run.path)
    extra_callbacks = list(extra_callbacks or [])
    recorder.extra_columns = [cb.columns for cb in extra_callbacks if hasattr(cb, "columns")]
    target = cfg.train.target
    stopper = [TargetStopper(target.metric, target.value, state)] if target.value is not None else []
    callbacks = [*extra_callbacks, recorder, *([es] if es else []), *stopper,
                 *([Checkpointer(run, state, es)] if chief else [])]  # the checkpoint commits what came before it
    # a run that reached its target (or stopped early) before an interruption does not train on when resumed
    epochs = start if state.get("target_epoch") or state.get("stopped_early") else cfg.train.epochs
    verbose, progress = _progress(cfg, td, epochs, chief)
    t0 = time.perf_counter()
    try:
        # Keras fit stops at the next batch through a callback; the multi-worker loop must not stop one worker
        # alone (the others would wait in a collective): it polls the request before every step, all together
        interrupter = [Interrupter(stop)] if cluster is None else []
        loop = fit_loop(model, td.train_stream, td.val_stream, [*progress, *callbacks, *interrupter], epochs, start,
                        cluster=cluster, global_batch=cfg.train.batch_size, verbose=verbose,
                        stop_requested=lambda: stop.requested)
        if loop is not None and not chief:  # the chief's Checkpointer keeps the count; the others follow
            state["epochs_done"] = loop.epochs_done
        if loop is not None and loop.stopped:
            raise StopTraining()
    except StopTraining:
        state["fit_s"] = state.get("fit_s", 0.0) + time.perf_counter() - t0
        if chief:
            run.write_state(state)
        # a worker that got no signal itself stops because another did (SLURM signals all of a step's tasks)
        raise TrainingInterrupted(stop.signum or signal.SIGTERM, state.get("epochs_done", 0),
                                  (checkpoints or run.path)) from None
    state["fit_s"] = state.get("fit_s", 0.0) + time.perf_counter() - t0
    if es is not None and es.restore_best_weights and state.get("best"):
        # Keras restores the best weights in memory at train end; say so in the results
        state["restored_best_epoch"] = state.get("best_epoch")
    worker = {"train_s": loop.train_s, "patches": loop.samples} if loop is not None else None
    return FitOutcome(history, len(history), bool(state.get("stopped_early")), state["fit_s"], callbacks, worker)


def _progress(cfg, td, epochs: int, chief: bool) -> tuple[int, list]:
    """Keras's own bar on a terminal; plain lines (ProgressLines) in a batch log; nothing with --quiet."""
    mode = resolve_progress(cfg.output.progress) if chief else "off"
    if mode != "lines":
        return int(mode == "bar"), []
    steps = td.train_stream.steps
    lines = ProgressLines(epochs, steps, td.val_stream.steps if td.val_stream is not None else 0,
                          td.train_stream.batches * cfg.train.batch_size / max(steps, 1),
                          cfg.output.progress_interval_s)
    return 0, [lines]


def _early_stopping(cfg, state: dict, checkpoints: Path) -> ResumableEarlyStopping | None:
    es = cfg.train.early_stopping
    if not es.enabled:
        return None
    return ResumableEarlyStopping(restored=state.get("early_stopping"),
                                  best_weights_file=checkpoints / state["best"] if state.get("best") else None,
                                  patience=es.patience, min_delta=es.min_delta,
                                  restore_best_weights=es.restore_best_weights)


def time_steps(model, stream, warmup: int, steps: int, cluster=None, global_batch: int | None = None) -> float:
    """Seconds of ``steps`` training steps after ``warmup`` untimed ones (every worker in step under a cluster)."""
    timer = StepTimer(warmup)
    fit_loop(model, stream, None, [timer], epochs=1, steps_per_epoch=warmup + steps, cluster=cluster,
             global_batch=global_batch)
    return timer.seconds
