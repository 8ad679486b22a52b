"""One run of the benchmark, phase by phase: open → prepare (framework, data, model) → start → train → infer →
finish → close.

Every mode (modes.py) is this session with some phases switched on:

* ``train`` / ``bench``: all of them. ``--resume`` and a requeued job re-enter at the phase state.json recorded;
  the MLPerf init block is then in the log already.
* ``infer``: prepare (the test images and a trained run's model) → infer → finish, in a new run directory.
* ``bench --mode throughput``: prepare → timed training steps and scoring in memory, in a scratch run directory
  that is removed (a benchmark mode inside the run's own loop, as NVIDIA's UNet does it).
* ``distribute.strategy=multi_worker``: every worker runs the same session. Only the chief's run directory is
  kept; the others write into scratch directories, resume from the chief's checkpoints and hand their
  timings and energy to the chief.

The session owns the run directory, its state (state.py), the MLPerf log, the telemetry and the cluster, and
opens every timer phase itself. ``finish`` closes the telemetry and then writes results.json once, energy
included; a run that stops with an error gets a ``failed``/``interrupted`` results.json when the session closes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from mlperf_logging.mllog import constants as C

from .. import __version__
from ..campaign.doctor import preflight
from ..cli import console
from ..config import Config
from ..dataset import checksums
from ..dataset.files import find_files
from ..errors import CloudmaskError, OutputError, TrainingInterrupted
from ..inference import evaluate
from ..inputs import run_inputs
from ..telemetry.energy import combine_energy, merge_energy
from ..telemetry.run_telemetry import RunTelemetry
from ..training import cluster as cluster_lib
from ..training import distribution, runtime
from .mlperf import MLPerfLog, division, log_hyperparameters, log_submission, platform_name, run_status
from .opening import connect, open_for_training
from .results import RunRecord, inference_results, reference_log_lines, reference_result, training_results
from .run_dir import MLPERF_LOG, MODEL, RunDir
from .signals import StopSignals
from .state import RunState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mode:
    name: str
    records: bool  # MLPerf log, resume bookkeeping, a results.json also when a phase fails
    measures: bool  # energy, the manifest and the timer table
    trains: bool  # a distribution plan and a precision policy


TRAIN = Mode("train", records=True, measures=True, trains=True)
INFERENCE = Mode("inference", records=False, measures=True, trains=False)
THROUGHPUT = Mode("throughput", records=False, measures=False, trains=True)


def _framework():
    """The modules that import Keras, imported when a run's init phase starts: timed as part of init, and never
    paid for by the commands that do not train or score."""
    from ..training import callbacks, fit, model

    return SimpleNamespace(callbacks=callbacks, model=model, fit=fit)


class RunSession:
    def __init__(self, cfg: Config, run_dir: RunDir, state: RunState, mode: Mode = TRAIN, cluster=None,
                 checkpoints: Path | None = None):
        self.cfg, self.run_dir, self.state, self.mode, self.cluster = cfg, run_dir, state, mode, cluster
        self.checkpoints = checkpoints or run_dir.path  # a non-chief worker resumes from the chief's files
        self.resumed = state.run_started
        self.plan: distribution.DistributionPlan | None = None
        self.devices: list[str] = []
        self.hosts: list[dict] = []
        self.inputs: run_inputs.RunInputs | None = None
        self.test_images: evaluate.TestImages | None = None
        self.model = None
        self.worker: dict | None = None  # this worker's training share (multi-worker)
        self.test: dict | None = None
        self._energy: dict | None = None  # set when the telemetry is closed

    # ------------------------------------------------------------------------------------------- opening

    @classmethod
    def for_training(cls, cfg: Config | None, out=None, resume: bool = False, changes: dict | None = None):
        """A new run directory at ``out`` (or the default name), or the run at ``out`` to resume: its saved
        config is used, and ``changes`` ({"config", "overrides", "values"}) must not change it."""
        runtime.quiet_tensorflow()
        console.setup()
        preflight(str(Path(out).parent) if out else (cfg.output.root if cfg else "."))
        opened = open_for_training(cfg, out, resume, changes)
        return cls(opened.cfg, opened.run_dir, opened.state, TRAIN, opened.cluster, opened.checkpoints)

    @classmethod
    def for_inference(cls, cfg: Config, out: Path):
        runtime.quiet_tensorflow()
        console.setup()
        run_dir = RunDir.create(out, cfg)
        return cls(cfg, run_dir, RunState(path=None), INFERENCE)  # an inference run has nothing to resume

    @classmethod
    def for_throughput(cls, cfg: Config):
        """No run directory is kept: the session's files go to a scratch directory removed at the end."""
        runtime.quiet_tensorflow()
        console.setup()
        return cls(cfg, RunDir.create_scratch(cfg, "cloudmask-throughput-"), RunState(), THROUGHPUT, connect(cfg))

    def __enter__(self) -> "RunSession":
        self._console = console.attach(self.run_dir)
        self.mlog = MLPerfLog(self.run_dir / MLPERF_LOG if self.mode.records else Path(os.devnull))
        self.tel = RunTelemetry(self.cfg, self.run_dir.path, self.state.begin_attempt(), energy=self.mode.measures)
        self.tel.start()
        self._t_start = time.time()
        # a throughput measurement keeps the default handlers: it has nothing to save
        self.stop = StopSignals().install() if self.mode is not THROUGHPUT else StopSignals()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.mode.records and isinstance(exc, CloudmaskError):
                log.error("run stopped: %s", exc)
                self._write_stopped(exc)
            if self._energy is None:
                try:
                    self._close_telemetry(keep=exc is not None and self.mode is TRAIN and self.is_chief)
                except OutputError as late:  # the disk filled while closing
                    if exc is not None:
                        log.warning("while stopping: %s", late)  # the first error is the one reported
                        return
                    if self.mode.records:
                        self._write_stopped(late)
                    raise
            if self.mode.measures:
                self.tel.show_timers(log)
        finally:
            if self.inputs is not None:
                self.inputs.close()  # a cache entry still being built is removed, never left half-made
            elif self.test_images is not None:
                self.test_images.close()
            self.stop.uninstall()
            self.mlog.close()
            console.detach(self._console)
            self.run_dir.release()
            self.run_dir.remove()  # only a scratch directory is removed

    @property
    def is_chief(self) -> bool:
        return self.cluster is None or self.cluster.is_chief

    # ------------------------------------------------------------------------------------ preparing a run

    def prepare(self, stage_to=None, distributed: bool = True) -> None:
        """The init phase: the framework and devices, the inputs (staged to ``stage_to`` first) and the model
        (``distributed``: its variables made under the plan's strategy)."""
        with self.tel.phase("init"):
            with self.tel.phase("framework", window=None):
                self._init_framework()
            with self.tel.phase("data", window=None):
                self._open_inputs(stage_to)
            with self.tel.phase("model", window=None):
                self.load_model(distributed=distributed)

    def prepare_inference(self, test_dir: Path, model_file: Path) -> None:
        """The init phase of an inference run: the test images alone, the manifest, the trained model."""
        with self.tel.phase("init"):
            self._init_framework()
            files = find_files(test_dir)[: self.cfg.infer.max_files or None]
            self.test_images = run_inputs.raw_test_images(self.cfg, test_dir, files)
            self.tel.write_provenance(test_dir.parent, checksums.checksums_digest(test_dir.parent),
                                      {"test_dir": str(test_dir), "test_files": len(files)})
            self.load_model(model_file)

    def _init_framework(self) -> None:
        """The framework, the distribution plan, seeds, precision and devices; the MLPerf init block opens."""
        if self.mode.records and not self.resumed:
            self.mlog.start(C.INIT_START)
        self.fw = _framework()
        for note in self.cfg.notes:
            log.info("note: %s", note)
        if self.mode.trains:
            self.cfg, self.plan = distribution.resolve(self.cfg, self.cluster)
            self.state.record_plan(self.plan.replicas, self.plan.strategy, self.plan.global_batch)
            runtime.set_precision(self.cfg.train.precision)
        runtime.seed_everything(self.cfg.seed, self.cfg.train.deterministic)
        self.devices = runtime.accelerators()
        if self.mode.records:
            mine = {"host": socket.gethostname(), "devices": self.devices}
            self.hosts = self.cluster.exchange(mine) if self.cluster is not None else [mine]
            self.state.record_topology({"source": self.cluster.source if self.cluster else "single",
                                        **cluster_lib.describe_workers(self.hosts)})

    def _open_inputs(self, stage_to=None) -> None:
        """The training, validation and test inputs (staged to ``stage_to`` first), and the manifest."""
        shard = self.plan.shard if self.plan else (0, 1)
        self.inputs = run_inputs.open_inputs(self.cfg, self.state.epochs_done, shard, stage_to, self._staged)
        self.test_images = self.inputs.test
        if self.mode.measures:
            self.tel.write_provenance(self.inputs.dataset_root, self.inputs.dataset_digest, self.inputs.facts)
        if self.mode.records:
            self._announce()

    def _announce(self) -> None:
        i = self.inputs
        log.info("cloudmask %s  run %s  backend %s  devices: %s", __version__, self.run_dir.path, runtime.backend(),
                 ", ".join(self.devices) or "CPU")
        log.info("data: %d training files (%d patches), %d validation files (%d patches), layout %s",
                 len(i.train_files), i.train_patches, len(i.val_files), i.val_patches, i.layout)
        for source in self.tel.meter.sources:
            log.info("%s energy: %s", source.kind.upper(),
                     source.method if source.method != "none" else f"none ({source.reason})")

    def _staged(self, copy):
        """``copy() -> (staged thing, files.Staging)`` as the timed, MLPerf-logged staging step of init."""
        with self.tel.phase("stage data", window=None):
            self.mlog.start(C.STAGING_START)
            result, staged = copy()
            self.mlog.end(C.STAGING_STOP, files=staged.files, copied=staged.copied, bytes=staged.bytes)
        log.info("staged %d files (%d copied, %.1f MB) to %s in %.1f s", staged.files, staged.copied,
                 staged.bytes / 1e6, staged.dest, staged.seconds)
        self.state.record_staging({"dest": str(staged.dest), "files": staged.files, "copied": staged.copied,
                                   "bytes": staged.bytes, "seconds": staged.seconds})
        return result

    def load_model(self, source: Path | None = None, distributed: bool = True) -> None:
        """``source`` (a trained model file), else the run's: resumed from its latest checkpoint, built new, or
        its final model when training is over. ``distributed``: variables made under the plan's strategy."""
        state, fw = self.state, self.fw
        scope = self.plan.scope() if self.plan is not None and distributed else contextlib.nullcontext()
        with scope:  # variables are created (mirrored) inside the strategy's scope
            if source is not None:
                self.model = fw.callbacks.load_checkpoint(source)
            elif state.phase == "training" and state.latest:
                self.model = fw.callbacks.load_checkpoint(self.checkpoints / state.latest)
                log.info("resuming after epoch %d from %s", state.epochs_done, state.latest)
            elif state.phase == "training":
                self.model = fw.model.compile_model(fw.model.build_from_config(self.cfg),
                                                    self.cfg.effective_learning_rate, self.cfg.accumulation_steps,
                                                    self.cfg.train.jit_compile)
            else:
                self.model = fw.callbacks.load_checkpoint(self.checkpoints / MODEL)
            if self.cluster is not None and distributed and not self.model.optimizer.built:
                self.model.optimizer.build(self.model.trainable_variables)  # its slots mirrored too

    # ---------------------------------------------------------------------------------------- the run

    def start(self) -> None:
        """The idle baseline; then the MLPerf init block closes and the run starts (or a resume is logged)."""
        meter = self.tel.meter
        if self.state.phase == "training" and meter.active and self.cfg.telemetry.idle_seconds > 0:
            with self.tel.phase("idle baseline", window=None):
                meter.measure_idle(self.cfg.telemetry.idle_seconds)
            for kind, watts in meter.idle_w.items():
                log.info("idle %s power: %s W", kind.upper(), ", ".join(f"{w:.1f}" for w in watts))
        if not self.resumed:
            topology = self.state.topology
            backend = runtime.backend()
            log_submission(self.mlog, self.cfg, platform_name(self.cfg, self.devices, topology["nodes"]),
                           division(self.cfg, backend))
            self.mlog.event(C.CACHE_CLEAR, False)  # the page cache is not dropped (needs root); logged honestly
            log_hyperparameters(self.mlog, self.cfg, self.inputs.train_patches, self.inputs.val_patches, topology,
                                self.state.replicas, backend)
            self.mlog.end(C.INIT_STOP)
            self.mlog.start(C.RUN_START)
            self.state.start_run()
        else:
            self.mlog.event("cloudmask_resume", self.state.epochs_done, attempt=self.state.attempts,
                            phase=self.state.phase)
        self.state.commit()

    def train(self) -> None:
        """Training to the configured epochs (unless it is over already), the final model, and under a cluster
        every worker's share handed to the chief."""
        if self.state.phase == "training":
            with self.tel.phase("train", window=None):
                telemetry = self.fw.callbacks.PhaseTelemetry(self.tel, self.mlog)
                context = self.fw.fit.FitContext(self.run_dir, self.mlog, self.state, self.stop, self.cluster,
                                                 self.checkpoints)
                self.worker = self.fw.fit.train_run(self.cfg, self.model, self.inputs, context, [telemetry])
                if self.is_chief:
                    self.fw.callbacks.save_model(self.model, self.run_dir / MODEL)
            self.state.end_training(infer=self.cfg.infer.enabled)
            self.state.commit()
        if self.cluster is not None and self.cluster.workers > 1:
            self._gather_workers()

    def _gather_workers(self) -> None:
        """Every worker's share of the training, and its node's energy (measured up to here), to the chief."""
        rank = self.cluster.rank
        report = {"rank": rank, **self.hosts[rank], **(self.worker or {"train_s": None, "patches": None}),
                  "energy": None}
        if not self.cluster.is_chief:
            report["energy"] = {**self.tel.energy_so_far(), "host": report["host"]}
        self.state.record_workers(self.cluster.exchange(report))

    def hand_over(self) -> dict:
        """A non-chief worker's end: the chief writes the results."""
        log.info("worker %d done; the chief writes the results", self.cluster.rank)
        return {"worker_of": str(self.checkpoints), "rank": self.cluster.rank}

    def infer(self) -> None:
        """Inference and scoring of the test images (``infer.max_files`` of them), masks into the run."""
        if not self.cfg.infer.enabled:
            return
        images = self.test_images.first(self.cfg.infer.max_files)
        if self.cluster is not None:  # predict() on the mirrored model would wait for the workers, which have left
            self.model = self.fw.callbacks.load_checkpoint(self.run_dir / MODEL)
        epoch_num = self.state.epochs_done
        self.mlog.start(C.EVAL_START, "inference", epoch_num=epoch_num)
        with self.tel.phase("inference"):
            self.test = self.score(images, self.run_dir / "masks")
        self._stop_if_asked("inference")
        self.mlog.end(C.EVAL_STOP, "inference", epoch_num=epoch_num)
        if self.mode.records:
            log.info("test: avg_accuracy %.4f over %d files (majority-class baseline %.4f), %.2f s per image",
                     self.test["avg_accuracy"], self.test["files"], self.test["majority_baseline"],
                     self.test["time_per_inference_s"])

    def score(self, images: evaluate.TestImages, masks: Path | None = None) -> dict | None:
        """The test section; None when a stop was requested between images."""
        return evaluate.evaluate(self.model, images, self.cfg, masks, stop_requested=lambda: self.stop.requested)

    def _stop_if_asked(self, during: str) -> None:
        if self.stop.requested:
            raise TrainingInterrupted(self.stop.signum, self.state.epochs_done, self.run_dir.path, during)

    # ------------------------------------------------------------------ what the throughput mode asks for

    @property
    def step_batch(self) -> int:
        """Patches per optimizer step on every worker together (the plan's step batch)."""
        return self.plan.step_batch

    def forward_flops(self) -> float:
        return self.fw.model.forward_flops(self.model)

    def time_training(self, warmup: int, steps: int, together: bool = True) -> float:
        """Seconds of ``steps`` training steps after ``warmup``; ``together=False``: this worker alone."""
        workers = None
        if together and self.cluster is not None:
            workers = self.fw.fit.Workers(self.cluster, self.cfg.train.batch_size)
        with self.tel.phase("train", window=None):
            return self.fw.fit.time_steps(self.model, self.inputs.train_stream, warmup, steps, workers)

    # ------------------------------------------------------------------------------------------ finishing

    def history(self) -> list[dict]:
        return self.run_dir.read_history()[: self.state.epochs_done]

    def finish(self) -> dict:
        """The telemetry closes; then results.json is written once (energy included), the reference's result
        record and run_stop go into the MLPerf log, and the state says the run is done. Once this begins a stop
        request waits: the writes take well under a second and leave a finished run."""
        self._stop_if_asked("inference" if self.cfg.infer.enabled else "training")
        history = self.history()
        energy = self._close_telemetry()
        reference_s = self.tel.seconds_in("run/init/data", "run/init/model", "run/train")
        record = RunRecord(self.cfg, self.state, history, self.inputs, self.devices, self.test,
                           time.time() - self._t_start, reference_s)
        results = training_results(record, "success")
        results["energy"] = self._run_energy(energy, history)
        self.run_dir.write_results(results)
        self.mlog.event("result", reference_result(record, results))
        self.mlog.end(C.RUN_STOP, status=run_status(self.cfg, self.state.target_epoch))
        self.state.finish()
        self.state.commit()
        for line in reference_log_lines(record, results):
            log.info(line)
        return results

    def finish_inference(self, source_run: Path, checkpoint: str, model_file: Path) -> dict:
        results = inference_results(self.cfg, source_run, checkpoint, model_file, self.test, self.devices)
        results["energy"] = self._close_telemetry()
        self.run_dir.write_results(results)
        log.info("test: avg_accuracy %.4f over %d files; results in %s", self.test["avg_accuracy"],
                 self.test["files"], self.run_dir.path)
        return results

    def _close_telemetry(self, keep: bool = False) -> dict:
        """Stop measuring; ``keep``: this attempt's energy goes into the state for the attempt that finishes."""
        if self.mode.measures and self.tel.manifest is None:
            # stopped before its inputs opened: the host, GPU, job and command of a failed run are still recorded
            self.tel.write_provenance(None, None, {})
        self._energy = self.tel.finish()
        if keep:
            self.state.keep_energy(self._energy)
            self.state.commit(step_done=False)
        return self._energy

    def _run_energy(self, energy: dict, history: list[dict]) -> dict:
        """This attempt's energy, with every other worker's and the earlier attempts' merged in."""
        several = self.cluster is not None and self.cluster.workers > 1
        if several:
            energy = combine_energy([{**energy, "host": socket.gethostname()}] +
                                    [r["energy"] for r in self.state.worker_reports[1:]])
        return merge_energy(energy, self.state.energy_attempts, history, per_epoch_from_history=not several)

    def _write_stopped(self, error: CloudmaskError) -> None:
        """A ``failed``/``interrupted`` results.json, where the disk still has room for it."""
        status = "interrupted" if isinstance(error, TrainingInterrupted) else "failed"
        record = RunRecord(self.cfg, self.state, self.history())
        try:
            self.run_dir.write_results(training_results(record, status, str(error)))
        except OutputError as e:
            log.warning("results.json not written: %s", e)
