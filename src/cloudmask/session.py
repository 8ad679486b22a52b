"""One run of the benchmark, phase by phase: open → init → data → model → start → train → infer → results → close.

Every mode (benchmark.py) is this session with some phases switched on:

* ``train`` / ``bench``: all of them. ``--resume`` and a requeued job re-enter at the phase state.json recorded;
  the MLPerf init block is then in the log already.
* ``infer``: init → model (a trained run's checkpoint) → infer → results, in a new run directory.
* ``bench --mode throughput``: init → data → model → a step-limited train → scoring in memory, in a scratch run
  directory that is removed (a benchmark mode inside the run's own loop, as NVIDIA's UNet does it).
* ``distribute.strategy=multi_worker``: every worker runs the same session. Only the chief's run directory is
  kept; the others write into scratch directories, resume from the chief's checkpoints and hand their
  timings and energy to the chief.

The session owns the run directory, the MLPerf log, the telemetry and the cluster; closing it (``with``) writes
the energy into results.json, or a ``failed``/``interrupted`` results.json when a phase raised.
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

from . import __version__, cluster as cluster_lib, console, data, distribution, evaluate, inputs, manifest, runtime
from .config import Config, flatten, load_config
from .doctor import preflight
from .energy import combine_energy, merge_energy
from .errors import CloudmaskError, ConfigError, OutputError, RunDirError, TrainingInterrupted
from .mlperf import MLPerfLog, division, log_hyperparameters, log_submission, platform_name, run_status
from .results import (inference_results, reference_log_lines, reference_result, stopped_results, target_section,
                      training_results)
from .rundir import MLPERF_LOG, MODEL, RunDir
from .signals import StopSignals
from .telemetry import RunTelemetry

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
    from . import callbacks, model, train

    return SimpleNamespace(callbacks=callbacks, model=model, train=train)


class RunSession:
    def __init__(self, cfg: Config, run_dir: RunDir, state: dict, mode: Mode = TRAIN, cluster=None,
                 checkpoints: Path | None = None):
        self.cfg, self.run_dir, self.state, self.mode, self.cluster = cfg, run_dir, state, mode, cluster
        self.checkpoints = checkpoints or run_dir.path  # a non-chief worker resumes from the chief's files
        self.resumed = bool(state.get("run_started"))
        self.plan: distribution.DistributionPlan | None = None
        self.devices: list[str] = []
        self.hosts: list[dict] = []
        self.inputs: inputs.RunInputs | None = None
        self.model = None
        self.worker: dict | None = None  # this worker's training share (multi-worker)
        self.test: dict | None = None
        self.outcome: dict = {}

    # ------------------------------------------------------------------------------------------- opening

    @classmethod
    def for_training(cls, cfg: Config | None, out=None, resume: bool = False, changes: dict | None = None):
        """A new run directory at ``out`` (or the default name), or the run at ``out`` to resume: its saved
        config is used, and ``changes`` ({"config", "overrides", "values"}) must not change it."""
        runtime.quiet_tensorflow()
        console.setup()
        preflight(str(Path(out).parent) if out else (cfg.output.root if cfg else "."))
        if resume:
            if out is None:
                raise RunDirError("--resume needs the run directory", "pass --out DIR of the run to continue")
            resumed = RunDir.existing(out)
            cfg = _resume_config(resumed, changes)
            _refuse_finished(resumed)
        assert cfg is not None
        cluster = _connect(cfg)

        def check_data() -> None:  # data problems are found before a run directory is created
            if not resume:
                inputs.check(cfg)

        def open_run() -> tuple[RunDir | None, dict]:
            if resume:
                return resumed, resumed.read_state() or {}
            return (RunDir.create(out, cfg) if cluster is None or cluster.is_chief else None), {}

        if cluster is None:
            check_data()
            return cls(cfg, *open_run())
        cluster.settle(check_data)  # every worker must see the data before the chief creates the run directory
        opened, state = cluster.settle(open_run)
        chief_run, state = cluster.exchange([str(opened.path), state] if cluster.is_chief else None)[0]
        if not cluster.is_chief:
            opened = RunDir.create_scratch(cfg, f"cloudmask-worker{cluster.rank}-")
        return cls(cfg, opened, state, TRAIN, cluster, Path(chief_run))

    @classmethod
    def for_inference(cls, cfg: Config, out: Path):
        runtime.quiet_tensorflow()
        console.setup()
        return cls(cfg, RunDir.create(out, cfg), {}, INFERENCE)

    @classmethod
    def for_throughput(cls, cfg: Config, quiet: bool = False):
        """No run directory is kept: the session's files go to a scratch directory removed at the end."""
        runtime.quiet_tensorflow()
        console.setup()
        if quiet:
            console.quiet()  # stdout carries the JSON alone
        cluster = _connect(cfg)
        return cls(cfg, RunDir.create_scratch(cfg, "cloudmask-throughput-"), {}, THROUGHPUT, cluster)

    def __enter__(self) -> "RunSession":
        self._console = console.attach(self.run_dir)
        self.mlog = MLPerfLog(self.run_dir / MLPERF_LOG if self.mode.records else Path(os.devnull))
        self.state["attempts"] = self.state.get("attempts", 0) + 1
        self.tel = RunTelemetry(self.cfg, self.run_dir.path, self.state["attempts"], energy=self.mode.measures)
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
            try:
                self._record_energy(self.tel.finish(log, show_timers=self.mode.measures))
            except OutputError as late:  # the disk filled while closing
                if exc is not None:
                    log.warning("while stopping: %s", late)  # the first error is the one reported
                    return
                if self.mode.records:
                    self._write_stopped(late)
                raise
        finally:
            if self.inputs is not None:
                self.inputs.close()  # a cache entry still being built is removed, never left half-made
            self.stop.uninstall()
            self.mlog.close()
            console.detach(self._console)
            self.run_dir.remove()  # only a scratch directory is removed

    @property
    def is_chief(self) -> bool:
        return self.cluster is None or self.cluster.is_chief

    def phase(self, name: str, energy: bool = True):
        """A timer phase and (``energy``) an energy window of the same name (telemetry.py)."""
        return self.tel.phase(name) if energy else self.tel.phase(name, window=None)

    # ---------------------------------------------------------------------------------------------- phases

    def init(self) -> None:
        """The framework, the distribution plan, seeds, precision and devices; the MLPerf init block opens."""
        if self.mode.records and not self.resumed:
            self.mlog.start(C.INIT_START)
        self.fw = _framework()
        for note in self.cfg.notes:
            log.info("note: %s", note)
        if self.mode.trains:
            self.cfg, self.plan = distribution.resolve(self.cfg, self.cluster)
            self.state.update(replicas=self.plan.replicas, strategy=self.plan.strategy,
                              global_batch_size=self.plan.global_batch)
            runtime.seed_everything(self.cfg.seed, self.cfg.train.deterministic)
            runtime.set_precision(self.cfg.train.precision)
        else:
            runtime.seed_everything(self.cfg.seed, self.cfg.train.deterministic)
        self.devices = runtime.accelerators()
        if self.mode.records:
            self._describe_topology()

    def _describe_topology(self) -> None:
        mine = {"host": socket.gethostname(), "devices": self.devices}
        self.hosts = self.cluster.exchange(mine) if self.cluster is not None else [mine]
        self.state["topology"] = {"source": self.cluster.source if self.cluster else "single",
                                  **cluster_lib.describe_workers(self.hosts)}

    def data(self, stage_to=None) -> None:
        """The training, validation and test inputs (staged to ``stage_to`` first), and the manifest."""
        shard = self.plan.shard if self.plan else (0, 1)
        self.inputs = inputs.open_inputs(self.cfg, self.state.get("epochs_done", 0), shard, stage_to, self._staged)
        if self.mode.measures:
            self.tel.write_manifest(self.inputs.dataset_root, self.inputs.dataset_digest, self.inputs.facts)
        if self.mode.records:
            self._announce()

    def test_data(self, test_dir: Path) -> None:
        """The test images alone (inference of a trained model), and the manifest."""
        images = inputs.raw_test_images(self.cfg, test_dir, _test_files(test_dir, self.cfg.infer.max_files))
        self.inputs = SimpleNamespace(test=images, close=images.close)
        self.tel.write_manifest(test_dir.parent, manifest.manifest_digest(test_dir.parent),
                                {"test_dir": str(test_dir), "test_files": len(images.files)})

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
        """``copy() -> (staged thing, data.Staging)`` as the timed, MLPerf-logged staging step of init."""
        with self.tel.phase("stage data", window=None):
            self.mlog.start(C.STAGING_START)
            result, staged = copy()
            self.mlog.end(C.STAGING_STOP, files=staged.files, copied=staged.copied, bytes=staged.bytes)
        log.info("staged %d files (%d copied, %.1f MB) to %s in %.1f s", staged.files, staged.copied,
                 staged.bytes / 1e6, staged.dest, staged.seconds)
        self.state.setdefault("staging", []).append({"attempt": self.state["attempts"], "dest": str(staged.dest),
                                                     "files": staged.files, "copied": staged.copied,
                                                     "bytes": staged.bytes, "seconds": staged.seconds})
        return result

    def load_model(self, source: Path | None = None, distributed: bool = True) -> None:
        """``source`` (a trained model file), else the run's: resumed from its latest checkpoint, built new, or
        its final model when training is over. ``distributed``: variables made under the plan's strategy."""
        phase = self.state.get("phase", "training")
        scope = self.plan.scope() if self.plan is not None and distributed else contextlib.nullcontext()
        fw = self.fw
        with scope:  # variables are created (mirrored) inside the strategy's scope
            if source is not None:
                self.model = fw.callbacks.load_checkpoint(source)
            elif phase == "training" and self.state.get("latest"):
                self.model = fw.callbacks.load_checkpoint(self.checkpoints / self.state["latest"])
                log.info("resuming after epoch %d from %s", self.state["epochs_done"], self.state["latest"])
            elif phase == "training":
                self.model = fw.model.compile_model(fw.model.build_from_config(self.cfg),
                                                    self.cfg.effective_learning_rate, self.cfg.accumulation_steps,
                                                    self.cfg.train.jit_compile)
            else:
                self.model = fw.callbacks.load_checkpoint(self.checkpoints / MODEL)
            if self.cluster is not None and distributed and not self.model.optimizer.built:
                self.model.optimizer.build(self.model.trainable_variables)  # its slots mirrored too

    def start(self) -> None:
        """The idle baseline; then the MLPerf init block closes and the run starts (or a resume is logged)."""
        phase = self.state.get("phase", "training")
        meter = self.tel.meter
        if phase == "training" and meter.active and self.cfg.telemetry.idle_seconds > 0:
            with self.tel.phase("idle baseline", window=None):
                meter.measure_idle(self.cfg.telemetry.idle_seconds)
            for kind, watts in meter.idle_w.items():
                log.info("idle %s power: %s W", kind.upper(), ", ".join(f"{w:.1f}" for w in watts))
        if not self.resumed:
            topology = self.state["topology"]
            log_submission(self.mlog, self.cfg, platform_name(self.cfg, self.devices, topology["nodes"]),
                           division(self.cfg))
            self.mlog.event(C.CACHE_CLEAR, False)  # the page cache is not dropped (needs root); logged honestly
            log_hyperparameters(self.mlog, self.cfg, self.inputs.train_patches, self.inputs.val_patches,
                                nodes=topology["nodes"], accelerators_per_node=topology["accelerators_per_node"])
            self.mlog.end(C.INIT_STOP)
            self.mlog.start(C.RUN_START)
            self.state["run_started"] = True
        else:
            self.mlog.event("cloudmask_resume", self.state.get("epochs_done", 0), attempt=self.state["attempts"],
                            phase=phase)
        self.state["phase"] = phase
        self.run_dir.write_state(self.state)

    def train(self) -> None:
        """Training to the configured epochs (unless it is over already), the final model, and under a cluster
        every worker's share handed to the chief."""
        if self.state["phase"] == "training":
            with self.tel.phase("train", window=None):
                telemetry = self.fw.callbacks.PhaseTelemetry(self.tel, self.mlog)
                fitted = self.fw.train.train_run(self.cfg, self.run_dir, self.model, self.inputs, self.mlog,
                                                 self.state, self.stop, [telemetry], self.cluster,
                                                 self.checkpoints)
                self.worker = fitted.worker
                if self.is_chief:
                    self.fw.callbacks.save_model(self.model, self.run_dir / MODEL)
            self.state["phase"] = "inference" if self.cfg.infer.enabled else "results"
            self.run_dir.write_state(self.state)
        if self.cluster is not None and self.cluster.workers > 1:
            self._gather_workers()

    def _gather_workers(self) -> None:
        """Every worker's share of the training, and its node's energy (measured up to here), to the chief."""
        rank = self.cluster.rank
        report = {"rank": rank, **self.hosts[rank], **(self.worker or {"train_s": None, "patches": None}),
                  "energy": None}
        if not self.cluster.is_chief:
            report["energy"] = {**self.tel.energy_so_far(), "host": report["host"]}
        self.state["worker_reports"] = self.cluster.exchange(report)

    def hand_over(self) -> dict:
        """A non-chief worker's end: the chief writes the results."""
        log.info("worker %d done; the chief writes the results", self.cluster.rank)
        self.outcome = {"worker_of": str(self.checkpoints), "rank": self.cluster.rank}
        return self.outcome

    def time_training(self, warmup: int, steps: int, together: bool = True) -> float:
        """Seconds of ``steps`` training steps after ``warmup``; ``together=False``: this worker alone."""
        with self.tel.phase("train", window=None):
            return self.fw.train.time_steps(self.model, self.inputs.train_stream, warmup, steps,
                                            self.cluster if together else None, self.cfg.train.batch_size)

    def infer(self) -> None:
        """Inference and scoring of the test images (``infer.max_files`` of them), masks into the run."""
        if not self.cfg.infer.enabled:
            return
        images = self.inputs.test.first(self.cfg.infer.max_files)
        if self.cluster is not None:  # predict() on the mirrored model would wait for the workers, which have left
            self.model = self.fw.callbacks.load_checkpoint(self.run_dir / MODEL)
        epoch_num = self.state.get("epochs_done", 0)
        self.mlog.start(C.EVAL_START, "inference", epoch_num=epoch_num)
        with self.phase("inference"):
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
            raise TrainingInterrupted(self.stop.signum, self.state.get("epochs_done", 0), self.run_dir.path, during)

    # --------------------------------------------------------------------------------------------- results

    def history(self) -> list[dict]:
        return self.run_dir.read_history()[: self.state.get("epochs_done", 0)]

    def results(self) -> dict:
        """results.json of the finished run, the reference's result record and run_stop in the MLPerf log. Once
        this begins a stop request waits: the writes take well under a second and leave a finished run."""
        self._stop_if_asked("inference" if self.cfg.infer.enabled else "training")
        history = self.history()
        results = training_results(self.cfg, self.state, history, self.test, self.inputs, self.devices,
                                   status="success", fit_s=self.state.get("fit_s", 0.0),
                                   wall_s=time.time() - self._t_start)
        results["target"] = target_section(self.cfg, self.state, history)
        self.run_dir.write_results(results)
        self.mlog.event("result", reference_result(self.cfg, results, self.inputs, self.devices))
        self.mlog.end(C.RUN_STOP, status=run_status(self.cfg, self.state))
        self.state["phase"] = "done"
        self.run_dir.write_state(self.state)
        for line in reference_log_lines(self.cfg, results, self.inputs, self.devices):
            log.info(line)
        self.outcome = results
        return results

    def inference_results(self, source_run: Path, checkpoint: str, model_file: Path) -> dict:
        self.outcome = inference_results(self.cfg, source_run, checkpoint, model_file, self.test, self.devices)
        log.info("test: avg_accuracy %.4f over %d files; results in %s", self.test["avg_accuracy"],
                 self.test["files"], self.run_dir.path)
        return self.outcome

    def _write_stopped(self, error: CloudmaskError) -> None:
        """A ``failed``/``interrupted`` results.json, where the disk still has room for it."""
        status = "interrupted" if isinstance(error, TrainingInterrupted) else "failed"
        try:
            self.run_dir.write_results(stopped_results(self.cfg, self.state, self.history(), status, str(error)))
        except OutputError as e:
            log.warning("results.json not written: %s", e)

    def _record_energy(self, energy: dict) -> None:
        """The attempt's energy: into the results of a finished run, else kept for the attempt that finishes."""
        if self.mode is THROUGHPUT or "worker_of" in self.outcome:
            return  # nothing is kept, or the chief reports this worker's energy
        if self.mode is INFERENCE:
            if self.outcome:
                self.outcome["energy"] = energy
                self.run_dir.write_results(self.outcome)
            return
        if not self.outcome:
            self.state.setdefault("energy_attempts", []).append(energy)
            self.run_dir.write_state(self.state)
            return
        several = self.cluster is not None and self.cluster.workers > 1
        if several:
            energy = combine_energy([{**energy, "host": socket.gethostname()}] +
                                    [r["energy"] for r in self.state.get("worker_reports", [])[1:]])
        self.outcome["energy"] = merge_energy(energy, self.state.get("energy_attempts", []), self.history(),
                                              per_epoch_from_history=not several)
        self.run_dir.write_results(self.outcome)


def _connect(cfg: Config):
    """The cluster of a multi_worker run (the chief speaks for the run; the others only report problems)."""
    if cfg.distribute.strategy != "multi_worker":
        return None
    cluster = cluster_lib.connect(cfg)
    if not cluster.is_chief:
        console.quiet()
    return cluster


def _refuse_finished(run: RunDir) -> None:
    """A finished run is never rewritten (its inference, attempts and MLPerf run_stop would change)."""
    if (run.read_state() or {}).get("phase") == "done":
        raise RunDirError(f"{run.path}: this run has finished; there is nothing to resume",
                          f"start a new run, or score its model again with `cloudmask infer {run.path}`")


def _resume_config(run: RunDir, changes: dict | None) -> Config:
    """The run's saved config; a resume that would change any key is refused, naming the keys."""
    saved = run.config()
    if changes:
        requested = load_config(changes.get("config"), changes.get("overrides", ()), base=saved.to_dict(),
                                values=changes.get("values", {}))
        a, b = flatten(saved.to_dict()), flatten(requested.to_dict())
        differing = sorted(k for k in a if a[k] != b.get(k))
        if differing:
            shown = ", ".join(f"{k}: {a[k]!r} -> {b[k]!r}" for k in differing[:4])
            raise ConfigError(f"{run.path} was started with a different config ({shown})",
                              "--resume continues the same run: drop --config/--set, or start a new run")
    return saved


def _test_files(test_dir: Path, limit: int | None) -> list[Path]:
    return data.find_files(test_dir)[: limit or None]
