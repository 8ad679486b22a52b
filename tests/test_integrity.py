"""Run integrity (docs/reliability.md, "Integrity"): one process per run, every file read back verified, a kill
at any instant recoverable, a signal that always stops. Real processes, real files, real signals, a real S3 API."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, assert_clean_error, run_cli

REPO = Path(__file__).resolve().parents[1]


def _sets(*extra: str) -> list[str]:
    return [a for kv in [*TINY, "telemetry.idle_seconds=0", *extra] for a in ("--set", kv)]


def _env() -> dict:
    """The environment now (the session fixtures point the caches at pytest's temporary root)."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _no_aws(tmp_path: Path) -> dict:
    """No credentials and no instance metadata: anonymous requests to the local S3 server."""
    return {**{k: v for k, v in _env().items() if not k.startswith("AWS_")}, "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no"), "AWS_CONFIG_FILE": str(tmp_path / "no")}


def _start(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cloudmask", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or _env())


def _wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended first: {proc.communicate()[1]}")
        time.sleep(0.1)
    raise AssertionError("timed out")


def _epochs_logged(run: Path) -> int:
    history = run / "history.csv"
    return len(history.read_text().splitlines()) - 1 if history.is_file() else 0


def _mlperf_keys(run: Path) -> list[str]:
    return [json.loads(line.split(":::MLLOG ", 1)[1])["key"] for line in (run / "mlperf.log").read_text().splitlines()
            if ":::MLLOG" in line]


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def _interrupted_run(dataset, out: Path, epochs: int = 3) -> None:
    proc = _start("train", "--data", str(dataset), "--out", str(out), *_sets(f"train.epochs={epochs}"))
    _wait_for(lambda: _epochs_logged(out) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 143 and _results(out)["status"] == "interrupted"


# ------------------------------------------------------------------------------- one process per run


def test_two_resumes_at_once_one_trains_the_other_is_refused_naming_it(dataset, tmp_path):
    out = tmp_path / "run"
    _interrupted_run(dataset, out)
    first, second = (_start("train", "--resume", "--out", str(out)) for _ in range(2))
    done = [(p, *p.communicate(timeout=600)) for p in (first, second)]
    codes = sorted(p.returncode for p, _, _ in done)
    assert codes == [0, 1], [(p.returncode, err) for p, _, err in done]
    refused = next(d for d in done if d[0].returncode == 1)
    assert_clean_error(subprocess.CompletedProcess([], 1, refused[1], refused[2]), str(out), "in use by pid")
    keys = _mlperf_keys(out)
    assert keys.count("run_start") == keys.count("run_stop") == keys.count("result") == 1
    assert _results(out)["status"] == "success"
    assert run_cli("check-log", str(out)).returncode == 0


def test_report_during_a_run_lists_it_as_running_not_failed(dataset, tmp_path):
    out = tmp_path / "runs" / "run"
    proc = _start("train", "--data", str(dataset), "--out", str(out), *_sets("train.epochs=20"))
    try:
        _wait_for(lambda: _epochs_logged(out) >= 1, proc)
        done = run_cli("report", str(tmp_path / "runs"), "--out", str(tmp_path / "report"))
        assert done.returncode == 0, done.stderr
        row = json.loads((tmp_path / "report" / "report.json").read_text())["runs"][0]
        assert row["status"] == "running" and f"pid {proc.pid}" in row["reason"], row
        # the same run directory cannot be written by a second process meanwhile
        assert_clean_error(run_cli("train", "--resume", "--out", str(out)), f"in use by pid {proc.pid}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    row = json.loads((tmp_path / "report" / "report.json").read_text())["runs"][0]
    done = run_cli("report", str(tmp_path / "runs"), "--out", str(tmp_path / "report"))
    assert json.loads((tmp_path / "report" / "report.json").read_text())["runs"][0]["status"] == "interrupted"


@pytest.mark.slow  # a run killed, then resumed; the lock's refusal runs by default in two_resumes_at_once
def test_a_dead_holders_lock_is_taken_over(dataset, tmp_path):
    out = tmp_path / "run"
    proc = _start("train", "--data", str(dataset), "--out", str(out), *_sets("train.epochs=3"))
    _wait_for(lambda: _epochs_logged(out) >= 1, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert json.loads((out / ".lock").read_text() or "{}").get("pid") == proc.pid  # its text is stale
    done = run_cli("train", "--resume", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert run_cli("check-log", str(out)).returncode == 0


# ------------------------------------------------------------------ files read back are checked


def _damage(path: Path, offset_fraction: float = 0.5, size: int = 1 << 16) -> None:
    with open(path, "r+b") as f:
        f.seek(int(path.stat().st_size * offset_fraction))
        f.write(os.urandom(size))


@pytest.mark.slow  # three trainings; a damaged entry is rebuilt by default in test_cache
def test_damaged_bytes_in_the_patch_cache_are_never_trained_on(dataset, tmp_path):
    cache_dir = tmp_path / "cache"
    env_sets = _sets("train.deterministic=true")
    base = ["train", "--data", str(dataset), *env_sets, "--set", f"data.cache={cache_dir}"]
    assert run_cli(*base, "--out", str(tmp_path / "build")).returncode == 0
    reference = _results(tmp_path / "build")
    entries = [p for p in cache_dir.iterdir() if p.is_dir() and (p / "x.npy").stat().st_size > 4 << 20]
    assert entries
    for entry in entries:
        _damage(entry / "x.npy")  # the size is unchanged: only the checksums can tell
    done = run_cli(*base, "--out", str(tmp_path / "damaged"))
    assert done.returncode == 0, done.stderr
    assert "is not what was written" in done.stdout and "removed" in done.stdout, done.stdout
    again = _results(tmp_path / "damaged")
    assert again["history"] == reference["history"] and again["test"]["avg_accuracy"] == reference["test"][
        "avg_accuracy"]
    assert not any((e / "x.npy").exists() for e in entries if not (e / "entry.json").exists())


def test_a_damaged_or_altered_store_is_one_line_naming_the_file(prepared, tmp_path):
    import shutil

    cases = {"bytes": lambda s: _damage(s / "train_x.npy", 0.3),
             "count": lambda s: _edit_meta(s, lambda m: m["counts"].update(train_x=m["counts"]["train_x"] - 20)),
             "files": lambda s: _edit_meta(s, lambda m: m["files"].update(train=m["files"]["train"][:-1])),
             "sidecar": lambda s: (s / "val_y.crc32.npy").unlink()}
    expected = {"bytes": ("train_x.npy", "row"), "count": ("train_x.npy", "store.json counts"),
                "files": ("train_x.npy", "lists 3 train files"), "sidecar": ("val_y.crc32.npy", "missing")}
    for name, damage in cases.items():
        store = tmp_path / name
        shutil.copytree(prepared, store)
        damage(store)
        done = run_cli("train", "--store", str(store), "--out", str(tmp_path / f"run-{name}"), *_sets())
        assert_clean_error(done, *expected[name])


def _edit_meta(store: Path, change) -> None:
    meta = json.loads((store / "store.json").read_text())
    change(meta)
    (store / "store.json").write_text(json.dumps(meta))


@pytest.mark.slow  # two runs and a resume; resuming runs by default in two_resumes_at_once
def test_a_checkpoint_that_is_not_the_runs_is_refused_on_resume(dataset, tmp_path):
    out = tmp_path / "run"
    _interrupted_run(dataset, out)
    state = json.loads((out / "state.json").read_text())
    _damage(out / state["latest"], 0.6, 256)
    assert_clean_error(run_cli("train", "--resume", "--out", str(out)), state["latest"], "SHA-256")


# ------------------------------------------------------------------------ a kill at any instant


@pytest.mark.slow  # runs killed and restarted
def test_a_run_killed_before_its_first_commit_starts_over_and_a_lost_state_is_refused(dataset, tmp_path):
    out = tmp_path / "run"
    proc = _start("train", "--data", str(dataset), "--out", str(out), *_sets())
    _wait_for(lambda: (out / "mlperf.log").is_file() and "init_start" in (out / "mlperf.log").read_text(), proc)
    proc.kill()
    proc.communicate(timeout=60)
    if not (out / "state.json").exists():  # killed in start-up, as meant
        done = run_cli("train", "--resume", "--out", str(out))
        assert done.returncode == 0, done.stderr
        assert _mlperf_keys(out).count("init_start") == 1
    assert run_cli("check-log", str(out)).returncode == 0
    (out / "state.json").unlink()
    assert_clean_error(run_cli("train", "--resume", "--out", str(out)), "state.json: missing",
                       "start a new run")


@pytest.mark.slow
def test_sigkill_swept_over_a_run_then_resume_always_gives_one_checked_log(dataset, tmp_path):
    """SIGKILL at instants spread over a whole run (start-up, epochs, checkpoints, inference, the last writes),
    each followed by ``--resume``: every run ends with one init block, one run_start/run_stop/result, a
    success and a log that passes check-log."""
    t0 = time.time()
    assert run_cli("train", "--data", str(dataset), "--out", str(tmp_path / "timing"), *_sets()).returncode == 0
    whole = time.time() - t0
    for k, at in enumerate(np.linspace(0.25, 1.0, 10) * whole):
        out = tmp_path / f"run{k}"
        proc = _start("train", "--data", str(dataset), "--out", str(out), *_sets())
        try:
            proc.wait(timeout=at)
        except subprocess.TimeoutExpired:
            proc.kill()
        proc.communicate(timeout=60)
        if not out.exists():
            continue  # killed before the run directory was made: nothing to resume
        done = run_cli("train", "--resume", "--out", str(out))
        assert done.returncode == 0 or "has finished" in done.stderr, (at, done.stderr)
        keys = _mlperf_keys(out)
        assert keys.count("init_start") == keys.count("run_start") == keys.count("run_stop") == 1, (at, keys)
        assert keys.count("result") == 1 and _results(out)["status"] == "success", at
        assert run_cli("check-log", str(out)).returncode == 0, at
        assert not list(out.rglob(".*.tmp*")), at


# ------------------------------------------------------------------------- a signal always stops


@pytest.mark.slow  # the same handler as SIGTERM, which runs by default in
# test_two_resumes_at_once_one_trains_the_other_is_refused_naming_it (_interrupted_run)
def test_sighup_stops_like_sigterm_with_an_interrupted_record(dataset, tmp_path):
    out = tmp_path / "run"
    proc = _start("train", "--data", str(dataset), "--out", str(out), *_sets("train.epochs=20"))
    _wait_for(lambda: _epochs_logged(out) >= 1, proc)
    proc.send_signal(signal.SIGHUP)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGHUP and "SIGHUP received" in stderr and "Traceback" not in stderr
    assert _results(out)["status"] == "interrupted" and "--resume" in stderr


@pytest.mark.slow  # a whole run behind a closed pipe
def test_a_closed_stdout_ends_the_output_quietly_and_the_run_goes_on(dataset, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cloudmask", "train", "--data", str(dataset), "--out", str(out), *_sets()]
    done = subprocess.run(" ".join(f"'{c}'" for c in cmd) + " | head -3", shell=True, capture_output=True,
                          text=True, env=_env(), timeout=600)
    assert len(done.stdout.splitlines()) == 3
    assert "Traceback" not in done.stderr and "Logging error" not in done.stderr and "BrokenPipe" not in done.stderr
    assert _results(out)["status"] == "success"
    assert "test: avg_accuracy" in (out / "console.log").read_text()  # the file kept what the screen lost


@contextlib.contextmanager
def _training_from_s3(dataset, tmp_path: Path, bucket: str, *sets: str):
    """A local S3 server (its own process, so it can be stopped or killed) holding ``dataset``, and a run training
    from it with the cache off, once its first epoch is done: yields (server, run process, run directory)."""
    pytest.importorskip("moto")
    ready = tmp_path / "endpoint"
    server = subprocess.Popen([sys.executable, str(REPO / "scripts" / "local_s3.py"), str(dataset), bucket,
                               "--ready", str(ready)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: ready.is_file() and ready.read_text().strip(), server, timeout=120)
        out = tmp_path / "run"
        endpoint = ready.read_text().strip()
        proc = _start("train", "--data", f"s3://{bucket}/ds", "--out", str(out),
                      *_sets("data.cache=off", "train.epochs=20", f"data.remote.endpoint_url={endpoint}", *sets),
                      env=_no_aws(tmp_path))
        _wait_for(lambda: _epochs_logged(out) >= 1, proc)
        yield server, proc, out
    finally:
        server.send_signal(signal.SIGCONT)
        server.kill()  # its threads may still serve the connections a stopped process had open
        server.communicate(timeout=60)


@pytest.mark.slow  # about a minute: the stop may need the whole grace period
def test_a_stopped_object_store_cannot_hold_the_process_after_sigterm(dataset, tmp_path):
    with _training_from_s3(dataset, tmp_path, "hung") as (server, proc, _):
        server.send_signal(signal.SIGSTOP)  # the server hangs: connections open, no answer
        time.sleep(5)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert time.time() - t0 < 30, stderr
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("cloudmask: error:")] or \
        "SIGTERM received" in stderr, stderr


@pytest.mark.slow  # a minute: training from S3 until the server dies
def test_an_object_store_that_dies_mid_run_is_one_line_without_tracebacks(dataset, tmp_path):
    with _training_from_s3(dataset, tmp_path, "dying", "data.remote.retries=2") as (server, proc, out):
        server.kill()
        _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("cloudmask: error:")]
    assert len(errors) == 1 and "s3://dying/ds" in errors[0] and "did not answer" in errors[0], stderr
    assert _results(out)["status"] == "failed"


# ------------------------------------------------------------------ input problems, before training


def test_a_truncated_test_file_stops_the_run_before_training(dataset_copy, tmp_path):
    victim = sorted((dataset_copy / "inference").rglob("*.hdf"))[0]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    out = tmp_path / "run"
    done = run_cli("train", "--data", str(dataset_copy), "--out", str(out), *_sets())
    assert_clean_error(done, victim.name)
    assert _epochs_logged(out) == 0 and "epoch 1" not in done.stdout


# ------------------------------------------------------------ what a killed writer leaves behind


def test_a_dead_writers_temporary_files_are_removed_by_the_next_writer(tmp_path):
    from cloudmask import fileio

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = __import__("socket").gethostname().split(".")[0]
    dead = tmp_path / f".report.{host}-{gone.pid}.ab12cd.tmp"
    alive = tmp_path / f".report.{host}-{os.getpid()}.ef34gh.tmp"
    other_node = tmp_path / f".report.elsewhere-{gone.pid}.ij56kl.tmp"
    for d in (dead, alive, other_node):
        d.mkdir()
    unowned = tmp_path / ".state.json.mn78op.tmp"
    unowned.write_text("{")
    with fileio.replacing_dir(tmp_path / "report") as new:
        (new / "report.json").write_text("{}")
    assert not dead.exists() and alive.exists() and other_node.exists() and unowned.exists()
    assert (tmp_path / "report" / "report.json").read_text() == "{}"
    assert fileio.remove_leftovers(tmp_path) == [unowned]  # the owner of a run directory: every unnamed one
