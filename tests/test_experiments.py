"""Experiment directories, grids, task states and sbatch command lines, without a cluster (--dry-run and files)."""

from __future__ import annotations

import json
import shlex

import pytest
from conftest import assert_clean_error, run_cli

from cloudmask.campaign.experiments import load_experiment, plan_experiment, task_states
from cloudmask.campaign.slurm import array_spec
from cloudmask.config import load_config


@pytest.mark.parametrize("tasks, spec", [([1], "1"), ([1, 2, 3, 4, 5], "1-5"), ([5, 1, 2, 3], "1-3,5"),
                                         ([2, 4, 6], "2,4,6"), ([1, 2, 4, 5, 7], "1-2,4-5,7")])
def test_array_spec(tasks, spec):
    assert array_spec(tasks) == spec


def test_submit_dry_run_prints_the_array_and_the_dependent_report_job(tmp_path):
    done = run_cli("submit", "--experiment", "lr", "--results", str(tmp_path), "--repeats", "3", "--base-seed",
                   "40", "--set", "train.learning_rate=0.0005", "--container", "none", "--data", str(tmp_path),
                   "--sbatch-arg=--partition=gpu", "--dry-run")
    assert done.returncode == 0, done.stderr
    train_line, report_line = done.stdout.strip().splitlines()
    assert train_line.startswith("JOB1=$(") and train_line.endswith(")")
    words = shlex.split(train_line[len("JOB1=$("):-1])
    env = dict(w.split("=", 1) for w in words[: words.index("sbatch")])
    assert env["EXPERIMENT"] == "lr" and env["BASE_SEED"] == "40" and env["CONTAINER"] == "none"
    assert env["CONFIG"] == str(tmp_path / "lr" / "config.yaml")
    assert "--array=1-3" in words and "--partition=gpu" in words and words[-1].endswith("slurm/train.sh")
    assert '"--dependency=afterany:$JOB1"' in report_line and "--partition=gpu" in report_line
    assert report_line.split()[-1] == str(tmp_path / "lr")
    # the experiment is planned (config written) but nothing was submitted
    exp = load_experiment(tmp_path / "lr")
    assert (exp.repeats, exp.base_seed, exp.seed(3)) == (3, 40, 43)
    assert load_config(str(exp.config_file)).train.learning_rate == 0.0005
    assert exp.submissions() == []


def test_an_experiment_is_never_replanned_with_another_config(tmp_path):
    cfg = load_config()
    first = plan_experiment(tmp_path / "e", cfg, 5, 0)
    assert plan_experiment(tmp_path / "e", cfg, 5, 0).path == first.path  # same plan: a no-op
    done = run_cli("submit", "--experiment", "e", "--results", str(tmp_path), "--set", "train.epochs=3",
                   "--dry-run", "--container", "none")
    assert_clean_error(done, "experiment exists with a different config")
    assert load_config(str(first.config_file)).train.epochs == 1


def test_grid_plan_writes_one_experiment_per_combination(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("name: sweep\nset: {train.epochs: 7}\ngrid:\n  train.learning_rate: [0.001, 0.0005]\n"
                    "  train.batch_size: [32, 64]\nrepeats: 2\nbase_seed: 10\n")
    done = run_cli("grid", "plan", str(grid), "--results", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr
    dirs = sorted(p.name for p in (tmp_path / "r" / "sweep").iterdir())
    assert dirs == ["learning_rate=0.0005,batch_size=32", "learning_rate=0.0005,batch_size=64",
                    "learning_rate=0.001,batch_size=32", "learning_rate=0.001,batch_size=64"]
    exp = load_experiment(tmp_path / "r" / "sweep" / dirs[1])
    cfg = load_config(str(exp.config_file))
    assert (cfg.train.learning_rate, cfg.train.batch_size, cfg.train.epochs) == (0.0005, 64, 7)
    assert exp.values == {"train.learning_rate": 0.0005, "train.batch_size": 64}
    assert "4 experiments" in done.stdout
    again = run_cli("grid", "plan", str(grid), "--results", str(tmp_path / "r"))
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize("text, needle", [
    ("grid: {train.learning_rat: [0.1]}\n", "train.learning_rat"),
    ("grid: {train.batch_size: [32, -1]}\n", "train.batch_size=-1"),
    ("grid: {train.batch_size: 32}\n", "grid.train.batch_size must be a non-empty list"),
    ("grid: {train.batch_size: [32]}\nrepeats: 0\n", "repeats=0"),
    ("grid: {train.batch_size: [32]}\nrepeat: 3\n", "unknown key 'repeat'"),
    ("set: {train.epochs: 2}\n", "needs a 'grid' mapping"),
    ("grid: [unclosed\n", "not valid YAML"),
])
def test_bad_grid_files_are_clean_errors_and_write_nothing(tmp_path, text, needle):
    grid = tmp_path / "g.yaml"
    grid.write_text(text)
    done = run_cli("grid", "plan", str(grid), "--results", str(tmp_path / "r"))
    assert_clean_error(done, needle)
    assert not (tmp_path / "r").exists()


def _run(exp_dir, name, status=None, error=None):
    run = exp_dir / name
    run.mkdir()
    (run / "config.yaml").write_text(load_config().to_yaml())
    if status:
        (run / "results.json").write_text(json.dumps({"status": status, "error": error}))
    return run


def test_task_states_from_queue_run_directories_and_logs(tmp_path):
    exp = plan_experiment(tmp_path / "e", load_config(), 6, 0)
    exp.record_submission({"array_job_id": "11", "tasks": [1, 2, 3, 4, 5, 6]})
    exp.record_submission({"array_job_id": "12", "tasks": [3]})
    _run(exp.path, "11_1", "success")
    _run(exp.path, "11_2", "failed", "DataError: bad file")
    _run(exp.path, "11_3", "failed", "old failure")
    _run(exp.path, "12_3", "success")  # resubmitted and done
    _run(exp.path, "11_4")  # no results.json: killed
    (exp.path / "logs" / "11_4.out").write_text("cloudmask: error: out of memory\n")
    (exp.path / "logs" / "11_5.out").write_text("[train.sh 2026] error: IMAGE=x.sif not found\n")
    states = {s.task: s for s in task_states(exp, {"11_6": "PENDING"})}
    assert {t: s.state for t, s in states.items()} == {1: "done", 2: "failed", 3: "done", 4: "failed",
                                                       5: "failed", 6: "pending"}
    assert states[2].reason == "DataError: bad file"
    assert states[3].job == "12"
    assert "out of memory" in states[4].reason and "IMAGE=x.sif not found" in states[5].reason
    assert [s.seed for s in states.values()] == [1, 2, 3, 4, 5, 6]
    # without the queue, a task nobody ran is missing
    assert task_states(exp, {})[5].state == "missing"


def test_grid_status_and_resubmit_dry_run_without_slurm(tmp_path):
    exp = plan_experiment(tmp_path / "g" / "a", load_config(), 3, 0)
    exp.record_submission({"array_job_id": "7", "tasks": [1, 2, 3]})
    _run(exp.path, "7_1", "success")
    _run(exp.path, "7_2", "interrupted", "SIGUSR1 received")
    env = {"PATH": "/usr/bin:/bin"}  # no squeue: the queue is not consulted, and says so
    status = run_cli("grid", "status", str(tmp_path / "g"), env=env)
    assert status.returncode == 0, status.stderr
    assert "1 done, 1 interrupted, 1 missing" in status.stdout
    assert "squeue unavailable" in status.stdout
    again = run_cli("grid", "resubmit", str(tmp_path / "g"), "--container", "none", "--dry-run", env=env)
    assert again.returncode == 0, again.stderr
    assert "--array=2-3" in again.stdout and "afterany:$JOB1" in again.stdout
