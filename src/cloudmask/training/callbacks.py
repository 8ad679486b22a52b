"""The Keras callbacks that instrument and protect training, and the checkpoint files they write.

* ``EpochRecorder``: history.csv, MLPerf epoch/eval events, the console line per epoch;
* ``PhaseTelemetry``: a timer phase and an energy window per epoch and per validation;
* ``ResumableEarlyStopping``: Keras EarlyStopping whose counters survive ``--resume``;
* ``Checkpointer``: latest/best checkpoints and ``state.json`` after every epoch;
* ``TargetStopper``: stop at the epoch that reaches the quality target (train.target);
* ``Interrupter``: SIGTERM/SIGUSR1 end training at the next batch;
* ``StepTimer``: the throughput mode's clock;
* ``ProgressLines``: step/steps, patches/s and ETA of training and validation in a batch log.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import keras
import numpy as np
from mlperf_logging.mllog import constants as C

from .. import fileio
from ..cli.progress import Progress
from ..errors import RunDirError
from ..run.run_dir import RunDir
from ..run.signals import StopSignals
from ..run.state import RunState
from .worker_loop import StopTraining

log = logging.getLogger(__name__)


class EpochRecorder(keras.callbacks.Callback):
    """Per-epoch wall time (training and validation parts), samples/s, ``history.csv``, MLPerf epoch and eval
    events, one console line per epoch."""

    def __init__(self, run: RunDir, mlog, samples_per_epoch: int, history: list[dict], epochs: int):
        super().__init__()
        self.run, self.mlog, self.samples, self.history, self.epochs = run, mlog, samples_per_epoch, history, epochs
        self._t0 = self._tval = 0.0
        self.extra_columns = []  # callables (epoch) -> dict merged into the row (telemetry adds energy here)
        # run_s: seconds of the run so far at the end of each epoch's evaluation (MLPerf's clock, run_start -> eval;
        # a resumed attempt continues from its last committed epoch, so time lost to an interruption is not counted)
        self._run_base = (history[-1].get("run_s") or 0.0) if history else 0.0
        self._run_t0 = time.perf_counter()

    def on_train_begin(self, logs=None):
        self._run_t0 = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self.mlog.start(C.EPOCH_START, epoch_num=epoch + 1)
        self._t0 = self._tval = time.perf_counter()

    def on_test_begin(self, logs=None):
        self._tval = time.perf_counter()
        self.mlog.start(C.EVAL_START, epoch_num=self._epoch_num())

    def on_test_end(self, logs=None):
        self.mlog.end(C.EVAL_STOP, epoch_num=self._epoch_num())

    def _epoch_num(self) -> int:
        return len(self.history) + 1

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        logs = logs or {}
        train_s = self._tval - self._t0
        row = {"epoch": epoch + 1, "loss": logs.get("loss"), "accuracy": logs.get("accuracy"),
               "val_loss": logs.get("val_loss"), "val_accuracy": logs.get("val_accuracy"),
               "epoch_s": now - self._t0, "train_s": train_s, "val_s": now - self._tval,
               "samples_per_s": self.samples / train_s if train_s > 0 else None,
               "run_s": self._run_base + now - self._run_t0}
        for extra in self.extra_columns:
            row.update(extra(epoch))
        self.history.append(row)
        self.run.write_history(self.history)
        self.mlog.end(C.EPOCH_STOP, epoch_num=epoch + 1)
        self.mlog.event(C.EVAL_ACCURACY, logs.get("val_accuracy"), epoch_num=epoch + 1)
        self.mlog.event("cloudmask_eval_loss", logs.get("val_loss"), epoch_num=epoch + 1)
        log.info("epoch %d/%d  loss %.4f  accuracy %.4f  val_loss %.4f  val_accuracy %.4f  %.1f s  %.1f patches/s",
                 epoch + 1, self.epochs, row["loss"], row["accuracy"], row["val_loss"], row["val_accuracy"],
                 row["epoch_s"], row["samples_per_s"] or 0.0)


class PhaseTelemetry(keras.callbacks.Callback):
    """Energy windows and timers for every epoch and its validation; energy columns for history.csv and an
    MLPerf energy event per epoch. Must come before EpochRecorder, which reads the closed epoch window."""

    def __init__(self, tel, mlog):
        super().__init__()
        self.tel, self.meter, self.mlog = tel, tel.meter, mlog
        self._epoch_phase = self._val_phase = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch + 1
        self._epoch_phase = self.tel.open(f"epoch {self._epoch}")

    def on_test_begin(self, logs=None):
        self._val_phase = self.tel.open("validation", f"validation {self._epoch}")

    def on_test_end(self, logs=None):
        self.tel.close(self._val_phase)

    def on_epoch_end(self, epoch, logs=None):
        self.tel.close(self._epoch_phase)
        for kind, key in (("gpu", "cloudmask_gpu_energy_j"), ("cpu", "cloudmask_cpu_energy_j")):
            joules = self.meter.epoch_joules(f"epoch {self._epoch}", kind)
            if joules is not None:
                self.mlog.event(key, joules, epoch_num=self._epoch, method=self.meter.source(kind).method)

    def columns(self, epoch) -> dict:
        name = f"epoch {epoch + 1}"
        return {"energy_j": self.meter.epoch_joules(name, "gpu"), "cpu_energy_j": self.meter.epoch_joules(name, "cpu"),
                "energy_above_idle_j": self.meter.joules_above_idle(name, "gpu")}


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping on val_loss whose wait/best counters are restored on resume."""

    def __init__(self, restored: dict | None = None, best_weights_file: Path | None = None, **kwargs):
        super().__init__(monitor="val_loss", mode="min", **kwargs)
        self._restored = restored
        self._best_weights_file = best_weights_file

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self._restored:
            self.wait = self._restored["wait"]
            self.best = self._restored["best"]
            self.best_epoch = self._restored["best_epoch"]
            if self.restore_best_weights and self._best_weights_file:
                self.best_weights = keras.models.load_model(self._best_weights_file, compile=False).get_weights()

    def state(self) -> dict:
        return {"wait": self.wait, "best": self.best, "best_epoch": self.best_epoch}


class TargetStopper(keras.callbacks.Callback):
    """train.target: training stops at the end of the first epoch whose metric reaches the target; the epoch goes
    into the run's state (committed with that epoch's checkpoint, so a resume does not train on)."""

    def __init__(self, metric: str, value: float, state: RunState):
        super().__init__()
        self.metric, self.value, self.state = metric, value, state

    def reached(self, logs) -> bool:
        measured = logs.get(self.metric)
        if measured is None:
            return False
        return measured >= self.value if self.metric == "val_accuracy" else measured <= self.value

    def on_epoch_end(self, epoch, logs=None):
        if self.state.target_epoch is None and self.reached(logs or {}):
            self.state.reach_target(epoch + 1)
            self.model.stop_training = True
            log.info("quality target reached at epoch %d: %s %.4f (target %s %g)", epoch + 1, self.metric,
                     logs[self.metric], ">=" if self.metric == "val_accuracy" else "<=", self.value)


class Checkpointer(keras.callbacks.Callback):
    """After every epoch ``checkpoints/latest-epochNNNN.keras`` (+ ``best-epochNNNN.keras`` when val_loss
    improves), then ``state.json`` as the commit point; a crash between the two leaves the previous consistent
    pair, and older files are removed only after the commit."""

    def __init__(self, run: RunDir, state: RunState, early_stopping: ResumableEarlyStopping | None):
        super().__init__()
        self.run, self.state, self.early_stopping = run, state, early_stopping

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        val_loss = float(logs["val_loss"])
        state = self.state
        stale = [state.latest] if state.latest else []
        latest = f"checkpoints/latest-epoch{done:04d}.keras"
        save_model(self.model, self.run / latest)
        written = [latest]
        best = None
        if state.best_val_loss is None or val_loss < state.best_val_loss:
            best = (f"checkpoints/best-epoch{done:04d}.keras", val_loss)
            save_model(self.model, self.run / best[0])
            written.append(best[0])
            stale += [state.best] if state.best else []
        es = self.early_stopping
        state.commit_epoch(done, latest, best, es.state() if es is not None else None,
                           stopped_early=bool(self.model.stop_training) and state.target_epoch != done,
                           sha256={name: fileio.file_sha256(self.run / name) for name in written})
        state.commit()
        for name in stale:
            (self.run / name).unlink(missing_ok=True)


def save_model(model: keras.Model, target: Path) -> None:
    """Keras 3 archive (weights + optimizer state), written atomically."""
    with fileio.atomic_path(target, suffix=".keras") as tmp:
        model.save(tmp)


class Interrupter(keras.callbacks.Callback):
    """A stop request (signals.StopSignals) becomes a clean stop at the next batch; the partial epoch is
    discarded and a resumed run repeats it from the last checkpoint with the same order."""

    def __init__(self, stop: StopSignals):
        super().__init__()
        self.stop = stop

    def _check(self, batch=None, logs=None):
        if self.stop.requested:
            raise StopTraining()

    on_train_batch_end = _check
    on_test_batch_end = _check


def load_checkpoint(path: Path) -> keras.Model:
    if not path.is_file():
        raise RunDirError(f"{path}: checkpoint missing", "it was removed or never written: start a new run "
                          "(the run directory is left as it is)")
    try:
        return keras.models.load_model(path)
    except Exception as e:  # Keras raises many types for a damaged archive; all mean the same to the user
        raise RunDirError(f"{path}: checkpoint cannot be loaded ({type(e).__name__}: {str(e)[:200]})",
                          "the file is damaged; start a new run (the run directory is left as it is)") from None


class StepTimer(keras.callbacks.Callback):
    """Seconds of the training steps after the first ``warmup`` (tracing, compilation, first reads excluded)."""

    def __init__(self, warmup: int):
        super().__init__()
        self.warmup = warmup
        self.t0 = self.t1 = 0.0

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.warmup - 1:
            # JAX dispatches steps ahead of the device: wait for the last warm-up step before starting the clock
            for value in (logs or {}).values():
                np.asarray(value)
            self.t0 = time.perf_counter()

    def on_train_end(self, logs=None):
        self.t1 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0


class ProgressLines(keras.callbacks.Callback):
    """Training and validation progress as plain lines (progress.py) where Keras's bar would be a wall of
    carriage returns: SLURM output files, nohup, CI logs."""

    def __init__(self, epochs: int, train_steps: int, val_steps: int, patches_per_step: float,
                 interval_s: float = 30.0):
        super().__init__()
        self.epochs, self.train_steps, self.val_steps = epochs, train_steps, val_steps
        self.patches_per_step, self.interval_s = patches_per_step, interval_s
        self._epoch = 0
        self._bar: Progress | None = None

    def _start(self, what: str, steps: int) -> None:
        self._bar = Progress(f"epoch {self._epoch}/{self.epochs} {what}", steps, mode="lines",
                             items_per_step=self.patches_per_step, interval_s=self.interval_s)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch + 1
        self._start("training", self.train_steps)

    def on_train_batch_end(self, batch, logs=None):
        if self._bar is not None:
            self._bar.update(batch + 1)

    def on_test_begin(self, logs=None):
        self._start("validation", self.val_steps)

    def on_test_batch_end(self, batch, logs=None):
        if self._bar is not None:
            self._bar.update(batch + 1)
