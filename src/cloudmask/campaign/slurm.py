"""Submitting experiments to SLURM and asking the queue about them.

One array of ``slurm/train.sh`` per experiment (one task per seeded repeat) plus one ``slurm/aggregate.sh`` job
that runs ``cloudmask report`` once every array has ended (``afterany``: failed tasks are reported, not waited
for). The scripts read their settings from the environment, so every command is printed as it would be typed.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CloudmaskError, ConfigError
from .experiments import Experiment

log = logging.getLogger(__name__)

CONTAINERS = ("apptainer", "singularity", "none")


class SlurmError(CloudmaskError):
    """sbatch or squeue failed, or is not installed."""


@dataclass
class SubmitOptions:
    data: str | None = None
    container: str = "apptainer"
    image: str | None = None
    stage: bool = False
    extra_args: str = ""
    sbatch_args: list[str] = field(default_factory=list)
    scripts: str | None = None
    dry_run: bool = False

    def __post_init__(self):
        if self.container not in CONTAINERS:
            raise ConfigError(f"--container {self.container!r} is not one of {', '.join(CONTAINERS)}")


INSTALLED_SCRIPTS = Path(sys.prefix) / "share" / "cloudmask-bench" / "slurm"  # pyproject's data-files


def scripts_dir(explicit: str | None = None) -> Path:
    """``explicit``, else this checkout's slurm/, else the copy an installed package carries
    (<prefix>/share/cloudmask-bench/slurm), else ./slurm."""
    checkout = Path(__file__).resolve().parents[3] / "slurm"
    candidates = [Path(explicit)] if explicit else [checkout, INSTALLED_SCRIPTS, Path("slurm")]
    for c in candidates:
        if (c / "train.sh").is_file() and (c / "aggregate.sh").is_file():
            return c.resolve()
    raise SlurmError(f"slurm/train.sh not found (looked in {', '.join(str(c) for c in candidates)})",
                     "install cloudmask-bench with pip (it carries the scripts), run from the checkout, or pass "
                     "--scripts DIR")


def array_spec(tasks: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3,5'."""
    parts, ordered = [], sorted(set(tasks))
    start = prev = ordered[0]
    for t in ordered[1:] + [None]:
        if t is not None and t == prev + 1:
            prev = t
            continue
        parts.append(f"{start}-{prev}" if prev > start else str(start))
        if t is not None:
            start = prev = t
    return ",".join(parts)


def train_job(exp: Experiment, tasks: list[int], opts: SubmitOptions) -> tuple[dict, list[str]]:
    """(environment, sbatch command) for the array of ``tasks`` of ``exp``."""
    env = {"CONFIG": str(exp.config_file.resolve()), "RESULTS_DIR": str(exp.path.parent.resolve()),
           "EXPERIMENT": exp.path.name, "BASE_SEED": str(exp.base_seed), "CONTAINER": opts.container}
    if opts.data:
        env["DATA_DIR"] = str(Path(opts.data).resolve())
    if opts.image:
        env["IMAGE"] = str(Path(opts.image).resolve())
    if opts.stage:
        env["STAGE"] = "1"
    if opts.extra_args:
        env["EXTRA_ARGS"] = opts.extra_args
    cmd = ["sbatch", "--parsable", f"--array={array_spec(tasks)}", f"--job-name=cm-{exp.path.name}"[:64],
           f"--output={exp.path.resolve() / 'logs' / '%A_%a.out'}", *opts.sbatch_args,
           str(scripts_dir(opts.scripts) / "train.sh")]
    return env, cmd


def aggregate_job(report_root: Path, after: list[str], opts: SubmitOptions) -> tuple[dict, list[str]]:
    env = {"CONTAINER": opts.container}
    if opts.image:
        env["IMAGE"] = str(Path(opts.image).resolve())
    logs = report_root.resolve() / "logs"
    # only the site's account/partition options are passed on: the aggregation needs no GPU
    site = [a for a in opts.sbatch_args if a.split("=", 1)[0] in ("--account", "-A", "--partition", "-p", "--qos")]
    cmd = ["sbatch", "--parsable", f"--dependency=afterany:{':'.join(after)}", "--job-name=cm-report",
           f"--output={logs / 'aggregate-%j.out'}", *site, str(scripts_dir(opts.scripts) / "aggregate.sh"),
           str(report_root.resolve())]
    return env, cmd


def shell_line(env: dict, cmd: list[str]) -> str:
    def quote(arg: str) -> str:  # a dry run's $JOBn placeholders must stay expandable
        return f'"{arg}"' if "$JOB" in arg else shlex.quote(arg)

    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(quote, cmd)])


def sbatch(env: dict, cmd: list[str]) -> str:
    """Submit; return the job id."""
    if shutil.which("sbatch") is None:
        raise SlurmError("sbatch not found: this is not a SLURM login node",
                         "run on the cluster, or use --dry-run to print the commands")
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        msg = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise SlurmError(f"sbatch failed: {msg}", "fix the sbatch options (--sbatch-arg) and submit again")
    return done.stdout.strip().split(";")[0]


def submit(experiments: list[Experiment], tasks: dict[str, list[int]] | None, opts: SubmitOptions,
           report_root: Path) -> list[str]:
    """Submit one array per experiment (``tasks[name]`` or all repeats) and the aggregation after them.
    Returns the printed lines: the commands (dry run) or the job ids."""
    lines, jobs = [], []
    for n, exp in enumerate(experiments, 1):
        todo = exp.tasks if tasks is None else tasks.get(exp.name, [])
        if not todo:
            continue
        env, cmd = train_job(exp, todo, opts)
        if opts.dry_run:
            jobs.append(f"$JOB{n}")
            lines.append(f"JOB{n}=$({shell_line(env, cmd)})")
            continue
        job = sbatch(env, cmd)
        jobs.append(job)
        exp.record_submission({"array_job_id": job, "tasks": todo, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "command": shell_line(env, cmd)})
        lines.append(f"{exp.name}: array job {job} (tasks {array_spec(todo)}, seeds "
                     f"{exp.seed(min(todo))}-{exp.seed(max(todo))})")
    if not jobs:
        return ["nothing to submit"]
    env, cmd = aggregate_job(report_root, jobs, opts)
    if opts.dry_run:
        lines.append(shell_line(env, cmd))
    else:
        (report_root / "logs").mkdir(parents=True, exist_ok=True)
        agg = sbatch(env, cmd)
        lines.append(f"aggregation: job {agg} (after {', '.join(jobs)}; report in {report_root / 'report'})")
    return lines


def queue_of(experiments: list[Experiment]) -> dict[str, str] | None:
    """``queue_states`` of every array job submitted for these experiments, in one squeue call."""
    jobs = sorted({str(s["array_job_id"]) for e in experiments for s in e.submissions()})
    return queue_states(jobs)


def queue_states(job_ids: list[str]) -> dict[str, str] | None:
    """{"<job>_<task>": state} of the given array jobs still known to squeue; None when squeue cannot answer."""
    if not job_ids:
        return {}
    if shutil.which("squeue") is None:
        return None
    done = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(job_ids)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        # finished jobs unknown to squeue make it fail when every id is unknown: nothing is queued then
        return {} if "Invalid job id" in done.stderr else None
    out = {}
    for line in done.stdout.splitlines():
        job, _, state = line.partition("|")
        out[job.strip()] = state.strip()
    return out
