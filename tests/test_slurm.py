"""slurm/*.sh and `cloudmask submit | grid` on a real single-node SLURM cluster started by this module.

The cluster (scripts/local_slurm.sh: slurmctld + slurmd, auth/none) needs Debian's slurm-wlm and root; CI installs
it and sets CLOUDMASK_CI=1 so that a missing cluster fails instead of skipping. The daemons are
stopped by PID when the module ends.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, run_cli

# A real cluster and real jobs: minutes. Left out of the default run; `./scripts/test.sh -m slow` (and CI) runs them,
# all on one pytest-xdist worker (test.sh's --dist loadfile: the cluster's ports are fixed, one cluster at a time).
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TRAIN_SH, AGGREGATE_SH = REPO / "slurm" / "train.sh", REPO / "slurm" / "aggregate.sh"
# the tasks share 2 CPUs; --gres=none/--mem override the GPU-node defaults in train.sh's #SBATCH lines
SMALL_NODE = ["--gres=none", "--cpus-per-task=1", "--mem=2G"]
TINY_ARGS = " ".join(f"--set {kv}" for kv in TINY)


def _slurm_missing() -> str | None:
    if not (shutil.which("slurmctld") or Path("/usr/sbin/slurmctld").exists()):
        return "slurm-wlm is not installed (apt-get install slurm-wlm)"
    if os.geteuid() != 0:
        return "the local SLURM cluster must be started as root"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = _slurm_missing()
    if reason:
        if os.environ.get("CLOUDMASK_CI") == "1":
            pytest.fail(f"CLOUDMASK_CI=1 but {reason}")
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm")
    script = REPO / "scripts" / "local_slurm.sh"
    started = subprocess.run([str(script), "start", str(state)], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf"), "TF_CPP_MIN_LOG_LEVEL": "2",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}:/usr/sbin",
           "CONTAINER": "none"}
    try:
        yield env
    finally:
        subprocess.run([str(script), "stop", str(state)], capture_output=True, timeout=60)
        for pid_file in ("slurmctld.pid", "slurmd.pid"):
            assert not (state / pid_file).exists(), f"{pid_file} left behind"


def sh(env: dict, *cmd: str, cwd=None) -> str:
    done = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert done.returncode == 0, f"{cmd}: {done.stdout}{done.stderr}"
    return done.stdout.strip()


def job_records(env: dict, job: str) -> list[dict]:
    """One dict per array task (scontrol -o), while the controller remembers the job (MinJobAge=3600)."""
    out = sh(env, "scontrol", "-o", "show", "job", job)
    return [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in out.splitlines()]


def controller_log(env: dict, lines: int = 20) -> str:
    """The end of slurmctld's log, for a failure message: why a job did not start."""
    log = Path(env["SLURM_CONF"]).parent / "log" / "slurmctld.log"
    return "slurmctld.log:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def wait_until_done(env: dict, *jobs: str, timeout: float = 420, restarts: int = 0) -> None:
    """Until every task of ``jobs`` is in a final state per the controller (squeue alone is not enough: a job
    being requeued briefly leaves its listing), after at least ``restarts`` requeues of each. A final state
    counts once two polls 3 s apart agree: a requeue in progress can show one for a moment on a loaded machine."""
    deadline, settled = time.time() + timeout, None
    while time.time() < deadline:
        records = [r for job in jobs for r in job_records(env, job)]
        final = [(r["JobState"], r["Restarts"]) for r in records]
        if all(r["JobState"] in TERMINAL and int(r["Restarts"]) >= restarts for r in records):
            if settled and settled[0] == final and time.time() - settled[1] >= 3:
                return
            settled = settled if settled and settled[0] == final else (final, time.time())
        else:
            settled = None
        time.sleep(1)
    raise AssertionError(f"jobs {jobs} not finished after {timeout} s:\n{records}\n{controller_log(env)}")


def wait_for_epoch(run: Path, epochs: int, log_file: Path, timeout: float = 300) -> None:
    """Until the run has committed ``epochs`` epochs (state.json)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if json.loads((run / "state.json").read_text()).get("epochs_done", 0) >= epochs:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(log_file.read_text() if log_file.exists() else "task never started")


def results_of(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def test_an_array_of_two_then_the_aggregation(cluster, dataset, tmp_path):
    env = {**cluster, "DATA_DIR": str(dataset), "RESULTS_DIR": str(tmp_path / "results"), "EXPERIMENT": "pair",
           "EXTRA_ARGS": TINY_ARGS}
    (tmp_path / "logs").mkdir()
    array = sh(env, "sbatch", "--parsable", "--array=1-2", *SMALL_NODE, str(TRAIN_SH), cwd=tmp_path)
    exp = tmp_path / "results" / "pair"
    agg = sh(env, "sbatch", "--parsable", f"--dependency=afterany:{array}", str(AGGREGATE_SH), str(exp),
             cwd=tmp_path)
    wait_until_done(env, array, agg)

    runs = {t: exp / f"{array}_{t}" for t in (1, 2)}
    for task, run in runs.items():
        log = (tmp_path / "logs" / f"{array}_{task}.out").read_text()  # #SBATCH --output=logs/%A_%a.out
        assert f"seed {task} = BASE_SEED 0 + task {task}" in log
        r = results_of(run)
        assert r["status"] == "success", log
        assert r["seed"] == task
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["slurm"]["SLURM_ARRAY_TASK_ID"] == str(task)
        assert run_cli("check-log", str(run)).returncode == 0
    assert runs[1] != runs[2]

    tasks = job_records(env, array)
    report_job = job_records(env, agg)[0]
    assert all(t["JobState"] == "COMPLETED" for t in tasks)
    assert report_job["JobState"] == "COMPLETED"
    assert report_job["StartTime"] >= max(t["EndTime"] for t in tasks)  # ISO times compare as strings
    with open(exp / "report" / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["run"], r["seed"], r["status"]) for r in rows) == [
        (f"{array}_1", "1", "success"), (f"{array}_2", "2", "success")]
    summary = (exp / "report" / "report.md").read_text()
    assert "### pair · " in summary and "| test accuracy | 2 |" in summary


def _submit_one(env: dict, tmp_path: Path, experiment: str, epochs: int) -> tuple[str, Path, Path]:
    env.update({"RESULTS_DIR": str(tmp_path / "results"), "EXPERIMENT": experiment,
                "EXTRA_ARGS": f"{TINY_ARGS} --set train.epochs={epochs}"})
    log_file = tmp_path / "task.out"
    job = sh(env, "sbatch", "--parsable", "--array=1", *SMALL_NODE, f"--output={log_file}", str(TRAIN_SH))
    return job, tmp_path / "results" / experiment / f"{job}_1", log_file


def test_usr1_from_the_time_limit_or_the_user_requeues_and_resumes_the_same_run(cluster, dataset, tmp_path):
    """The time limit's `--signal=B:USR1@300` (USR1 to the batch shell, which hands it on), then a user's
    `scancel --signal=USR1 JOB` (USR1 to the job step): each checkpoints, requeues and resumes."""
    epochs = 6
    env = {**cluster, "DATA_DIR": str(dataset)}
    job, run, log_file = _submit_one(env, tmp_path, "pre", epochs)
    wait_for_epoch(run, 1, log_file)
    sh(env, "scancel", "--signal=USR1", "--batch", f"{job}_1")  # what the time limit's B:USR1 does
    deadline = time.time() + 300
    while (record := job_records(env, job)[0])["JobState"] != "RUNNING" or int(record["Restarts"]) < 1:
        failed = int(record["Restarts"]) >= 1 and record["JobState"] in TERMINAL  # the restart did not start
        assert time.time() < deadline and not failed, log_file.read_text() + controller_log(env)
        time.sleep(0.5)
    wait_for_epoch(run, json.loads((run / "state.json").read_text())["epochs_done"] + 1, log_file)
    sh(env, "scancel", "--signal=USR1", f"{job}_1")  # the user's command: the job step, not the batch shell

    wait_until_done(env, job, restarts=2)
    log = log_file.read_text()
    assert log.count("requeued job") == 2 and "received USR1" in log, log
    assert "(restart 1): resuming" in log and "(restart 2): resuming" in log, log
    record = job_records(env, job)[0]
    assert record["Restarts"] == "2" and record["JobState"] == "COMPLETED", record

    r = results_of(run)
    assert r["status"] == "success" and r["attempts"] == 3 and r["epochs_run"] == epochs
    resumed = [int(n) for n in re.findall(r"resuming after epoch (\d+)", (run / "console.log").read_text())]
    assert len(resumed) == 2 and 1 <= resumed[0] < resumed[1] < epochs, resumed
    with open(run / "history.csv") as f:  # every epoch once: resumed, not restarted
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == list(range(1, epochs + 1))
    assert run_cli("check-log", str(run)).returncode == 0


def test_scancel_cancels_keeps_the_checkpoint_and_scontrol_requeue_continues(cluster, dataset, tmp_path):
    """A user's `scancel JOB` is a cancel, not a preemption: the run checkpoints and the job stays CANCELLED;
    `scontrol requeue JOB` (docs/slurm.md) later continues the same run directory."""
    epochs = 3
    env = {**cluster, "DATA_DIR": str(dataset)}
    job, run, log_file = _submit_one(env, tmp_path, "cancel", epochs)
    wait_for_epoch(run, 1, log_file)
    sh(env, "scancel", job)
    wait_until_done(env, job)
    record = job_records(env, job)[0]
    assert (record["JobState"], record["Restarts"]) == ("CANCELLED", "0"), record
    log = log_file.read_text()
    assert "requeued job" not in log and "not requeued" in log, log
    r = results_of(run)
    assert r["status"] == "interrupted" and "SIGTERM received" in r["error"], r
    kept = json.loads((run / "state.json").read_text())["epochs_done"]
    assert 1 <= kept < epochs and (run / "checkpoints").is_dir()

    sh(env, "scontrol", "requeue", job)
    wait_until_done(env, job, restarts=1)
    assert job_records(env, job)[0]["JobState"] == "COMPLETED", log_file.read_text()
    r = results_of(run)
    assert r["status"] == "success" and r["attempts"] == 2 and r["epochs_run"] == epochs
    assert f"resuming after epoch {kept}" in (run / "console.log").read_text()


def test_a_grid_with_a_failing_experiment(cluster, dataset, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "name: g\n"
        "set: {model.filters: 4, model.depth: 2, train.batch_size: 8, train.epochs: 1, infer.max_files: 1}\n"
        "grid:\n  data.train_dir: [null, /nonexistent/training]\n"
        "repeats: 1\nbase_seed: 100\n")
    results = tmp_path / "results"
    plan = run_cli("grid", "plan", str(grid), "--results", str(results), env=cluster)
    assert plan.returncode == 0, plan.stderr
    good, bad = results / "g" / "train_dir=null", results / "g" / "train_dir=-nonexistent-training"
    assert (good / "config.yaml").is_file() and (bad / "experiment.yaml").is_file()

    done = run_cli("grid", "submit", str(results / "g"), "--container", "none", "--data", str(dataset),
                   *(f"--sbatch-arg={a}" for a in SMALL_NODE), env=cluster)
    assert done.returncode == 0, done.stderr
    jobs = re.findall(r"array job (\d+)", done.stdout) + re.findall(r"aggregation: job (\d+)", done.stdout)
    assert len(jobs) == 3, done.stdout
    wait_until_done(cluster, *jobs)

    status = run_cli("grid", "status", str(results / "g"), env=cluster)
    assert status.returncode == 0
    lines = {ln.split()[0]: ln for ln in status.stdout.splitlines() if ln.startswith("train_dir=")}
    assert "done" in lines["train_dir=null"].split()
    assert "failed" in lines["train_dir=-nonexistent-training"].split() and "data.train_dir" in status.stdout

    report = (results / "g" / "report" / "report.md").read_text()  # written by the aggregation job
    problems = report.split("## Failed")[1]
    assert "train_dir=-nonexistent-training" in problems and "data.train_dir" in problems
    good_job = re.search(r"train_dir=null: array job (\d+)", done.stdout)[1]
    assert results_of(good / f"{good_job}_1")["seed"] == 101

    again = run_cli("grid", "resubmit", str(results / "g"), "--container", "none", "--dry-run", env=cluster)
    assert again.returncode == 0, again.stderr
    sbatch_lines = [ln for ln in again.stdout.splitlines() if "train.sh" in ln]
    assert len(sbatch_lines) == 1 and "EXPERIMENT=train_dir=-nonexistent-training" in sbatch_lines[0]
    assert "--array=1 " in sbatch_lines[0]


def test_train_multinode_runs_two_srun_tasks_as_one_run(cluster, prepared, tmp_path):
    """slurm/train_multinode.sh: `srun -n 2` starts two cooperating workers (TF_CONFIG made from SLURM's
    variables) that train one model and write exactly one run directory."""
    env = {**cluster, "DATA_STORE": str(prepared), "RESULTS_DIR": str(tmp_path / "results"), "EXPERIMENT": "mn",
           "EXTRA_ARGS": TINY_ARGS + " --set infer.max_files=1 --set telemetry.idle_seconds=0", "TMPDIR": str(tmp_path)}
    (tmp_path / "logs").mkdir()
    job = sh(env, "sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-task=0",
             "--cpus-per-task=1", "--mem=4G", str(REPO / "slurm" / "train_multinode.sh"), cwd=tmp_path)
    wait_until_done(env, job)
    log = (tmp_path / "logs" / f"{job}.out").read_text()  # #SBATCH --output=logs/%j.out
    assert job_records(env, job)[0]["JobState"] == "COMPLETED", log
    assert "srun -n 2 " in log and "worker 0 of 2 (SLURM, localhost:" in log and "worker 1 of 2 (SLURM" in log
    exp = tmp_path / "results" / "mn"
    assert [p.name for p in exp.iterdir()] == [f"{job}_0"]
    r = results_of(exp / f"{job}_0")
    assert (r["status"], r["strategy"], r["replicas"]) == ("success", "multi_worker", 2)
    assert (r["distributed"]["source"], r["distributed"]["workers"], r["distributed"]["nodes"]) == ("SLURM", 2, 1)
    assert [w["patches"] for w in r["distributed"]["per_worker"]] == [80, 80]  # 2 epochs x 10 steps x 4 each
    assert run_cli("check-log", str(exp / f"{job}_0")).returncode == 0
    assert not list(tmp_path.glob("cloudmask-worker*"))  # the second worker's scratch directory is removed


def test_train_multinode_without_a_store_refuses_to_start(cluster, tmp_path):
    env = {k: v for k, v in cluster.items() if k != "DATA_STORE"}
    (tmp_path / "logs").mkdir()
    job = sh(env, "sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-task=0",
             "--cpus-per-task=1", "--mem=1G", str(REPO / "slurm" / "train_multinode.sh"), cwd=tmp_path)
    wait_until_done(env, job)
    assert job_records(env, job)[0]["JobState"] == "FAILED"
    assert "DATA_STORE is not set" in (tmp_path / "logs" / f"{job}.out").read_text()


def test_the_reframe_check_passes_on_the_slurm_cluster(cluster, dataset, tmp_path):
    """scripts/reframe/cloudmask_check.py submitted by the real ReFrame through sbatch (its squeue backend: the
    test cluster keeps no accounting for sacct), with a site config naming the cluster's partition."""
    from test_reframe import perflog_values, run_reframe

    partition = {"name": "debug", "scheduler": "squeue", "launcher": "local", "environs": ["builtin"],
                 "access": ["--partition=debug", *SMALL_NODE]}
    config = {"systems": [{"name": "localslurm", "descr": "the test cluster", "hostnames": [".*"],
                           "partitions": [partition]}],
              "environments": [{"name": "builtin"}]}
    settings = tmp_path / "settings.py"
    settings.write_text(f"site_configuration = {config!r}\n")
    prefix = tmp_path / "rfm"
    done = run_reframe(prefix, dataset, "-C", str(settings), env=cluster)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "PASSED" in done.stdout and "@localslurm:debug" in done.stdout
    assert "Job type: batch job" not in done.stdout  # no failure report
    job_script = next(prefix.rglob("rfm_job.sh")).read_text()
    assert "#SBATCH --partition=debug" in job_script and "check-log run" in job_script
    line = perflog_values(prefix)
    assert line[0] == "pass" and "patches/s" in line
