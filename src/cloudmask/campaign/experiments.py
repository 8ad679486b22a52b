"""Experiments (the seeded repeats of one config), grids of experiments, and the state of their tasks.

Experiment directories hold run directories (rundir.py) named ``<job>_<task>`` (docs/slurm.md).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .. import __version__, fileio
from ..config import Config, config_from_dict, load_config, yaml_load
from ..errors import ConfigError, RunDirError
from ..run import lock
from ..run.results import schema_problem
from ..run.run_dir import CONFIG, RESULTS

# --------------------------------------------------------------------------------------------- experiments
#
# An experiment directory groups the seeded repeats of one configuration (docs/slurm.md):
#   <experiment>/experiment.yaml   name, repeats, base seed, grid values, cloudmask version
#   <experiment>/config.yaml       the resolved config every repeat starts from
#   <experiment>/submissions.jsonl one line per sbatch: array job id, task ids, aggregation job id
#   <experiment>/<job>_<task>/     run directories (slurm/train.sh), seed = base_seed + task
#   <experiment>/logs/             the tasks' SLURM output

EXPERIMENT = "experiment.yaml"
SUBMISSIONS = "submissions.jsonl"
_RUN_NAME = re.compile(r"^(?P<job>[^_/]+)_(?P<task>\d+)$")


@dataclass
class Experiment:
    path: Path
    name: str
    repeats: int
    base_seed: int
    values: dict = field(default_factory=dict)

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def tasks(self) -> list[int]:
        return list(range(1, self.repeats + 1))

    def seed(self, task: int) -> int:
        return self.base_seed + task

    def submissions(self) -> list[dict]:
        path = self.path / SUBMISSIONS
        if not path.is_file():
            return []
        out = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    raise RunDirError(f"{path}:{n}: not a JSON line", "repair or remove that line") from None
        return out

    def record_submission(self, record: dict) -> None:
        # appended in one write; the file is only ever written by the submitting command
        with open(self.path / SUBMISSIONS, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def run_dirs(self) -> dict[tuple[str, int], Path]:
        """{(job id, task): run directory} of every run written into this experiment."""
        found = {}
        for child in sorted(self.path.iterdir()):
            m = _RUN_NAME.match(child.name)
            if m and child.is_dir():
                found[(m["job"], int(m["task"]))] = child
        return found


def plan_experiment(path: str | os.PathLike, cfg: Config, repeats: int, base_seed: int,
                    values: dict | None = None) -> Experiment:
    """Create an experiment directory, or accept an existing one with the same config; a different config is
    refused (its runs would no longer match it)."""
    path = Path(path)
    exp = Experiment(path, path.name, repeats, base_seed, dict(values or {}))
    meta = {"name": exp.name, "repeats": repeats, "base_seed": base_seed, "values": exp.values,
            "config_sha256": cfg.sha256(), "cloudmask_version": __version__}
    if (path / EXPERIMENT).is_file():
        old = load_experiment(path)
        old_cfg = config_from_dict(yaml_load(old.config_file.read_text()), str(old.config_file))
        if old_cfg.sha256() != cfg.sha256() or (old.repeats, old.base_seed) != (repeats, base_seed):
            raise RunDirError(f"{path}: experiment exists with a different config, repeats or base seed",
                              "choose a new experiment name (or results directory); runs are never overwritten")
        return old
    path.mkdir(parents=True, exist_ok=True)
    (path / "logs").mkdir(exist_ok=True)
    fileio.write_text(exp.config_file, cfg.to_yaml())
    fileio.write_text(path / EXPERIMENT, yaml.safe_dump(meta, sort_keys=False))
    return exp


def load_experiment(path: str | os.PathLike) -> Experiment:
    path = Path(path)
    meta_file = path / EXPERIMENT
    try:
        meta = yaml_load(meta_file.read_text())
        return Experiment(path, str(meta["name"]), int(meta["repeats"]), int(meta["base_seed"]),
                          dict(meta.get("values") or {}))
    except FileNotFoundError:
        raise RunDirError(f"{path}: not an experiment directory (no {EXPERIMENT})",
                          "plan one with `cloudmask grid plan` or `cloudmask submit`") from None
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise RunDirError(f"{meta_file}: unreadable ({type(e).__name__}: {e})", "the experiment is damaged") from None


def find_experiments(root: str | os.PathLike) -> list[Experiment]:
    """The experiment at ``root`` or every experiment below it (a grid), sorted by path."""
    root = Path(root)
    if (root / EXPERIMENT).is_file():
        return [load_experiment(root)]
    return [load_experiment(p.parent) for p in sorted(root.rglob(EXPERIMENT))]


# ------------------------------------------------------------------------------------------------- grids


GRID_KEYS = {"name", "config", "set", "grid", "repeats", "base_seed"}


@dataclass
class Grid:
    name: str
    base: Config
    axes: dict[str, list]
    repeats: int
    base_seed: int

    def combinations(self) -> list[dict]:
        keys = list(self.axes)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.axes[k] for k in keys))]


def read_grid(path: str | os.PathLike) -> Grid:
    """A grid file: ``name``, optional base ``config`` file and fixed ``set`` values, ``grid`` of dotted keys to
    lists of values, ``repeats`` and ``base_seed``. Every combination is validated before anything is written."""
    path = Path(path)
    try:
        spec = yaml_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read grid file {path}: {e.strerror or e}", "check the path") from None
    except yaml.YAMLError:
        raise ConfigError(f"{path}: is not valid YAML", "fix the syntax") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("grid"), dict) or not spec["grid"]:
        raise ConfigError(f"{path}: needs a 'grid' mapping of config keys to lists of values",
                          "e.g. grid: {train.learning_rate: [0.001, 0.0005]}")
    unknown = set(spec) - GRID_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key '{sorted(unknown)[0]}'", f"allowed: {', '.join(sorted(GRID_KEYS))}")
    axes = {}
    for key, values in spec["grid"].items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{key} must be a non-empty list", f"e.g. {key}: [a, b]")
        axes[str(key)] = values
    config_file = spec.get("config")
    if config_file and not Path(config_file).is_absolute():
        config_file = str(path.parent / config_file)
    fixed = spec.get("set") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{path}: 'set' must be a mapping of config keys to values")
    base = load_config(config_file).with_values(fixed, f"{path}: set")
    for combo in Grid("", base, axes, 1, 0).combinations():
        base.with_values(combo, f"{path}: grid")  # validates every value up front, naming the key
    repeats, base_seed = spec.get("repeats", 5), spec.get("base_seed", 0)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ConfigError(f"{path}: repeats={repeats!r} must be a positive integer")
    if not isinstance(base_seed, int) or isinstance(base_seed, bool) or base_seed < 0:
        raise ConfigError(f"{path}: base_seed={base_seed!r} must be a non-negative integer")
    name = str(spec.get("name") or path.stem)
    return Grid(name, base, axes, repeats, base_seed)


def experiment_name(values: dict) -> str:
    """``learning_rate=0.0005,batch_size=64``: the last part of each key, so names stay short and readable."""
    parts = []
    for key, value in values.items():
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        parts.append(f"{key.rsplit('.', 1)[-1]}={re.sub(r'[^A-Za-z0-9.+-]', '-', text)}")
    return ",".join(parts)


def plan_grid(grid: Grid, results_dir: str | os.PathLike) -> list[Experiment]:
    root = Path(results_dir) / grid.name
    names = [experiment_name(c) for c in grid.combinations()]
    if len(set(names)) != len(names):
        raise ConfigError(f"grid {grid.name}: two combinations give the same directory name",
                          "grid keys must differ in their last part (e.g. not a.x and b.x)")
    return [plan_experiment(root / name, grid.base.with_values(combo, "grid"), grid.repeats, grid.base_seed, combo)
            for name, combo in zip(names, grid.combinations())]


# ------------------------------------------------------------------------------------------ task status


@dataclass
class TaskStatus:
    experiment: str
    task: int
    seed: int
    state: str  # done | running | pending | failed | interrupted | missing
    job: str | None = None
    run_dir: Path | None = None
    reason: str = ""


def task_states(exp: Experiment, queue: dict[str, str] | None = None) -> list[TaskStatus]:
    """The state of every expected repeat: from the queue (``{"<job>_<task>": SLURM state}``, None when SLURM
    cannot be asked) for tasks still queued, else from the run directory of the task's latest submission."""
    asked = queue is not None
    queue = queue or {}
    runs = exp.run_dirs()
    submitted: dict[int, list[str]] = {}
    for s in exp.submissions():
        for t in s.get("tasks", []):
            submitted.setdefault(int(t), []).append(str(s["array_job_id"]))
    out = []
    for task in exp.tasks:
        jobs = submitted.get(task, []) + sorted({j for j, t in runs if t == task and j not in submitted.get(task, [])},
                                                key=_job_order)
        st = TaskStatus(exp.name, task, exp.seed(task), "missing", reason="never submitted")
        for job in reversed(jobs):  # the latest attempt decides, unless it left nothing behind
            st.job = job
            queued = queue.get(f"{job}_{task}")
            run = runs.get((job, task))
            st.run_dir = run
            if queued in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "CONFIGURING", "SUSPENDED"):
                st.state, st.reason = "pending", f"job {job}_{task} {queued.lower()}"
            elif queued in ("RUNNING", "COMPLETING", "STAGE_OUT", "RESIZING", "SIGNALING"):
                st.state, st.reason = "running", f"job {job}_{task} running"
            elif run is not None:
                st.state, st.reason = run_state(run)
                if st.state == "failed" and not (run / RESULTS).is_file():
                    st.reason = _log_error(exp.path / "logs" / f"{job}_{task}.out") or st.reason
            elif (exp.path / "logs" / f"{job}_{task}.out").is_file():
                log_file = exp.path / "logs" / f"{job}_{task}.out"
                st.state = "failed"
                st.reason = _log_error(log_file) or f"ended without a run directory (see {log_file})"
            else:
                st.state = "missing"
                st.reason = (f"job {job}_{task} is not queued and never started" if asked else
                             f"job {job}_{task} has not started (the queue could not be asked)")
                continue
            break
        out.append(st)
    return out


def run_state(run: Path) -> tuple[str, str]:
    """(done | failed | interrupted | unreadable | running, reason) of a run directory no longer in the queue; a
    run whose lock a process holds is running, whatever its files say so far."""
    holding = lock.holder(run)
    if holding is not None:
        return "running", f"in progress: {holding.describe()}"
    path = run / RESULTS
    if not path.is_file():
        return "failed", "no results.json: the run crashed or was killed (see console.log and the SLURM log)"
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return "unreadable", f"results.json: {e}"
    problem = schema_problem(results)
    if problem:
        return "unreadable", f"results.json: {problem} (docs/results.md)"
    status = results.get("status")
    if status == "success":
        return "done", ""
    if status == "interrupted":
        return "interrupted", f"{results.get('error') or 'interrupted'}"
    return "failed", str(results.get("error") or f"status {status!r}")


def _log_error(path: Path) -> str | None:
    """The last error line a task printed (cloudmask's one-line errors, or train.sh's), if any."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    errors = [ln.strip() for ln in lines if "error:" in ln and ("cloudmask" in ln or "train.sh" in ln)]
    return f"{errors[-1]} ({path.name})" if errors else None


def _job_order(job: str):
    return (0, int(job)) if job.isdigit() else (1, job)
