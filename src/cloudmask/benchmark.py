"""One benchmark run end to end: run directory, MLPerf log, data, model, training, inference, results.json.

``run`` is what ``cloudmask train`` does; ``bench`` adds a cached synthetic dataset and a summary table;
``infer_only`` scores a trained run's model in a new run directory.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

from mlperf_logging.mllog import constants as C

from . import __version__, data, runtime
from .config import Config, load_config
from .errors import CloudmaskError, ConfigError, RunDirError
from .experiments import MODEL, MLPERF_LOG, RunDir, attach_console_log, detach, quiet_console, setup_console
from .mlperf import MLPerfLog, log_hyperparameters, log_submission
from .telemetry import RunTelemetry, merge_energy

log = logging.getLogger(__name__)

RESULTS_SCHEMA = 1


def division(cfg: Config) -> str:
    if cfg.mlperf.division != "auto":
        return cfg.mlperf.division
    return "closed" if not cfg.deviations() else "open"


def platform_name(cfg: Config, gpus: list[str], nodes: int = 1) -> str:
    if cfg.mlperf.platform != "auto":
        return cfg.mlperf.platform
    device = f"{len(gpus)}x {gpus[0]}" if gpus else f"CPU {runtime.cpu_model()}"
    return f"{socket.gethostname()}: {device}" if nodes == 1 else f"{nodes} nodes like {socket.gethostname()}: {device}"


def _nodes(state: dict) -> int:
    """Nodes the run trains on: the workers' distinct hosts (one process uses one node, whatever the
    allocation holds)."""
    return state.get("topology", {}).get("nodes", 1)


def _resume_config(run: RunDir, changes: dict | None) -> Config:
    """The run's saved config; a resume that would change any key is refused, naming the keys."""
    saved = run.config()
    if changes:
        requested = load_config(changes.get("config"), changes.get("overrides", ()), base=saved.to_dict(),
                                values=changes.get("values", {}))
        a, b = _flatten(saved.to_dict()), _flatten(requested.to_dict())
        differing = sorted(k for k in a if a[k] != b.get(k))
        if differing:
            shown = ", ".join(f"{k}: {a[k]!r} -> {b[k]!r}" for k in differing[:4])
            raise ConfigError(f"{run.path} was started with a different config ({shown})",
                              "--resume continues the same run: drop --config/--set, or start a new run")
    return saved


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run(cfg: Config | None, out: str | os.PathLike | None = None, resume: bool = False,
        resume_changes: dict | None = None, stage_to: str | os.PathLike | None = None) -> dict:
    """Train (or resume) and evaluate; returns results.json's content.

    When resuming, ``cfg`` is ignored: the run's saved config is used, and ``resume_changes``
    ({"config": file, "overrides": [...], "values": {...}}) must not change it. ``stage_to`` copies the dataset
    there first (node-local disk); it is not part of the config because it differs per node, not per result.

    With distribute.strategy=multi_worker every worker calls this: worker 0 (the chief) owns the run directory;
    the others write only into a scratch directory that is removed at the end, read checkpoints from the
    chief's run directory (a shared file system) and hand their timings and energy to the chief."""
    runtime.quiet_tensorflow()
    setup_console()
    from .doctor import preflight

    preflight(str(Path(out).parent) if out else (cfg.output.root if cfg else "."))
    if resume:
        if out is None:
            raise RunDirError("--resume needs the run directory", "pass --out DIR of the run to continue")
        run_dir = RunDir.for_resume(out)
        cfg = _resume_config(run_dir, resume_changes)
    assert cfg is not None
    cluster = None
    if cfg.distribute.strategy == "multi_worker":
        from . import distributed

        cluster = distributed.connect(cfg)
        if not cluster.is_chief:
            quiet_console()  # the chief speaks for the run; the others only report problems

    def check_data() -> None:  # data problems are found before a run directory is created
        if resume:
            return
        if cfg.data.store:
            from .store import open_store

            open_store(cfg.data.store, cfg)
        else:
            data.resolve_layout(cfg.data.root, cfg.data.train_dir, cfg.data.test_dir, need_test=cfg.infer.enabled)

    def open_run() -> tuple[RunDir | None, dict]:
        if resume:
            return run_dir, run_dir.read_state() or {}
        return (RunDir.create(out, cfg) if cluster is None or cluster.is_chief else None), {}

    scratch = shared = None
    if cluster is None:
        check_data()
        run_dir, state = open_run()
    else:  # every worker must see the data before the chief creates the run directory
        cluster.settle(check_data)
        opened, state = cluster.settle(open_run)
        chief_run, state = cluster.exchange([str(opened.path), state] if cluster.is_chief else None)[0]
        shared = Path(chief_run)
        if cluster.is_chief:
            run_dir = opened
        else:
            import tempfile

            scratch = Path(tempfile.mkdtemp(prefix=f"cloudmask-worker{cluster.rank}-"))
            run_dir = RunDir.create(scratch / "run", cfg)
    try:
        return _run_attempt(cfg, run_dir, state, stage_to, cluster, shared)
    finally:
        if scratch is not None:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)


def _run_attempt(cfg: Config, run_dir: RunDir, state: dict, stage_to, cluster, shared: Path | None) -> dict:
    handler = attach_console_log(run_dir)
    mlog = MLPerfLog(run_dir / MLPERF_LOG)
    state["attempts"] = state.get("attempts", 0) + 1
    tel = RunTelemetry(cfg, run_dir.path, state["attempts"]).start()
    outcome: dict = {}
    try:
        outcome = _run(cfg, run_dir, state, mlog, tel, stage_to, cluster, shared)
        return outcome
    except CloudmaskError as e:
        log.error("run stopped: %s", e)
        _write_partial(run_dir, cfg, state, e)
        raise
    finally:
        energy = tel.finish(log)
        if outcome.get("worker_of") is not None:
            pass  # a non-chief worker: its energy went to the chief, its run directory is scratch
        elif outcome:  # success: the energy section joins the results written by _run
            if cluster is not None and cluster.workers > 1:
                from .distributed import combine_energy

                energy = combine_energy([{**energy, "host": socket.gethostname()}] +
                                        [r["energy"] for r in state.get("worker_reports", [])[1:]])
            outcome["energy"] = merge_energy(energy, state.get("energy_attempts", []),
                                             train_history(run_dir, state),
                                             per_epoch_from_history=cluster is None or cluster.workers == 1)
            run_dir.write_results(outcome)
        else:  # kept for the totals of the attempt that finishes the run
            state.setdefault("energy_attempts", []).append(energy)
            run_dir.write_state(state)
        mlog.close()
        detach(handler)


def train_history(run_dir: RunDir, state: dict) -> list[dict]:
    from .train import read_history

    return read_history(run_dir)[: state.get("epochs_done", 0)]


def _run(cfg: Config, run_dir: RunDir, state: dict, mlog: MLPerfLog, tel: RunTelemetry,
         stage_to: str | os.PathLike | None = None, cluster=None, shared: Path | None = None) -> dict:
    resumed = bool(state.get("run_started"))
    checkpoints = shared or run_dir.path  # a non-chief worker resumes from the chief's files  # the MLPerf init block is in the log already
    t_start = time.time()
    timers, meter = tel.timers, tel.meter
    with timers.phase("init"), meter.window("init"):
        if not resumed:
            mlog.start(C.INIT_START)
        from . import evaluate, model as model_lib, train  # the framework import is part of init
        for note in cfg.notes:
            log.info("note: %s", note)
        scope, replicas, strategy = runtime.distribution(cfg, cluster)
        runtime.seed_everything(cfg.seed, cfg.train.deterministic)
        runtime.set_precision(cfg.train.precision)
        gpus = runtime.accelerators()
        if strategy and cfg.accumulation_steps > 1:
            # Keras's gradient accumulation synchronises inside a conditional, which tf.distribute rejects
            raise ConfigError(f"train.micro_batch_size={cfg.train.micro_batch_size} (gradient accumulation) does "
                              f"not work with data parallelism ({strategy})",
                              "drop train.micro_batch_size: each replica already gets batch_size / replicas, "
                              "or set distribute.strategy=none")
        per_step = cfg.train.micro_batch_size or cfg.train.batch_size
        if per_step % replicas:
            raise ConfigError(f"train.batch_size {per_step} (per step) does not split over {replicas} replicas",
                              f"use a multiple of {replicas}")
        cfg = cfg.for_replicas(replicas)
        if replicas > 1:
            log.info("data parallel over %d replicas: global batch %d, %d per replica", replicas,
                     cfg.train.batch_size, cfg.train.batch_size // replicas)
        state["replicas"] = replicas
        state["strategy"] = strategy
        state["global_batch_size"] = cfg.train.batch_size
        shard = (cluster.rank, cluster.workers) if cluster else (0, 1)
        td, test_source, naming, (root, digest, files) = _training_data(cfg, state, timers, mlog, stage_to, shard)
        tel.write_manifest(root, digest, files)
        log.info("cloudmask %s  run %s  backend %s  devices: %s", __version__, run_dir.path, runtime.backend(),
                 ", ".join(gpus) or "CPU")
        log.info("data: %d training files (%d patches), %d validation files (%d patches), layout %s",
                 len(td.train_files), td.train_patches, len(td.val_files), td.val_patches, naming)
        for source in meter.sources:
            log.info("%s energy: %s", source.kind.upper(),
                     source.method if source.method != "none" else f"none ({source.reason})")

        phase = state.get("phase", "training")
        with scope:  # variables are created (mirrored) inside the strategy's scope
            if phase == "training" and state.get("latest"):
                model = train.load_checkpoint(checkpoints / state["latest"])
                log.info("resuming after epoch %d from %s", state["epochs_done"], state["latest"])
            elif phase == "training":
                model = model_lib.compile_model(model_lib.build_from_config(cfg), cfg.effective_learning_rate,
                                                cfg.accumulation_steps, cfg.train.jit_compile)
            else:
                model = train.load_checkpoint(checkpoints / MODEL)
            if cluster is not None and not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)  # its slots mirrored too, not made in a step
        from .distributed import describe_workers

        hosts = [{"host": socket.gethostname(), "devices": gpus}]
        if cluster is not None:
            hosts = cluster.exchange(hosts[0])
        state["topology"] = {"source": cluster.source if cluster else "single",
                             **describe_workers(hosts)}

    if phase == "training" and meter.active and cfg.telemetry.idle_seconds > 0:
        with timers.phase("idle baseline"):
            meter.measure_idle(cfg.telemetry.idle_seconds)
        for kind, watts in meter.idle_w.items():
            log.info("idle %s power: %s W", kind.upper(), ", ".join(f"{w:.1f}" for w in watts))

    if not resumed:
        log_submission(mlog, cfg, platform_name(cfg, gpus, state["topology"]["nodes"]), division(cfg))
        mlog.event(C.CACHE_CLEAR, False)  # the page cache is not dropped (needs root); logged honestly
        log_hyperparameters(mlog, cfg, td.train_patches, td.val_patches, nodes=_nodes(state),
                            accelerators_per_node=state["topology"]["accelerators_per_node"])
        mlog.end(C.INIT_STOP)
        mlog.start(C.RUN_START)
        state["run_started"] = True
    else:
        mlog.event("cloudmask_resume", state.get("epochs_done", 0), attempt=state["attempts"], phase=phase)
    state["phase"] = phase
    run_dir.write_state(state)

    fit_s = state.get("fit_s", 0.0)
    worker = None
    if phase == "training":
        with timers.phase("train"):
            fitted = train.fit(cfg, run_dir, model, td, mlog, state,
                               extra_callbacks=[train.PhaseTelemetry(meter, timers, mlog)], cluster=cluster,
                               checkpoints=checkpoints)
            fit_s, worker = fitted.fit_s, fitted.worker
            if cluster is None or cluster.is_chief:
                train.save_model(model, run_dir / MODEL)
        state["phase"] = "inference" if cfg.infer.enabled else "done"
        run_dir.write_state(state)
    if cluster is not None and cluster.workers > 1:
        # every worker's share of the training, and its node's energy (measured up to here), to the chief
        report = {"rank": cluster.rank, **hosts[cluster.rank], **(worker or {"train_s": None, "patches": None}),
                  "energy": None}
        if not cluster.is_chief:
            meter.end("run")
            report["energy"] = {**meter.summary(), "host": report["host"]}
        state["worker_reports"] = cluster.exchange(report)
        if not cluster.is_chief:
            log.info("worker %d done; the chief writes the results", cluster.rank)
            return {"worker_of": str(checkpoints), "rank": cluster.rank}
    history = train_history(run_dir, state)

    test = None
    if cfg.infer.enabled:
        test_root, test_files, load = test_source
        if cfg.infer.max_files:
            test_files = test_files[: cfg.infer.max_files]
        epoch_num = state.get("epochs_done", 0)
        if cluster is not None:  # predict() on the mirrored model would wait for the workers, which have left
            model = train.load_checkpoint(run_dir / MODEL)
        mlog.start(C.EVAL_START, "inference", epoch_num=epoch_num)
        with timers.phase("inference"), meter.window("inference"):
            test = evaluate.evaluate(model, test_files, cfg, test_root, run_dir / "masks", load=load)
        mlog.end(C.EVAL_STOP, "inference", epoch_num=epoch_num)
        log.info("test: avg_accuracy %.4f over %d files (majority-class baseline %.4f), %.2f s per image",
                 test["avg_accuracy"], test["files"], test["majority_baseline"], test["time_per_inference_s"])

    results = build_results(cfg, state, history, test, td, gpus, status="success", fit_s=fit_s,
                            wall_s=time.time() - t_start)
    run_dir.write_results(results)
    mlog.event("result", reference_result(cfg, results, td, gpus))
    mlog.end(C.RUN_STOP, status="success")
    state["phase"] = "done"
    run_dir.write_state(state)
    _log_reference_lines(cfg, results, td, gpus)
    return results


def _training_data(cfg: Config, state: dict, timers, mlog: MLPerfLog, stage_to, shard: tuple[int, int] = (0, 1)):
    """(TrainData, (test root, test files, loader or None), layout name, (dataset root, manifest digest, file
    facts) for the manifest), from the raw files or a patch store, staged to ``stage_to`` first when given."""
    from . import train

    start = state.get("epochs_done", 0)
    if cfg.data.store:
        from . import store as store_lib

        path = Path(cfg.data.store).expanduser()
        if stage_to:
            path = _stage(timers, mlog, state, lambda: store_lib.stage(store_lib.open_store(path, cfg).path, stage_to))
        st = store_lib.open_store(path, cfg)
        td = train.prepare_store_data(cfg, st, start_epoch=start, shard=shard)
        facts = {"store": str(st.path), "source": st.meta["source"]["root"], "train_files": len(td.train_files),
                 "val_files": len(td.val_files)}
        return td, store_lib.test_loader(st), "patch store", (st.path, st.meta["source"].get("manifest_sha256"),
                                                               facts)
    layout = data.resolve_layout(cfg.data.root, cfg.data.train_dir, cfg.data.test_dir, need_test=cfg.infer.enabled)
    if stage_to:
        layout = _stage(timers, mlog, state, lambda: data.stage(layout, stage_to))
    td = train.prepare_data(cfg, layout.train_dir, start_epoch=start)
    root = layout.train_dir.parent if layout.naming != "explicit" else None
    facts = {"train_dir": str(layout.train_dir), "test_dir": str(layout.test_dir),
             "train_files": len(td.train_files), "val_files": len(td.val_files)}
    test_files = data.find_files(layout.test_dir) if cfg.infer.enabled else []
    return td, (layout.test_dir, test_files, None), layout.naming, (root, data.manifest_digest(root) if root else None,
                                                                    facts)


def _stage(timers, mlog: MLPerfLog, state: dict, stage):
    """Run ``stage()`` -> (staged thing, data.Staging) as the timed, MLPerf-logged staging step of init."""
    with timers.phase("stage data"):
        mlog.start(C.STAGING_START)
        result, staged = stage()
        mlog.end(C.STAGING_STOP, files=staged.files, copied=staged.copied, bytes=staged.bytes)
    log.info("staged %d files (%d copied, %.1f MB) to %s in %.1f s", staged.files, staged.copied,
             staged.bytes / 1e6, staged.dest, staged.seconds)
    state.setdefault("staging", []).append({"attempt": state["attempts"], "dest": str(staged.dest),
                                            "files": staged.files, "copied": staged.copied,
                                            "bytes": staged.bytes, "seconds": staged.seconds})
    return result


def _log_reference_lines(cfg, results, td, gpus) -> None:
    """The reference's two text-log lines (spec §6.2), for parsers written against it."""
    n_files = len(td.train_files) + len(td.val_files)
    nodes = results["distributed"]["nodes"]
    log.info("CloudMask training, samples = %d, epochs=%d, bs=%d, nodes=%d, gpus=%d, time_per_epoch=%.2f",
             n_files, results["epochs_run"], cfg.train.batch_size, nodes, len(gpus),
             results["timing"]["time_per_epoch_s"])
    if results["test"]:
        log.info("CloudMask inference, inferences=%d, bs=%d, nodes=%d, gpus=%d, time_per_inference=%.2f",
                 results["test"]["files"], cfg.infer.batch_size, nodes, len(gpus),
                 results["timing"]["time_per_inference_s"])


def build_results(cfg: Config, state: dict, history: list[dict], test: dict | None, td, gpus: list[str],
                  status: str, fit_s: float, wall_s: float, error: str | None = None) -> dict:
    last = history[-1] if history else {}
    epochs_run = len(history)
    return {
        "schema_version": RESULTS_SCHEMA,
        "benchmark": "cloudmask",
        "version": __version__,
        "status": status,
        "error": error,
        "seed": cfg.seed,
        "config_sha256": cfg.sha256(),
        "division": division(cfg),
        "deviations": cfg.deviations(),
        "input_pipeline": "patch-store" if cfg.data.store else "streaming-hdf5",
        "micro_batch_size": cfg.train.micro_batch_size or cfg.train.batch_size,
        "backend": runtime.backend(),
        "devices": gpus or ["CPU"],
        "epochs_configured": cfg.train.epochs,
        "epochs_run": epochs_run,
        "stopped_early": bool(state.get("stopped_early")),
        "best_epoch": state.get("best_epoch"),
        "best_val_loss": state.get("best_val_loss"),
        "restored_best_weights": state.get("restored_best_epoch") is not None,
        "attempts": state.get("attempts", 1),
        "replicas": state.get("replicas", 1),
        "strategy": state.get("strategy"),
        "global_batch_size": state.get("global_batch_size", cfg.train.batch_size),
        "distributed": distributed_section(state, td),
        "staging": state.get("staging", []),
        "train": {k: last.get(k) for k in ("accuracy", "loss", "val_accuracy", "val_loss")},
        "history": {k: [row[k] for row in history] for k in ("loss", "accuracy", "val_loss", "val_accuracy")},
        "test": test,
        "energy": None,  # filled in when the run's telemetry is closed
        "timing": {
            "epoch_s": [row["epoch_s"] for row in history],
            "train_s": fit_s,
            "time_per_epoch_s": fit_s / epochs_run if epochs_run else None,
            "time_per_configured_epoch_s": fit_s / cfg.train.epochs,
            "samples_per_s": [row["samples_per_s"] for row in history],
            "inference_s": test["inference_s"] if test else None,
            "time_per_inference_s": test["time_per_inference_s"] if test else None,
            "wall_s": wall_s,
        },
        "samples": {
            "train": td.train_patches if td else None,
            "val": td.val_patches if td else None,
            "train_files": len(td.train_files) if td else None,
            "val_files": len(td.val_files) if td else None,
            "test_files": test["files"] if test else 0,
            "train_steps_per_epoch": td.train_stream.batches if td else None,
        },
    }


def distributed_section(state: dict, td) -> dict:
    """Workers, nodes, accelerators per node; with several workers each one's training throughput."""
    topology = state.get("topology", {"source": "single", "workers": 1, "nodes": 1, "accelerators_per_node": 0,
                                      "hosts": [socket.gethostname()]})
    out = dict(topology)
    reports = [r for r in state.get("worker_reports", []) if r.get("train_s")]
    if reports:
        out["per_worker"] = [{"rank": r["rank"], "host": r["host"], "devices": r["devices"] or ["CPU"],
                              "train_s": r["train_s"], "patches": r["patches"],
                              "patches_per_s": r["patches"] / r["train_s"]} for r in reports]
        # the global batch's patches per second: every worker fed its share of every step
        out["total_patches_per_s"] = sum(r["patches"] for r in reports) / max(r["train_s"] for r in reports)
    return out


def reference_result(cfg: Config, results: dict, td, gpus: list[str]) -> dict:
    """The reference v1.2 ``result`` record (same field names), so existing log parsers keep working."""
    out = {
        "name": "cloudmask",
        "training": {
            "samples": len(td.train_files) + len(td.val_files),
            **results["train"],
            "history": results["history"],
            "batch_size": cfg.train.batch_size,
            "crop_size": cfg.image.overlap,
            "learning_rate": cfg.effective_learning_rate,
        },
    }
    if results["test"]:
        out["inference"] = {"avg_accuracy": results["test"]["avg_accuracy"],
                            "accuracy": [r["accuracy"] for r in results["test"]["per_file"]]}
        out["inference_analyze"] = {"number": results["test"]["files"], "bs": cfg.infer.batch_size,
                                    "nodes": results["distributed"]["nodes"], "gpus": len(gpus),
                                    "time_per_inference": results["test"]["time_per_inference_s"]}
    return out


def _write_partial(run_dir: RunDir, cfg: Config, state: dict, error: CloudmaskError) -> None:
    """results.json for a run that stopped early, so reports list it with its reason."""
    from .train import TrainingInterrupted, read_history

    status = "interrupted" if isinstance(error, TrainingInterrupted) else "failed"
    history = read_history(run_dir)[: state.get("epochs_done", 0)]
    results = build_results(cfg, state, history, None, None, [], status=status, fit_s=state.get("fit_s", 0.0),
                            wall_s=0.0, error=str(error))
    run_dir.write_results(results)


# ----------------------------------------------------------------------------------------------- bench


def synthetic_cache_dir(cfg: Config) -> Path:
    if cfg.bench.cache_dir:
        return Path(cfg.bench.cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cloudmask"


def synthetic_dataset(cfg: Config) -> Path:
    """The bench dataset, synthesized once per (size, seed) and reused; built in a temporary directory and
    renamed into place, so an interrupted build is never mistaken for a dataset."""
    from .synth import GENERATOR_VERSION, synthesize

    b = cfg.bench
    h, w = cfg.image.height, cfg.image.width
    root = synthetic_cache_dir(cfg)
    target = root / f"synthetic-v{GENERATOR_VERSION}-{h}x{w}-train{b.train_files}-test{b.test_files}-seed{b.synth_seed}"
    if target.is_dir():
        log.info("synthetic dataset: %s (cached)", target)
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{target.name}.{os.getpid()}.tmp"
    log.info("synthesizing %d training + %d test files into %s ...", b.train_files, b.test_files, target)
    t0 = time.perf_counter()
    synthesize(tmp, b.train_files, b.test_files, b.synth_seed, height=h, width=w)
    try:
        tmp.rename(target)
    except OSError:  # another process finished the same dataset first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    log.info("synthesized in %.1f s", time.perf_counter() - t0)
    return target


def dataset_if_present(root: str) -> str | None:
    """``root`` if it holds a dataset; otherwise None, after saying why synthetic data is used instead."""
    setup_console()
    try:
        data.resolve_layout(root)
        return root
    except CloudmaskError as e:
        log.warning("NOTICE: no dataset in %s (%s); running on SYNTHETIC data instead. Accuracy and timings "
                    "on synthetic data are not comparable with the benchmark's published numbers.", root, e)
        return None


def bench(cfg: Config, data_root: str | None = None, out: str | None = None) -> dict:
    """Train + infer on ``data_root`` or on a cached synthetic dataset, then print a summary table."""
    setup_console()
    if data_root is None and not (cfg.data.root or cfg.data.train_dir):
        data_root = str(synthetic_dataset(cfg))
    if data_root is not None:
        cfg = cfg.with_values({"data.root": str(data_root)}, "--data")
    results = run(cfg, out)
    log.info("\n%s", summary_table(results))
    return results


def throughput(cfg: Config, data_root: str | None, warmup: int, steps: int, as_json: bool) -> dict:
    """``bench --mode throughput``: no run directory, a table or JSON on stdout."""
    import json

    from . import throughput as tp
    from .telemetry import Timers

    runtime.quiet_tensorflow()
    setup_console()
    if as_json:
        quiet_console()  # stdout carries the JSON alone
    if data_root is None and not (cfg.data.root or cfg.data.train_dir or cfg.data.store):
        data_root = str(synthetic_dataset(cfg))
    if data_root is not None:
        cfg = cfg.with_values({"data.root": str(data_root)}, "--data")
    cluster = None
    if cfg.distribute.strategy == "multi_worker":
        from . import distributed

        cluster = distributed.connect(cfg)
        if not cluster.is_chief:
            quiet_console()
        cfg = cfg.for_replicas(cluster.replicas)
        if cfg.train.batch_size % cluster.replicas:
            raise ConfigError(f"train.batch_size {cfg.train.batch_size} does not split over {cluster.replicas} "
                              "replicas", f"use a multiple of {cluster.replicas}")
    mlog = MLPerfLog(Path(os.devnull))  # no run, no MLPerf log
    try:
        shard = (cluster.rank, cluster.workers) if cluster else (0, 1)
        prepare = lambda: _training_data(cfg, {"attempts": 1}, Timers(), mlog, None, shard)  # noqa: E731
        td, test_source, _, _ = cluster.settle(prepare) if cluster else prepare()
    finally:
        mlog.close()
    result = tp.measure(cfg, td, test_source, warmup=warmup, steps=steps, cluster=cluster)
    if cluster is None or cluster.is_chief:
        print(json.dumps(result, indent=2) if as_json else tp.table(result))
    return result


def summary_table(results: dict) -> str:
    from .tables import text_table

    t, timing, test = results["train"], results["timing"], results["test"] or {}
    rows = [
        ["epochs run", f"{results['epochs_run']} of {results['epochs_configured']}"],
        ["train accuracy / loss", f"{t['accuracy']:.4f} / {t['loss']:.4f}"],
        ["val accuracy / loss", f"{t['val_accuracy']:.4f} / {t['val_loss']:.4f}"],
        ["test avg accuracy", f"{test['avg_accuracy']:.4f} ({test['files']} files)" if test else "-"],
        ["majority-class baseline", f"{test['majority_baseline']:.4f}" if test else "-"],
        ["time per epoch", f"{timing['time_per_epoch_s']:.2f} s"],
        ["training throughput", f"{max(timing['samples_per_s']):.1f} patches/s (best epoch)"],
        ["time per test image", f"{timing['time_per_inference_s']:.2f} s" if test else "-"],
        ["division", f"{results['division']}" + (f" (deviations: {', '.join(results['deviations'])})"
                                                 if results["deviations"] else "")],
    ]
    return text_table(["cloudmask bench", ""], rows)


# ------------------------------------------------------------------------------------------ infer only


def infer_only(source: str | os.PathLike, checkpoint: str = "final", data_root: str | None = None,
               out: str | None = None, overrides: list[str] = ()) -> dict:
    """Score a trained run's model on the test set in a new run directory (the source run is only read)."""
    from . import evaluate, train

    runtime.quiet_tensorflow()
    setup_console()
    src = RunDir.for_resume(source)
    cfg = src.config()
    values = {"data.root": data_root, "data.test_dir": None} if data_root else {}
    cfg = cfg.with_values(values, "--data").with_overrides(overrides)
    state = src.read_state() or {}
    if checkpoint == "final":
        model_file = src / MODEL
    elif state.get(checkpoint):
        model_file = src / state[checkpoint]
    else:
        raise RunDirError(f"{src.path}: has no {checkpoint} checkpoint", "use --checkpoint final|best|latest")
    if not model_file.is_file():
        raise RunDirError(f"{model_file}: model file missing", "the source run did not finish training")
    layout = data.resolve_layout(cfg.data.root, None, cfg.data.test_dir, need_train=False)
    target = Path(out) if out else src.path.with_name(f"{src.path.name}-infer-{checkpoint}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = RunDir.create(target, cfg)
    handler = attach_console_log(run_dir)
    tel = RunTelemetry(cfg, run_dir.path, attempt=1).start()
    results: dict = {}
    try:
        with tel.timers.phase("init"):
            runtime.seed_everything(cfg.seed, cfg.train.deterministic)
            model = train.load_checkpoint(model_file)
            files = data.find_files(layout.test_dir)[: cfg.infer.max_files or None]
            tel.write_manifest(layout.test_dir.parent, data.manifest_digest(layout.test_dir.parent),
                               {"test_dir": str(layout.test_dir), "test_files": len(files)})
        with tel.timers.phase("inference"), tel.meter.window("inference"):
            test = evaluate.evaluate(model, files, cfg, layout.test_dir, run_dir / "masks")
        results = {"schema_version": RESULTS_SCHEMA, "benchmark": "cloudmask", "version": __version__,
                   "mode": "inference", "status": "success", "source_run": str(src.path),
                   "checkpoint": checkpoint, "model_file": str(model_file), "seed": cfg.seed,
                   "config_sha256": cfg.sha256(), "backend": runtime.backend(),
                   "devices": runtime.accelerators() or ["CPU"], "test": test,
                   "timing": {"inference_s": test["inference_s"], "time_per_inference_s": test["time_per_inference_s"]}}
        log.info("test: avg_accuracy %.4f over %d files; results in %s", test["avg_accuracy"], test["files"],
                 run_dir.path)
        return results
    finally:
        energy = tel.finish(log)
        if results:
            results["energy"] = energy
            run_dir.write_results(results)
        detach(handler)
