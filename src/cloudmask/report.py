"""``cloudmask report``: every run below some directories, as tables and statistics across repeats.

Runs are found by their ``config.yaml`` (docs/results.md). Experiment directories (``experiment.yaml``) also say
which repeats were expected, so a repeat that never wrote a run directory is listed as missing. Failed,
interrupted, incomplete and missing runs are always listed with their reason; statistics use successful runs.
Output is a function of the inputs only (sorted, no timestamps), so a report can be regenerated and diffed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from . import fileio
from .errors import CloudmaskError
from .experiments import CONFIG, EXPERIMENT, RESULTS, Experiment, find_experiments, run_state, task_states
from .tables import markdown_table

RUN_COLUMNS = ["experiment", "run", "status", "seed", "epochs_run", "train_accuracy", "test_accuracy",
               "time_per_epoch_s", "time_per_inference_s", "gpu", "gpus", "machine", "gpu_energy_j",
               "gpu_energy_per_epoch_j", "gpu_energy_above_idle_j", "energy_method", "division", "reason"]
METRICS = {"test_accuracy": "test accuracy", "time_per_epoch_s": "time per epoch (s)",
           "time_per_inference_s": "time per inference (s)", "gpu_energy_j": "GPU energy (J)",
           "gpu_energy_per_epoch_j": "GPU energy per epoch (J)"}
SUMMARY_COLUMNS = ["experiment", "machine", "gpu", "metric", "n", "mean", "std", "ci95_low", "ci95_high", "min",
                   "max", "olympic_mean"]

# two-sided 95 % Student t quantiles by degrees of freedom (1..30); 1.96 beyond
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


class ReportError(CloudmaskError):
    pass


@dataclass
class Report:
    runs: list[dict]
    summary: list[dict]
    histories: dict[str, dict]  # run -> per-epoch lists, for plots

    @property
    def problems(self) -> list[dict]:
        return [r for r in self.runs if r["status"] != "success"]


# ---------------------------------------------------------------------------------------------- collect


def collect(dirs: list[str | os.PathLike]) -> Report:
    roots = [Path(d) for d in dirs]
    for root in roots:
        if not root.is_dir():
            raise ReportError(f"{root}: no such directory", "pass run, experiment or results directories")
    rows: dict[str, dict] = {}
    histories: dict[str, dict] = {}
    base = Path(os.path.commonpath([r.resolve() for r in roots]))
    if len(roots) == 1 and (base / CONFIG).is_file() and not (base / EXPERIMENT).is_file():
        base = base.parent  # a single run directory: name it by its own name
    for root in roots:
        for config in sorted(root.rglob(CONFIG)):
            run = config.parent
            if (run / EXPERIMENT).is_file() or "report" in run.relative_to(root).parts:
                continue
            name = run.resolve().relative_to(base).as_posix()
            rows[name], histories[name] = _run_row(run, name)
        for exp in find_experiments(root):
            states = task_states(exp, _queue_for(exp))
            latest = {st.run_dir for st in states if st.run_dir is not None}
            for (job, task), run in exp.run_dirs().items():
                name = run.resolve().relative_to(base).as_posix()
                if run not in latest and name in rows and rows[name]["status"] != "success":
                    rows[name]["status"] = "superseded"
                    rows[name]["reason"] = f"task {task} was submitted again; {rows[name]['reason']}"
            for st in states:
                if st.run_dir is None or st.state in ("missing", "pending", "running"):
                    name = (st.run_dir.resolve().relative_to(base).as_posix() if st.run_dir else
                            f"{exp.path.resolve().relative_to(base).as_posix()}/task {st.task}")
                    row = rows.get(name) or _empty_row(_experiment_label(exp, base), name)
                    row.update(status=st.state, seed=st.seed, reason=st.reason)
                    rows[name] = row
    ordered = [rows[k] for k in sorted(rows, key=lambda k: (rows[k]["experiment"], k))]
    return Report(ordered, summarise(ordered), {k: histories[k] for k in sorted(histories)})


def _queue_for(exp: Experiment):
    from .slurm import queue_states

    jobs = sorted({str(s["array_job_id"]) for s in exp.submissions()})
    return queue_states(jobs) if jobs else {}


def _experiment_label(exp: Experiment, base: Path) -> str:
    rel = exp.path.resolve().relative_to(base).as_posix()
    return rel if rel != "." else exp.name


def _empty_row(experiment: str, name: str) -> dict:
    row = {c: None for c in RUN_COLUMNS}
    row.update(experiment=experiment, run=name, reason="")
    return row


def _run_row(run: Path, name: str) -> tuple[dict, dict]:
    experiment = name.rsplit("/", 1)[0] if "/" in name else run.resolve().parent.name
    row = _empty_row(experiment, name)
    history: dict = {}
    state, reason = run_state(run)
    row["status"] = {"done": "success"}.get(state, state)
    row["reason"] = reason
    try:
        results = json.loads((run / RESULTS).read_text())
    except (OSError, json.JSONDecodeError):
        return row, history
    manifest = _read_json(run / "manifest.json")
    timing, test, energy = results.get("timing") or {}, results.get("test") or {}, results.get("energy") or {}
    devices = [d for d in results.get("devices") or [] if d != "CPU"]
    gpu_energy = energy.get("gpu") or {}
    epochs = results.get("epochs_run") or 0
    total_j = gpu_energy.get("total_j")
    row.update(
        seed=results.get("seed"), epochs_run=epochs,
        train_accuracy=(results.get("train") or {}).get("accuracy"),
        test_accuracy=test.get("avg_accuracy"),
        time_per_epoch_s=timing.get("time_per_epoch_s"), time_per_inference_s=timing.get("time_per_inference_s"),
        gpu=devices[0] if devices else "CPU", gpus=len(devices),
        machine=(manifest.get("host") or {}).get("hostname") or "-",
        gpu_energy_j=total_j, gpu_energy_per_epoch_j=_mean(gpu_energy.get("per_epoch_j") or []),
        gpu_energy_above_idle_j=gpu_energy.get("above_idle_j"),
        energy_method=gpu_energy.get("method") or "none", division=results.get("division"),
    )
    history = {k: list(v) for k, v in (results.get("history") or {}).items()}
    history["epoch_s"] = list(timing.get("epoch_s") or [])
    history["energy_j"] = list(gpu_energy.get("per_epoch_j") or [])
    if row["status"] == "success" and test == {} and results.get("test") is None:
        row["reason"] = "no inference (infer.enabled false)"
    return row, history


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# -------------------------------------------------------------------------------------------- statistics


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def describe(values: list[float]) -> dict:
    """n, mean, sample std, Student-t 95 % interval of the mean, min, max and the olympic mean (the mean
    without the single lowest and highest value, as MLPerf scores repeated runs; needs n >= 3)."""
    v = sorted(x for x in values if x is not None and math.isfinite(x))
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95_low": None, "ci95_high": None, "min": None, "max": None,
                "olympic_mean": None}
    mean = sum(v) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else None
    half = (_T95[n - 2] if n - 1 <= len(_T95) else 1.96) * std / math.sqrt(n) if std is not None else None
    return {"n": n, "mean": mean, "std": std,
            "ci95_low": mean - half if half is not None else None,
            "ci95_high": mean + half if half is not None else None,
            "min": v[0], "max": v[-1], "olympic_mean": sum(v[1:-1]) / (n - 2) if n >= 3 else None}


def summarise(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r["status"] == "success":
            groups.setdefault((r["experiment"], r["machine"], r["gpu"]), []).append(r)
    out = []
    for (experiment, machine, gpu), members in sorted(groups.items()):
        for metric in METRICS:
            stats = describe([m[metric] for m in members])
            if stats["n"]:
                out.append({"experiment": experiment, "machine": machine, "gpu": gpu, "metric": metric, **stats})
    return out


# ------------------------------------------------------------------------------------------------ output


def to_csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: _csv_value(r.get(c)) for c in columns})
    return buf.getvalue()


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _f(v, digits=4):
    return None if v is None else round(v, digits)


def markdown(report: Report, plots: list[str] | None = None) -> str:
    runs, summary = report.runs, report.summary
    ok = [r for r in runs if r["status"] == "success"]
    lines = ["# CloudMask benchmark report", "",
             f"{len(runs)} runs: {len(ok)} successful, {len(runs) - len(ok)} failed, interrupted, incomplete "
             "or missing (listed below).", ""]
    lines += ["## Summary across repeats", "",
              "Mean ± sample standard deviation, Student-t 95 % confidence interval of the mean, and the olympic "
              "mean (lowest and highest value dropped; n ≥ 3). Successful runs only.", ""]
    if summary:
        lines.append(markdown_table(
            ["experiment", "machine", "GPU", "metric", "n", "mean", "std", "95 % CI", "min", "max", "olympic"],
            [[s["experiment"], s["machine"], s["gpu"], METRICS[s["metric"]], s["n"], _f(s["mean"]), _f(s["std"]),
              f"{s['ci95_low']:.4g} – {s['ci95_high']:.4g}" if s["ci95_low"] is not None else None,
              _f(s["min"]), _f(s["max"]), _f(s["olympic_mean"])] for s in summary]))
    else:
        lines.append("No successful run.")
    lines += ["", "## Runs", ""]
    lines.append(markdown_table(
        ["experiment", "run", "status", "seed", "epochs", "train acc", "test acc", "s/epoch", "s/inference", "GPU",
         "machine", "GPU J", "J/epoch", "J above idle"],
        [[r["experiment"], r["run"], r["status"], r["seed"], r["epochs_run"], _f(r["train_accuracy"]),
          _f(r["test_accuracy"]), _f(r["time_per_epoch_s"], 2), _f(r["time_per_inference_s"], 3), r["gpu"],
          r["machine"], _f(r["gpu_energy_j"], 1), _f(r["gpu_energy_per_epoch_j"], 1),
          _f(r["gpu_energy_above_idle_j"], 1)] for r in runs]))
    problems = report.problems
    lines += ["", "## Failed, interrupted, incomplete or missing runs", ""]
    if problems:
        lines.append(markdown_table(["run", "status", "seed", "reason"],
                                    [[r["run"], r["status"], r["seed"], r["reason"]] for r in problems]))
    else:
        lines.append("None.")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def as_json(report: Report) -> str:
    return json.dumps({"runs": report.runs, "summary": report.summary}, indent=2, default=str) + "\n"


def write(report: Report, out: str | os.PathLike) -> list[Path]:
    """Write runs.csv, summary.csv, report.json and report.md into ``out`` (each replaced atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [fileio.write_text(out / "runs.csv", to_csv(report.runs, RUN_COLUMNS)),
             fileio.write_text(out / "summary.csv", to_csv(report.summary, SUMMARY_COLUMNS)),
             fileio.write_text(out / "report.json", as_json(report))]
    files.append(fileio.write_text(out / "report.md", markdown(report)))
    return files
