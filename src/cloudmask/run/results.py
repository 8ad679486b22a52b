"""``results.json``: the one builder of a run's results (trained, failed, interrupted, or inference only), the
reference's ``result`` record for the MLPerf log, and the summary table ``bench`` prints. The schema is
documented in docs/results.md; fields are only ever added."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from .. import __version__
from ..cli.tables import text_table
from ..config import Config
from ..training import runtime
from .mlperf import division
from .state import RunState

RESULTS_SCHEMA = 1


STATUSES = ("success", "failed", "interrupted")
_NUMBER = (int, float)
# the fields readers (report, grid status) use, with the JSON types docs/results.md gives them; null is allowed
_TYPES = {"seed": int, "epochs_run": int, "error": str, "devices": list, "train": dict, "test": dict,
          "timing": dict, "energy": dict, "history": dict, "division": str, "target": dict}
_NESTED = {("test", "avg_accuracy"): _NUMBER, ("timing", "time_per_epoch_s"): _NUMBER,
           ("timing", "time_per_inference_s"): _NUMBER, ("train", "accuracy"): _NUMBER}


def schema_problem(results) -> str | None:
    """What makes ``results`` (a parsed results.json) not follow its schema, or None."""
    if not isinstance(results, dict):
        return f"not a JSON object but {type(results).__name__}"
    if results.get("status") not in STATUSES:
        return f"status {results.get('status')!r} is none of {', '.join(STATUSES)}"
    for key, kind in _TYPES.items():
        value = results.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            return f"{key} is {type(value).__name__}, not {kind.__name__}"
    for (section, key), kinds in _NESTED.items():
        value = (results.get(section) or {}).get(key)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            return f"{section}.{key} is {type(value).__name__}, not a number"
    if any(not isinstance(v, list) for v in (results.get("history") or {}).values()):
        return "history holds a value that is not a list"
    return None


def _header() -> dict:
    return {"schema_version": RESULTS_SCHEMA, "benchmark": "cloudmask", "version": __version__}


@dataclass
class RunRecord:
    """What a training run's results.json is built from: the config, the committed state, the finished epochs,
    the inputs and devices (None and [] for a run that stopped before it had them), the test section and the
    wall time of this attempt."""

    cfg: Config
    state: RunState
    history: list[dict]
    inputs: object = None  # inputs.run_inputs.RunInputs
    devices: list[str] = field(default_factory=list)
    test: dict | None = None
    wall_s: float = 0.0
    # the reference's clock of training (data set-up, model build, fit with validation, model save) over every
    # attempt, for its time per epoch; None where the run never trained
    reference_train_s: float | None = None


def training_results(record: RunRecord, status: str, error: str | None = None) -> dict:
    """A training run's results (``energy`` is added by the session once its telemetry is closed)."""
    cfg, state, history, inputs, test = record.cfg, record.state, record.history, record.inputs, record.test
    last = history[-1] if history else {}
    return {
        **_header(),
        "status": status,
        "error": error,
        "seed": cfg.seed,
        "config_sha256": cfg.sha256(),
        "division": division(cfg, runtime.backend()),
        "deviations": cfg.deviations(runtime.backend()),
        "input_pipeline": "patch-store" if cfg.data.store else "streaming-hdf5",
        "input_cache": inputs.cache_report() if inputs is not None else None,
        "micro_batch_size": cfg.train.micro_batch_size or cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.accumulation_steps,
        "backend": runtime.backend(),
        "devices": record.devices or ["CPU"],
        "epochs_configured": cfg.train.epochs,
        "epochs_run": len(history),
        "stopped_early": state.stopped_early,
        "best_epoch": state.best_epoch,
        "best_val_loss": state.best_val_loss,
        "restored_best_weights": state.restored_best_epoch is not None,
        "attempts": max(state.attempts, 1),
        "replicas": state.replicas,
        "strategy": state.strategy,
        "global_batch_size": state.global_batch_size or cfg.train.batch_size,
        "distributed": distributed_section(state),
        "staging": state.staging,
        "train": {k: last.get(k) for k in ("accuracy", "loss", "val_accuracy", "val_loss")},
        "history": {k: [row[k] for row in history] for k in ("loss", "accuracy", "val_loss", "val_accuracy")},
        "test": test,
        "energy": None,
        "target": target_section(cfg, state, history) if status == "success" else None,
        "timing": _timing(cfg, history, test, state.fit_s, record),
        "samples": _samples(inputs, test),
    }


def target_section(cfg, state: RunState, history: list[dict]) -> dict | None:
    """results.json ``target`` when train.target is set: whether and when the quality target was reached. Time is
    MLPerf's (run_start to the end of the eval that reached it, time lost to interruptions left out); energy is
    the GPU energy of the epochs up to that one, training and validation, and that above the idle baseline."""
    target = cfg.train.target
    if target.value is None:
        return None
    reached = state.target_epoch
    rows = history[:reached] if reached else []

    def total(column: str) -> float | None:
        values = [row.get(column) for row in rows]
        return float(sum(values)) if rows and None not in values else None

    return {"metric": target.metric, "value": target.value, "reached": bool(reached), "epochs_to_target": reached,
            "time_to_target_s": rows[-1].get("run_s") if rows else None, "energy_to_target_j": total("energy_j"),
            "energy_to_target_above_idle_j": total("energy_above_idle_j")}


def _timing(cfg, history: list[dict], test: dict | None, fit_s: float, record: RunRecord) -> dict:
    epochs_run = len(history)
    reference_s = record.reference_train_s
    return {
        "epoch_s": [row["epoch_s"] for row in history],
        "train_s": fit_s,
        # ours: the seconds in fit (training and validation) per epoch run
        "time_per_epoch_s": fit_s / epochs_run if epochs_run else None,
        "time_per_configured_epoch_s": fit_s / cfg.train.epochs,
        # the reference's (slstr_cloud.py 209-212): data set-up, model build, fit and model save, per configured
        # epoch; its text log line reports this one
        "reference_train_s": reference_s,
        "reference_time_per_epoch_s": reference_s / cfg.train.epochs if reference_s is not None else None,
        "samples_per_s": [row["samples_per_s"] for row in history],
        "inference_s": test["inference_s"] if test else None,
        "time_per_inference_s": test["time_per_inference_s"] if test else None,
        "wall_s": record.wall_s,
    }


def _samples(inputs, test: dict | None) -> dict:
    return {
        "train": inputs.train_patches if inputs else None,
        "val": inputs.val_patches if inputs else None,
        "train_files": len(inputs.train_files) if inputs else None,
        "val_files": len(inputs.val_files) if inputs else None,
        "test_files": test["files"] if test else 0,
        "train_steps_per_epoch": inputs.train_stream.batches if inputs else None,
    }


def inference_results(cfg, source_run, checkpoint: str, model_file, test: dict, devices: list[str]) -> dict:
    """``cloudmask infer``: a trained run's model scored in a new run directory."""
    return {**_header(), "mode": "inference", "status": "success", "source_run": str(source_run),
            "checkpoint": checkpoint, "model_file": str(model_file), "seed": cfg.seed,
            "config_sha256": cfg.sha256(), "backend": runtime.backend(), "devices": devices or ["CPU"],
            "test": test,
            "timing": {"inference_s": test["inference_s"], "time_per_inference_s": test["time_per_inference_s"]}}


def distributed_section(state: RunState) -> dict:
    """Workers, nodes, accelerators per node; with several workers each one's training throughput."""
    out = dict(state.topology or {"source": "single", "workers": 1, "nodes": 1, "accelerators_per_node": 0,
                                  "hosts": [socket.gethostname()]})
    reports = [r for r in state.worker_reports if r.get("train_s")]
    if reports:
        out["per_worker"] = [{"rank": r["rank"], "host": r["host"], "devices": r["devices"] or ["CPU"],
                              "train_s": r["train_s"], "patches": r["patches"],
                              "patches_per_s": r["patches"] / r["train_s"]} for r in reports]
        # the global batch's patches per second: every worker fed its share of every step
        out["total_patches_per_s"] = sum(r["patches"] for r in reports) / max(r["train_s"] for r in reports)
    return out


def reference_result(record: RunRecord, results: dict) -> dict:
    """The reference v1.2 ``result`` record (same field names), so existing log parsers keep working."""
    cfg, inputs = record.cfg, record.inputs
    out = {
        "name": "cloudmask",
        "training": {
            "samples": len(inputs.train_files) + len(inputs.val_files),
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
                                    "nodes": results["distributed"]["nodes"], "gpus": len(record.devices),
                                    "time_per_inference": results["test"]["time_per_inference_s"]}
    return out


def reference_log_lines(record: RunRecord, results: dict) -> list[str]:
    """The reference's two text-log lines (spec §6.2), for parsers written against it."""
    cfg, inputs, devices = record.cfg, record.inputs, record.devices
    n_files = len(inputs.train_files) + len(inputs.val_files)
    nodes = results["distributed"]["nodes"]
    timing = results["timing"]
    per_epoch = timing["reference_time_per_epoch_s"]
    if per_epoch is None:
        per_epoch = timing["time_per_epoch_s"]
    lines = [f"CloudMask training, samples = {n_files}, epochs={results['epochs_run']}, bs={cfg.train.batch_size}, "
             f"nodes={nodes}, gpus={len(devices)}, time_per_epoch={per_epoch:.2f}"]
    if results["test"]:
        lines.append(f"CloudMask inference, inferences={results['test']['files']}, bs={cfg.infer.batch_size}, "
                     f"nodes={nodes}, gpus={len(devices)}, "
                     f"time_per_inference={results['timing']['time_per_inference_s']:.2f}")
    return lines


def summary_table(results: dict) -> str:
    t, timing, test = results["train"], results["timing"], results["test"] or {}
    rows = [
        ["epochs run", f"{results['epochs_run']} of {results['epochs_configured']}"],
        ["train accuracy / loss", f"{t['accuracy']:.4f} / {t['loss']:.4f}"],
        ["val accuracy / loss", f"{t['val_accuracy']:.4f} / {t['val_loss']:.4f}"],
        ["test avg accuracy", f"{test['avg_accuracy']:.4f} ({test['files']} files)" if test else "-"],
        ["majority-class baseline", f"{test['majority_baseline']:.4f}" if test else "-"],
        ["time per epoch", f"{timing['time_per_epoch_s']:.2f} s"],
        ["  by the reference's clock", f"{timing['reference_time_per_epoch_s']:.2f} s (set-up, fit and save per "
                                       "configured epoch)" if timing.get("reference_time_per_epoch_s") else "-"],
        ["training throughput", f"{max(timing['samples_per_s']):.1f} patches/s (best epoch)"],
        ["time per test image", f"{timing['time_per_inference_s']:.2f} s" if test else "-"],
        ["division", f"{results['division']}" + (f" (deviations: {', '.join(results['deviations'])})"
                                                 if results["deviations"] else "")],
    ]
    target = results.get("target")
    if target:
        reached = (f"epoch {target['epochs_to_target']}, {target['time_to_target_s']:.1f} s"
                   if target["reached"] else "not reached (MLPerf status aborted)")
        rows.append([f"target {target['metric']} {target['value']:g}", reached])
    return text_table(["cloudmask bench", ""], rows)
