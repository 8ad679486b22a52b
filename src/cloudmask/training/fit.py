"""The training phase: Keras ``fit`` (or, under a cluster, the multi-worker loop of worker_loop.py) over the batch
streams, instrumented with the callbacks of callbacks.py.

``train_run`` is a run's training: from the state's ``epochs_done`` to ``train.epochs``, checkpointed and
committed per epoch, stopped cleanly by a signal. ``time_steps`` is the throughput mode's: a fixed number of
steps with no validation, checkpoint or record, timed after a warm-up.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

import keras

from ..cli.progress import resolve as resolve_progress
from ..errors import TrainingInterrupted
from ..run.run_dir import RunDir
from ..run.signals import StopSignals
from ..run.state import RunState
from . import worker_loop
from .callbacks import (
    Checkpointer,
    EpochRecorder,
    Interrupter,
    ProgressLines,
    ResumableEarlyStopping,
    StepTimer,
    TargetStopper,
)
from .worker_loop import Epochs, StopTraining, Workers


@dataclass
class FitContext:
    """What a run's training writes to and answers to: its directory, MLPerf log and state, the stop request,
    the cluster (None: one process), and where checkpoints are read from (a non-chief worker writes into a
    scratch directory but resumes from the chief's files)."""

    run: RunDir
    mlog: object
    state: RunState
    stop: StopSignals
    cluster: object = None
    checkpoints: Path | None = None

    @property
    def chief(self) -> bool:
        return self.cluster is None or self.cluster.is_chief

    @property
    def checkpoint_dir(self) -> Path:
        return self.checkpoints or self.run.path


class ValidationPasses(keras.utils.PyDataset):
    """The validation batches as Keras's indexed dataset: item ``i`` is always the ``i``-th batch of the pass of
    the epoch being trained (``epoch``, kept up to date by the ``following`` callback), so an order that changes
    every epoch (the reference's shuffled validation) gives every epoch its own batches, the same after a resume.

    Given the endless stream itself, Keras (3.15, ``peek_and_restore``) re-chains the two batches it peeked at
    first in front of the live stream every time it starts a validation pass, so from epoch 2 on validation saw
    a shifted set of batches, and a resumed run (one peek, later) a different one than an uninterrupted run."""

    def __init__(self, stream):
        super().__init__(workers=1, use_multiprocessing=False)
        self.stream = stream
        self.epoch = stream.epoch  # the first epoch this fit trains
        self._pass, self._next = None, 0
        self.following = _FollowEpochs(self)

    def __len__(self) -> int:
        return self.stream.steps

    def __getitem__(self, i: int):
        if self._pass is None or i != self._next:  # a new pass (each epoch), or Keras asked out of order
            if self._pass is not None:
                self._pass.close()
            self.stream.epoch = self.epoch
            self._pass, self._next = iter(self.stream), 0
            for _ in range(i):
                next(self._pass)
            self._next = i
        self._next += 1
        return next(self._pass)


class _FollowEpochs(keras.callbacks.Callback):
    def __init__(self, passes: ValidationPasses):
        super().__init__()
        self.passes = passes

    def on_epoch_begin(self, epoch, logs=None):
        self.passes.epoch = epoch


def fit_loop(model, train_stream, val_stream, callbacks: list, epochs: Epochs, workers: Workers | None = None,
             verbose=0) -> worker_loop.LoopResult | None:
    """Keras ``fit``, or the multi-worker loop under ``workers`` (which returns its LoopResult); a stop asked for
    by a signal raises StopTraining. ``val_stream`` None: no validation."""
    steps = epochs.steps or train_stream.steps
    try:
        if workers is None:
            passes = ValidationPasses(val_stream) if val_stream is not None else None
            following = [passes.following] if passes is not None else []
            model.fit(iter(train_stream), steps_per_epoch=steps, epochs=epochs.end, initial_epoch=epochs.start,
                      validation_data=passes, callbacks=[*following, *callbacks], verbose=verbose, shuffle=False)
            return None
        listed = keras.callbacks.CallbackList(callbacks, add_progbar=bool(verbose) and workers.cluster.is_chief,
                                              model=model, verbose=verbose, epochs=epochs.end, steps=steps)
        return worker_loop.fit(model, train_stream, val_stream, listed, epochs, workers)
    except StopTraining:
        raise
    except Exception:
        # tf.data and Keras re-wrap an exception raised in the input generator; surface the original DataError
        for stream in (train_stream, val_stream):
            if stream is not None and stream.error is not None:
                raise stream.error from None
        raise


def train_run(cfg, model, inputs, ctx: FitContext, extra_callbacks: list | None = None) -> dict | None:
    """Train from the state's ``epochs_done`` to ``cfg.train.epochs``; the state is updated and committed per
    epoch (by the chief). Returns this worker's share of the training under a cluster (its seconds in training
    steps and the patches it fed), else None. The stop request is checked at every batch."""
    state = ctx.state
    start = state.epochs_done
    history = ctx.run.read_history()[:start]
    recorder = EpochRecorder(ctx.run, ctx.mlog, inputs.train_stream.batches * cfg.train.batch_size, history,
                             cfg.train.epochs)
    es = _early_stopping(cfg, state, ctx.checkpoint_dir)
    extra_callbacks = list(extra_callbacks or [])
    recorder.extra_columns = [cb.columns for cb in extra_callbacks if hasattr(cb, "columns")]
    target = cfg.train.target
    stopper = [TargetStopper(target.metric, target.value, state)] if target.value is not None else []
    callbacks = [*extra_callbacks, recorder, *([es] if es else []), *stopper,
                 *([Checkpointer(ctx.run, state, es)] if ctx.chief else [])]  # the checkpoint commits what came before
    # a run that reached its target (or stopped early) before an interruption does not train on when resumed
    epochs = Epochs(cfg.train.epochs if state.trains_on else start, start)
    verbose, progress = _progress(cfg, inputs, epochs.end, ctx.chief)
    # Keras fit stops at the next batch through a callback; the multi-worker loop must not stop one worker
    # alone (the others would wait in a collective): it polls the request before every step, all together
    workers = None if ctx.cluster is None else Workers(ctx.cluster, cfg.train.batch_size, lambda: ctx.stop.requested)
    interrupter = [Interrupter(ctx.stop)] if workers is None else []
    t0 = time.perf_counter()
    try:
        loop = fit_loop(model, inputs.train_stream, inputs.val_stream, [*progress, *callbacks, *interrupter], epochs,
                        workers, verbose)
        if loop is not None and not ctx.chief:  # the chief's Checkpointer keeps the count; the others follow
            state.follow_chief(loop.epochs_done)
        if loop is not None and loop.stopped:
            raise StopTraining()
    except StopTraining:
        state.add_fit_time(time.perf_counter() - t0)
        if ctx.chief:
            state.commit(step_done=False)  # the interrupted epoch's MLPerf lines are not the run's: resume drops them
        # a worker that got no signal itself stops because another did (SLURM signals all of a step's tasks)
        raise TrainingInterrupted(ctx.stop.signum or signal.SIGTERM, state.epochs_done, ctx.checkpoint_dir) from None
    state.add_fit_time(time.perf_counter() - t0)
    if es is not None and es.restore_best_weights and state.best:
        state.restore_best()  # Keras restores the best weights in memory at train end; say so in the results
    return {"train_s": loop.train_s, "patches": loop.samples} if loop is not None else None


def _progress(cfg, inputs, epochs: int, chief: bool) -> tuple[int, list]:
    """Keras's own bar on a terminal; plain lines (ProgressLines) in a batch log; nothing with --quiet."""
    mode = resolve_progress(cfg.output.progress) if chief else "off"
    if mode != "lines":
        return int(mode == "bar"), []
    steps = inputs.train_stream.steps
    lines = ProgressLines(epochs, steps, inputs.val_stream.steps if inputs.val_stream is not None else 0,
                          inputs.train_stream.batches * cfg.train.batch_size / max(steps, 1),
                          cfg.output.progress_interval_s)
    return 0, [lines]


def _early_stopping(cfg, state: RunState, checkpoints: Path) -> ResumableEarlyStopping | None:
    es = cfg.train.early_stopping
    if not es.enabled:
        return None
    return ResumableEarlyStopping(restored=state.early_stopping,
                                  best_weights_file=checkpoints / state.best if state.best else None,
                                  patience=es.patience, min_delta=es.min_delta,
                                  restore_best_weights=es.restore_best_weights)


def time_steps(model, stream, warmup: int, steps: int, workers: Workers | None = None) -> float:
    """Seconds of ``steps`` training steps after ``warmup`` untimed ones (every worker in step under ``workers``)."""
    timer = StepTimer(warmup)
    fit_loop(model, stream, None, [timer], Epochs(1, 0, warmup + steps), workers)
    return timer.seconds
