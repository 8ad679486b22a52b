"""``cloudmask report``: every run below some directories, as tables and statistics across repeats.

Runs are found by their ``config.yaml`` (docs/results.md). Experiment directories (``experiment.yaml``) also say
which repeats were expected, so a repeat that never wrote a run directory is listed as missing. Failed,
interrupted, running, incomplete and missing runs are always listed with their reason; statistics use successful runs.
Output is a function of the inputs only (sorted, no timestamps), so a report can be regenerated and diffed.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import fileio
from ..cli.tables import format_cell, plural
from ..errors import CloudmaskError
from ..run.run_dir import CONFIG, RESULTS
from .experiments import EXPERIMENT, Experiment, find_experiments, run_state, task_states
from .plots import plot_all
from .slurm import queue_of

RUN_COLUMNS = ["experiment", "run", "status", "seed", "epochs_run", "train_accuracy", "test_accuracy",
               "time_per_epoch_s", "time_per_inference_s", "gpu", "gpus", "machine", "gpu_energy_j",
               "gpu_energy_per_epoch_j", "gpu_energy_above_idle_j", "energy_method", "target", "epochs_to_target",
               "time_to_target_s", "energy_to_target_j", "energy_to_target_above_idle_j", "division", "reason"]
METRICS = {"test_accuracy": "test accuracy", "time_per_epoch_s": "time per epoch (s)",
           "time_per_inference_s": "time per inference (s)", "gpu_energy_j": "GPU energy (J)",
           "gpu_energy_per_epoch_j": "GPU energy per epoch (J)",  # the *_target ones: n = runs that reached it
           "time_to_target_s": "time to target (s)", "energy_to_target_j": "GPU energy to target (J)",
           "energy_to_target_above_idle_j": "GPU energy to target above idle (J)"}
SUMMARY_COLUMNS = ["experiment", "machine", "gpu", "metric", "n", "mean", "std", "ci95_low", "ci95_high", "min",
                   "max", "olympic_mean"]

class ReportError(CloudmaskError):
    pass


@dataclass
class Report:
    runs: list[dict]
    summary: list[dict]
    histories: dict[str, dict]  # run -> per-epoch lists, for plots
    power: dict[str, Path] = field(default_factory=dict)  # run -> its power.csv

    @property
    def problems(self) -> list[dict]:
        return [r for r in self.runs if r["status"] != "success"]


# ---------------------------------------------------------------------------------------------- collect


def collect(dirs: list[str | os.PathLike], experiment_name: str | None = None) -> Report:
    """Every run below ``dirs``. ``experiment_name``: the experiment of runs outside experiment directories
    (default: their folder's name, or the command that made them when that folder is the generic ``results``)."""
    roots = [Path(d) for d in dirs]
    for root in roots:
        if not root.is_dir():
            raise ReportError(f"{root}: no such directory", "pass run, experiment or results directories")
    rows: dict[str, dict] = {}
    histories: dict[str, dict] = {}
    power: dict[str, Path] = {}
    base = Path(os.path.commonpath([r.resolve() for r in roots]))
    if len(roots) == 1 and (base / CONFIG).is_file() and not (base / EXPERIMENT).is_file():
        base = base.parent  # a single run directory: name it by its own name
    for root in roots:
        for run in run_dirs(root):
            name = run.resolve().relative_to(base).as_posix()
            rows[name], histories[name] = _run_row(run, name, experiment_name)
            if (run / "power.csv").is_file():
                power[name] = run / "power.csv"
        experiments = find_experiments(root)
        queue = queue_of(experiments)
        for exp in experiments:
            states = task_states(exp, queue)
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
    if not rows:
        raise ReportError(f"{', '.join(map(str, roots))}: no runs found (no config.yaml or results.json below)",
                          "pass run, experiment or results directories")
    ordered = [rows[k] for k in sorted(rows, key=lambda k: (rows[k]["experiment"], k))]
    return Report(ordered, summarise(ordered), {k: histories[k] for k in sorted(histories)},
                  {k: power[k] for k in sorted(power)})


def default_out(first: Path) -> Path:
    """Where a report goes without --out: FIRST/report for a folder of runs, and beside a single run directory
    (never inside it: a run directory holds what its run wrote, nothing else)."""
    if (first / CONFIG).is_file() and not (first / EXPERIMENT).is_file():
        return first.resolve().parent / f"report-{first.resolve().name}"
    return first / "report"


def run_dirs(root: Path) -> list[Path]:
    """Every run directory below ``root``: one with config.yaml or results.json (a damaged run is listed with
    its problem, never dropped), except experiment directories and reports."""
    found = {p.parent for name in (CONFIG, RESULTS) for p in root.rglob(name)}
    return sorted(run for run in found
                  if not (run / EXPERIMENT).is_file() and "report" not in run.relative_to(root).parts)


def _experiment_label(exp: Experiment, base: Path) -> str:
    rel = exp.path.resolve().relative_to(base).as_posix()
    return rel if rel != "." else exp.name


def _empty_row(experiment: str, name: str) -> dict:
    row = {c: None for c in RUN_COLUMNS}
    row.update(experiment=experiment, run=name, reason="")
    return row


def _run_row(run: Path, name: str, experiment_name: str | None) -> tuple[dict, dict]:
    """The run's row of the runs table and its per-epoch history; a results.json whose structure is not the
    documented one is listed as ``unreadable`` with the reason."""
    experiment = _experiment_of(run, name, experiment_name)
    try:
        return _read_run(run, name, experiment)
    except (AttributeError, TypeError, ValueError) as e:
        row = _empty_row(experiment, name)
        row.update(status="unreadable", reason=f"results.json: unexpected structure ({type(e).__name__}: {e})")
        return row, {}


# Folders that say nothing about what their runs have in common (output.root's default)
GENERIC_FOLDERS = {"results", "runs", "output", "outputs"}


def _experiment_of(run: Path, name: str, experiment_name: str | None) -> str:
    folder = name.rsplit("/", 1)[0] if "/" in name else run.resolve().parent.name
    if (run.parent / EXPERIMENT).is_file():
        return folder
    if experiment_name:
        return experiment_name
    if folder.rsplit("/", 1)[-1] not in GENERIC_FOLDERS:
        return folder
    manifest = _read_json(run / "manifest.json")
    command = manifest.get("command") if isinstance(manifest, dict) else None
    verb = command[1] if isinstance(command, list) and len(command) > 1 else None
    return f"{verb} runs" if verb in ("bench", "train", "infer") else "runs"


def _read_run(run: Path, name: str, experiment: str) -> tuple[dict, dict]:
    row = _empty_row(experiment, name)
    history: dict = {}
    state, reason = run_state(run)
    row["status"] = {"done": "success"}.get(state, state)
    row["reason"] = reason
    if state == "unreadable" or not (run / RESULTS).is_file():
        return row, history
    results = _read_json(run / RESULTS)
    manifest = _read_json(run / "manifest.json")
    manifest = manifest if isinstance(manifest, dict) else {}
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
    target = results.get("target") or {}
    if target:
        row.update(target=f"{target.get('metric')} {target.get('value')}",
                   **{k: target.get(k) for k in ("epochs_to_target", "time_to_target_s", "energy_to_target_j",
                                                 "energy_to_target_above_idle_j")})
    history = {k: list(v) for k, v in (results.get("history") or {}).items()}
    history["experiment"], history["seed"], history["status"] = experiment, row["seed"], row["status"]
    history["epoch_s"] = list(timing.get("epoch_s") or [])
    history["energy_j"] = list(gpu_energy.get("per_epoch_j") or [])
    history["target"] = target.get("value") if target.get("metric") == "val_accuracy" else None
    if row["status"] == "success" and test == {} and results.get("test") is None:
        row["reason"] = "no inference (infer.enabled false)"
    return row, history


def _read_json(path: Path):
    """The parsed file ({} when missing or not JSON); any JSON value, so callers check its type."""
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
    half = _t95(n - 1) * std / math.sqrt(n) if std is not None else None
    return {"n": n, "mean": mean, "std": std,
            "ci95_low": mean - half if half is not None else None,
            "ci95_high": mean + half if half is not None else None,
            "min": v[0], "max": v[-1], "olympic_mean": sum(v[1:-1]) / (n - 2) if n >= 3 else None}


def _t95(dof: int) -> float:
    """The two-sided 95 % Student t quantile, exact for any number of degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


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
    return fileio.csv_text(columns, ({c: _csv_value(r.get(c)) for c in columns} for r in rows))


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _f(v, digits=4):
    return None if v is None else round(v, digits)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Columns of free text (error messages with long paths): the only cells the HTML may break inside a word, so
# that a narrow screen squeezes them and never a status or a number
FREE_TEXT = {"reason"}


def _table(headers: list[str], rows: list[list], **extra) -> dict:
    """A table for the templates; ``numeric``: columns of numbers and empty cells (right-aligned, an all-empty
    column too: a CPU run's GPU energy), ``free``: the FREE_TEXT columns."""
    numeric = [h not in FREE_TEXT and all(_is_number(row[i]) or row[i] in (None, "") for row in rows)
               for i, h in enumerate(headers)]
    return {"headers": headers, "rows": rows, "numeric": numeric, "free": [h in FREE_TEXT for h in headers], **extra}


# The per-run tables: a main one and one of energy and target details, each narrow enough for a laptop screen
RUN_TABLE = [("run", "run"), ("status", "status"), ("seed", "seed"), ("epochs", "epochs_run"),
             ("train accuracy", "train_accuracy"), ("test accuracy", "test_accuracy"),
             ("time per epoch (s)", "time_per_epoch_s"), ("time per test image (s)", "time_per_inference_s")]
DETAIL_TABLE = [("run", "run"), ("machine", "machine"), ("GPU", "gpu"), ("GPU energy (J)", "gpu_energy_j"),
                ("per epoch (J)", "gpu_energy_per_epoch_j"), ("above idle (J)", "gpu_energy_above_idle_j"),
                ("epochs to target", "epochs_to_target"), ("time to target (s)", "time_to_target_s"),
                ("energy to target (J)", "energy_to_target_j")]
DIGITS = {"time_per_epoch_s": 2, "time_per_inference_s": 3, "gpu_energy_j": 1, "gpu_energy_per_epoch_j": 1,
          "gpu_energy_above_idle_j": 1, "time_to_target_s": 1, "energy_to_target_j": 1}


def _run_tables(runs: list[dict], experiment: str) -> dict:
    """One experiment's runs, named relative to it."""
    def cell(r, key):
        if key == "run":
            return r["run"].removeprefix(f"{experiment}/")
        return _f(r[key], DIGITS.get(key, 4)) if isinstance(r[key], float) else r[key]

    tables = {"name": experiment, "count": plural(len(runs), "run")}
    for what, columns in (("runs", RUN_TABLE), ("details", DETAIL_TABLE)):
        tables[what] = _table([h for h, _ in columns], [[cell(r, k) for _, k in columns] for r in runs])
    return tables


def _summary_groups(report: Report) -> list[dict]:
    groups: dict[tuple, list] = {}
    for s in report.summary:
        low, high = (format_cell(_f(s[k])) for k in ("ci95_low", "ci95_high"))
        groups.setdefault((s["experiment"], s["machine"], s["gpu"]), []).append(
            [METRICS[s["metric"]], s["n"], _f(s["mean"]), _f(s["std"]),
             None if s["ci95_low"] is None else f"{low} – {high}",
             _f(s["min"]), _f(s["max"]), _f(s["olympic_mean"])])
    return [_table(["metric", "n", "mean", "std", "95 % CI", "min", "max", "olympic mean"], rows,
                   name=f"{exp} · {machine} · {gpu}") for (exp, machine, gpu), rows in groups.items()]


def _context(report: Report, plots: list[Path], note: str | None, inline: bool) -> dict:
    """What report.md and report.html show: the same tables, so the two pages never disagree."""
    ok = sum(r["status"] == "success" for r in report.runs)
    experiments = sorted({r["experiment"] for r in report.runs})
    not_ok = len(report.runs) - ok
    return {
        "title": "CloudMask benchmark report",
        "counts": f"{plural(len(report.runs), 'run')} in {plural(len(experiments), 'experiment')}: {ok} "
                  f"successful" + (f", {not_ok} failed, interrupted, running, incomplete or missing" if not_ok else ""),
        "summary_note": "Mean ± sample standard deviation, Student-t 95 % confidence interval of the mean, and the "
                        "olympic mean (lowest and highest value dropped; n ≥ 3). Successful runs only.",
        "summary": _summary_groups(report),
        "experiments": [_run_tables([r for r in report.runs if r["experiment"] == e], e) for e in experiments],
        "problems": _table(["run", "status", "seed", "reason"],
                           [[r["run"], r["status"], r["seed"], r["reason"]] for r in report.problems]),
        "plots": [{"name": p.name, "stem": p.stem,
                   "base64": base64.b64encode(p.read_bytes()).decode() if inline else None} for p in plots],
        "note": note,
    }


@functools.lru_cache(maxsize=1)
def _templates():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("cloudmask.campaign", "templates"),
                             autoescape=lambda name: bool(name) and name.endswith(".html.j2"),
                             undefined=jinja2.StrictUndefined)
    env.filters["cell"] = format_cell
    env.tests["number"] = _is_number
    return env


def markdown(report: Report, plots: list[Path] | None = None, note: str | None = None) -> str:
    return _templates().get_template("report.md.j2").render(_context(report, plots or [], note, inline=False))


def html(report: Report, plots: list[Path] | None = None, note: str | None = None) -> str:
    """One self-contained page: the tables of report.md and the plots inlined as base64 PNGs."""
    return _templates().get_template("report.html.j2").render(_context(report, plots or [], note, inline=True))


def as_json(report: Report) -> str:
    return json.dumps({"runs": report.runs, "summary": report.summary}, indent=2, default=str) + "\n"


def write(report: Report, out: str | os.PathLike) -> list[Path]:
    """Write runs.csv, summary.csv, report.json, the plots, report.md and report.html into ``out``. They are made
    together in a temporary directory beside it and swapped in at once, so a killed report leaves the previous
    report (or none), never a mix of two; a dead writer's temporary directory is removed by the next report."""
    out = Path(out)
    if out.is_dir() and any(not _ours(p) for p in out.iterdir()):
        raise ReportError(f"{out}: holds files that are not a report's ({_foreign(out)})",
                          "write the report to its own directory (--out DIR)")
    with fileio.replacing_dir(out) as tmp:
        files = [fileio.write_text(tmp / "runs.csv", to_csv(report.runs, RUN_COLUMNS)),
                 fileio.write_text(tmp / "summary.csv", to_csv(report.summary, SUMMARY_COLUMNS)),
                 fileio.write_text(tmp / "report.json", as_json(report))]
        plots, note = plot_all(report, tmp)
        files += plots
        files.append(fileio.write_text(tmp / "report.md", markdown(report, plots, note)))
        files.append(fileio.write_text(tmp / "report.html", html(report, plots, note)))
    return [out / f.name for f in files]


def _ours(path: Path) -> bool:
    return path.is_file() and (path.suffix == ".png" or path.name in REPORT_FILES)


def _foreign(out: Path) -> str:
    return ", ".join(sorted(p.name for p in out.iterdir() if not _ours(p))[:3])


REPORT_FILES = ("runs.csv", "summary.csv", "report.json", "report.md", "report.html")
