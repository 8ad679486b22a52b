"""Training: Keras ``fit`` over the streaming pipeline, instrumented with callbacks.

* ``EpochRecorder``: per-epoch wall time (train and validation parts), samples/s, ``history.csv``, MLPerf
  epoch/eval events, one console line per epoch.
* ``Checkpointer``: after every epoch ``checkpoints/latest-epochNNNN.keras`` (+ ``best-epochNNNN.keras`` when
  val_loss improves), then ``state.json`` as the commit point; a crash between the two leaves the previous
  consistent pair, and older files are removed only after the commit.
* ``ResumableEarlyStopping``: Keras EarlyStopping whose counters survive ``--resume``.
* ``Interrupter``: SIGTERM/SIGUSR1 end training at the next batch; the partial epoch is discarded and a resumed
  run repeats it from the last checkpoint with the same data order.
"""

from __future__ import annotations

import csv
import io
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
from mlperf_logging.mllog import constants as C

from . import data, fileio, pipeline
from .distributed import StopTraining
from .errors import CloudmaskError, RunDirError
from .experiments import HISTORY, RunDir
from .preprocess import Geometry

log = logging.getLogger(__name__)

HISTORY_FIELDS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "epoch_s", "train_s", "val_s",
                  "samples_per_s"]


class TrainingInterrupted(CloudmaskError):
    """Training was stopped by a signal; the run can be resumed."""

    def __init__(self, signum: int, epochs_done: int, run: Path):
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: training stopped after {epochs_done} completed epoch(s); "
                         f"checkpoint kept in {run}", f"continue with `cloudmask train --resume --out {run}`")
        self.signum = signum
        self.exit_code = 128 + signum


@dataclass
class TrainData:
    train_files: list[Path]
    val_files: list[Path]
    train_stream: pipeline.PatchStream
    val_stream: pipeline.PatchStream

    @property
    def train_patches(self) -> int:
        return self.train_stream.patches

    @property
    def val_patches(self) -> int:
        return self.val_stream.patches


def prepare_data(cfg, train_dir: Path, start_epoch: int = 0) -> TrainData:
    """Sorted files, the reference's file split, header screening, and the two streams."""
    geometry = Geometry.from_config(cfg)
    files = data.find_files(train_dir)
    train_files, val_files = data.split_files(files, cfg.data.train_split, cfg.data.split_seed)
    # Screen after splitting, so skipping a bad file never changes which files are validation files.
    train_files = pipeline.screen_files(train_files, geometry, cfg.data.skip_bad, "training")
    val_files = pipeline.screen_files(val_files, geometry, cfg.data.skip_bad, "validation")
    common = dict(geometry=geometry, normalisation=cfg.data.normalisation, batch_size=cfg.train.batch_size,
                  seed=cfg.seed, read_threads=cfg.data.read_threads, min_finite_fraction=cfg.data.min_finite_fraction,
                  skip_bad=cfg.data.skip_bad, micro_batches=cfg.accumulation_steps)
    train_stream = pipeline.PatchStream(train_files, shuffle=True, window_files=cfg.train.shuffle_buffer_files,
                                        start_epoch=start_epoch, what="training", **common)
    val_stream = pipeline.PatchStream(val_files, shuffle=False, what="validation", **common)
    return TrainData(train_files, val_files, train_stream, val_stream)


def prepare_store_data(cfg, st, start_epoch: int = 0, shard: tuple[int, int] = (0, 1)) -> TrainData:
    """The two streams over a patch store (already split and screened when it was prepared); ``shard``: this
    worker's (index, count) when several train together (each reads only its rows of every batch)."""
    from .store import StoreStream

    common = dict(batch_size=cfg.train.batch_size, seed=cfg.seed, read_threads=max(2, cfg.data.read_threads),
                  micro_batches=cfg.accumulation_steps, resident=cfg.data.resident, shard=shard)
    train_stream = StoreStream(st, "train", shuffle=True, order=cfg.train.shuffle,
                               window_files=cfg.train.shuffle_buffer_files, start_epoch=start_epoch, **common)
    val_stream = StoreStream(st, "val", shuffle=False, **common)
    return TrainData([Path(f) for f in st.files("train")], [Path(f) for f in st.files("val")], train_stream,
                     val_stream)


# ----------------------------------------------------------------------------------------------- history


def read_history(run: RunDir) -> list[dict]:
    path = run / HISTORY
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: (None if v == "" else int(v) if k == "epoch" else float(v)) for k, v in row.items()}
                for row in csv.DictReader(f)]


def write_history(run: RunDir, rows: list[dict]) -> None:
    buf = io.StringIO()
    fields = HISTORY_FIELDS + [k for k in (rows[0] if rows else {}) if k not in HISTORY_FIELDS]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    fileio.write_text(run / HISTORY, buf.getvalue())


# --------------------------------------------------------------------------------------------- callbacks


class EpochRecorder(keras.callbacks.Callback):
    def __init__(self, run: RunDir, mlog, samples_per_epoch: int, history: list[dict], epochs: int):
        super().__init__()
        self.run, self.mlog, self.samples, self.history, self.epochs = run, mlog, samples_per_epoch, history, epochs
        self._t0 = self._tval = 0.0
        self.extra_columns = []  # callables (epoch) -> dict merged into the row (telemetry adds energy here)

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
               "samples_per_s": self.samples / train_s if train_s > 0 else None}
        for extra in self.extra_columns:
            row.update(extra(epoch))
        self.history.append(row)
        write_history(self.run, self.history)
        self.mlog.end(C.EPOCH_STOP, epoch_num=epoch + 1)
        self.mlog.event(C.EVAL_ACCURACY, logs.get("val_accuracy"), epoch_num=epoch + 1)
        log.info("epoch %d/%d  loss %.4f  accuracy %.4f  val_loss %.4f  val_accuracy %.4f  %.1f s  %.1f patches/s",
                 epoch + 1, self.epochs, row["loss"], row["accuracy"], row["val_loss"], row["val_accuracy"],
                 row["epoch_s"], row["samples_per_s"] or 0.0)


class PhaseTelemetry(keras.callbacks.Callback):
    """Energy windows and timers for every epoch and its validation; energy columns for history.csv and an
    MLPerf energy event per epoch. Must come before EpochRecorder, which reads the closed epoch window."""

    def __init__(self, meter, timers, mlog):
        super().__init__()
        self.meter, self.timers, self.mlog = meter, timers, mlog
        self._epoch_timer = self._val_timer = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch + 1
        self._epoch_timer = self.timers.start(f"epoch {self._epoch}")
        self.meter.begin(f"epoch {self._epoch}")

    def on_test_begin(self, logs=None):
        self._val_timer = self.timers.start("validation")
        self.meter.begin(f"validation {self._epoch}")

    def on_test_end(self, logs=None):
        self.meter.end(f"validation {self._epoch}")
        self.timers.stop(self._val_timer)

    def on_epoch_end(self, epoch, logs=None):
        self.meter.end(f"epoch {self._epoch}")
        self.timers.stop(self._epoch_timer)
        for kind, key in (("gpu", "cloudmask_gpu_energy_j"), ("cpu", "cloudmask_cpu_energy_j")):
            joules = self.meter.epoch_joules(f"epoch {self._epoch}", kind)
            if joules is not None:
                self.mlog.event(key, joules, epoch_num=self._epoch, method=self.meter.source(kind).method)

    def columns(self, epoch) -> dict:
        name = f"epoch {epoch + 1}"
        return {"energy_j": self.meter.epoch_joules(name, "gpu"), "cpu_energy_j": self.meter.epoch_joules(name, "cpu")}


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


class Checkpointer(keras.callbacks.Callback):
    def __init__(self, run: RunDir, state: dict, early_stopping: ResumableEarlyStopping | None):
        super().__init__()
        self.run, self.state, self.early_stopping = run, state, early_stopping

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        val_loss = float(logs["val_loss"])
        stale = []
        latest = f"checkpoints/latest-epoch{done:04d}.keras"
        save_model(self.model, self.run / latest)
        if self.state.get("latest"):
            stale.append(self.state["latest"])
        if self.state.get("best_val_loss") is None or val_loss < self.state["best_val_loss"]:
            best = f"checkpoints/best-epoch{done:04d}.keras"
            save_model(self.model, self.run / best)
            if self.state.get("best"):
                stale.append(self.state["best"])
            self.state.update(best=best, best_epoch=done, best_val_loss=val_loss)
        self.state.update(latest=latest, epochs_done=done)
        if self.early_stopping is not None:
            self.state["early_stopping"] = self.early_stopping.state()
            self.state["stopped_early"] = bool(self.model.stop_training)
        self.run.write_state(self.state)
        for name in stale:
            (self.run / name).unlink(missing_ok=True)


def save_model(model: keras.Model, target: Path) -> None:
    """Keras 3 archive (weights + optimizer state), written atomically."""
    with fileio.atomic_path(target, suffix=".keras") as tmp:
        model.save(tmp)


class Interrupter(keras.callbacks.Callback):
    """Turns SIGTERM/SIGUSR1 into a clean stop at the next batch (the signal handler itself only sets a flag)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        super().__init__()
        self.signum: int | None = None
        self._previous = {}

    def install(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        self.signum = signum

    def _check(self, batch=None, logs=None):
        if self.signum is not None:
            raise StopTraining()

    on_train_batch_end = _check
    on_test_batch_end = _check


# --------------------------------------------------------------------------------------------------- fit


def load_checkpoint(path: Path) -> keras.Model:
    try:
        return keras.models.load_model(path)
    except Exception as e:  # Keras raises many types for a damaged archive; all mean the same to the user
        raise RunDirError(f"{path}: checkpoint cannot be loaded ({type(e).__name__}: {str(e)[:200]})",
                          "the file is damaged; start a new run (the run directory is left as it is)") from None


@dataclass
class FitOutcome:
    history: list[dict]
    epochs_run: int
    stopped_early: bool
    fit_s: float
    callbacks: list = field(default_factory=list)
    worker: dict | None = None  # multi-worker: this worker's time in training steps and patches fed


def fit(cfg, run: RunDir, model: keras.Model, td: TrainData, mlog, state: dict,
        extra_callbacks: list | None = None, cluster=None, checkpoints: Path | None = None) -> FitOutcome:
    """Train from ``state['epochs_done']`` to ``cfg.train.epochs``; ``state`` is updated and committed per epoch.

    ``cluster`` (distributed.Cluster): train as one of several workers with the multi-worker loop; only the
    chief checkpoints. ``checkpoints``: the run directory checkpoints are read from when it is not ``run``
    (a non-chief worker writes into a scratch directory but resumes from the chief's files)."""
    chief = cluster is None or cluster.is_chief
    history = read_history(run)[: state.get("epochs_done", 0)]
    start = state.get("epochs_done", 0)
    recorder = EpochRecorder(run, mlog, td.train_stream.batches * cfg.train.batch_size, history, cfg.train.epochs)
    es = None
    if cfg.train.early_stopping.enabled:
        es_cfg = cfg.train.early_stopping
        es = ResumableEarlyStopping(restored=state.get("early_stopping"),
                                    best_weights_file=(checkpoints or run.path) / state["best"]
                                    if state.get("best") else None,
                                    patience=es_cfg.patience, min_delta=es_cfg.min_delta,
                                    restore_best_weights=es_cfg.restore_best_weights)
    interrupter = Interrupter()
    extra_callbacks = list(extra_callbacks or [])
    recorder.extra_columns = [cb.columns for cb in extra_callbacks if hasattr(cb, "columns")]
    callbacks = [*extra_callbacks, recorder, *([es] if es else []),
                 *([Checkpointer(run, state, es)] if chief else [])]
    verbose = cfg.train.verbose
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 0
    t0 = time.perf_counter()
    worker = None
    interrupter.install()
    try:
        if cluster is None:
            model.fit(iter(td.train_stream), steps_per_epoch=td.train_stream.steps, epochs=cfg.train.epochs,
                      initial_epoch=start, validation_data=iter(td.val_stream), validation_steps=td.val_stream.steps,
                      callbacks=[*callbacks, interrupter], verbose=verbose, shuffle=False)
        else:
            from . import distributed

            listed = keras.callbacks.CallbackList(callbacks, add_progbar=bool(verbose) and chief, model=model,
                                                  verbose=verbose, epochs=cfg.train.epochs,
                                                  steps=td.train_stream.steps)
            loop = distributed.fit(cluster, model, td.train_stream, td.val_stream, listed, cfg.train.epochs, start,
                                   cfg.train.batch_size, lambda: interrupter.signum is not None)
            worker = {"train_s": loop.train_s, "patches": loop.samples}
            if not chief:  # the chief's Checkpointer keeps the count; the others follow the loop
                state["epochs_done"] = loop.epochs_done
            if loop.stopped:
                raise StopTraining()
    except StopTraining:
        state["fit_s"] = state.get("fit_s", 0.0) + time.perf_counter() - t0
        if chief:
            run.write_state(state)
        # a worker that got no signal itself stops because another did (SLURM signals all of a step's tasks)
        raise TrainingInterrupted(interrupter.signum or signal.SIGTERM, state.get("epochs_done", 0),
                                  (checkpoints or run.path)) from None
    except Exception:
        # tf.data and Keras re-wrap an exception raised in the input generator; surface the original DataError
        for stream in (td.train_stream, td.val_stream):
            if stream.error is not None:
                raise stream.error from None
        raise
    finally:
        interrupter.uninstall()
    fit_s = time.perf_counter() - t0
    state["fit_s"] = state.get("fit_s", 0.0) + fit_s
    if es is not None and es.restore_best_weights and state.get("best"):
        # Keras restores the best weights in memory at train end; say so in the results
        state["restored_best_epoch"] = state.get("best_epoch")
    return FitOutcome(history, len(history), bool(state.get("stopped_early")), state["fit_s"], callbacks, worker)
