"""Output faults on real file systems the tests mount: a full disk (a small tmpfs), a read-only one (a read-only
bind mount), and two runs racing for one run-directory name. Mounting needs root; CI runs as root and sets
CLOUDMASK_CI=1, so there a missing capability fails instead of skipping."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, assert_clean_error, run_cli

from cloudmask.config import load_config
from cloudmask.run.run_dir import RunDir

TINY_SETS = sum((["--set", s] for s in [*TINY, "train.epochs=1", "telemetry.idle_seconds=0"]), [])


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@pytest.fixture
def mounts(tmp_path):
    """mounts(kind, size) -> a directory on a new tmpfs of ``size`` (or a read-only bind of one); all unmounted
    at the end."""
    made: list[Path] = []
    if os.geteuid() != 0:
        if os.environ.get("CLOUDMASK_CI") == "1":
            pytest.fail("CLOUDMASK_CI=1 but not root: the fault tests mount file systems")
        pytest.skip("mounting a tmpfs needs root")

    def mount(kind: str, size: str = "4m", source: Path | None = None) -> Path:
        target = tmp_path / f"mnt{len(made)}"
        target.mkdir()
        if kind == "tmpfs":
            done = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target))
        else:  # a read-only view of ``source``
            done = _mount("--bind", str(source), str(target))
            if done.returncode == 0:
                made.append(target)
                done = _mount("-o", "remount,bind,ro", str(target))
        if done.returncode != 0:
            if os.environ.get("CLOUDMASK_CI") == "1":
                pytest.fail(f"mount failed: {done.stderr}")
            pytest.skip(f"cannot mount here: {done.stderr.strip()}")
        if target not in made:
            made.append(target)
        return target

    yield mount
    for target in reversed(made):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _fill(fs: Path) -> None:
    """Leave no free byte on ``fs``."""
    with open(fs / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    try:  # the last partial block
        with open(fs / "filler", "ab") as f:
            while True:
                f.write(b"\0")
                f.flush()
    except OSError:
        pass


def test_a_full_disk_before_the_first_file_leaves_nothing_behind(dataset, mounts):
    fs = mounts("tmpfs", "256k")
    _fill(fs)
    done = run_cli("train", "--data", str(dataset), "--out", str(fs / "run"), *TINY_SETS)
    assert_clean_error(done, str(fs / "run"), "No space left on device", "write the run elsewhere")
    assert done.returncode == 1
    assert not (fs / "run").exists()  # no stub that neither --resume nor a new run could use
    (fs / "filler").unlink()
    assert _mount("-o", "remount,size=64m", str(fs)).returncode == 0
    again = run_cli("train", "--data", str(dataset), "--out", str(fs / "run"), *TINY_SETS,
                    "--set", "infer.enabled=false")
    assert again.returncode == 0, again.stderr  # the same name is free for the next try


@pytest.mark.slow  # a run on a filling tmpfs, then resumed; a full disk at the start runs by default above
def test_a_disk_that_fills_mid_run_fails_cleanly_and_resumes_once_there_is_room(dataset, mounts):
    fs = mounts("tmpfs", "400k")  # room for one ~240 KB checkpoint of the tiny model, not two
    run = fs / "run"
    done = run_cli("train", "--data", str(dataset), "--out", str(run), *TINY_SETS, "--set", "train.epochs=2")
    assert_clean_error(done, "No space left on device", ".keras")
    assert done.returncode == 1
    failed = json.loads((run / "results.json").read_text())
    assert failed["status"] == "failed" and "No space left on device" in failed["error"]
    state = json.loads((run / "state.json").read_text())
    assert state.get("latest") is None or (run / state["latest"]).is_file()  # the state names what exists
    assert not list(run.rglob("*.tmp*")), "temporary files left behind"

    assert _mount("-o", "remount,size=64m", str(fs)).returncode == 0  # the user frees space
    resumed = run_cli("train", "--resume", "--out", str(run))
    assert resumed.returncode == 0, resumed.stderr
    r = json.loads((run / "results.json").read_text())
    assert r["status"] == "success" and r["epochs_run"] == 2 and r["attempts"] == 2
    assert run_cli("check-log", str(run)).returncode == 0


def test_a_read_only_output_is_one_clear_error_for_a_new_run_and_a_resume(dataset, mounts, tmp_path):
    writable = tmp_path / "out"
    run = writable / "run"
    done = run_cli("train", "--data", str(dataset), "--out", str(run), *TINY_SETS, "--set", "infer.enabled=false")
    assert done.returncode == 0, done.stderr
    state = json.loads((run / "state.json").read_text())
    state["phase"] = "training"  # as if it had been stopped before its results
    (run / "state.json").write_text(json.dumps(state))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    ro = mounts("bind-ro", source=writable)
    new = run_cli("train", "--data", str(dataset), "--out", str(ro / "new"), *TINY_SETS)
    assert_clean_error(new, str(ro / "new"), "Read-only file system", "writable")
    resume = run_cli("train", "--resume", "--out", str(ro / "run"))
    assert_clean_error(resume, str(ro / "run"), "Read-only file system")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.slow  # two runs at once; a taken name is checked by default below
def test_two_runs_started_together_get_two_run_directories(dataset, tmp_path):
    """The default name has a one-second time stamp; the second process to reserve it takes the next number."""
    root = tmp_path / "results"
    cmd = ["train", "--data", str(dataset), *TINY_SETS, "--set", "infer.enabled=false",
           "--set", f"output.root={root}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    procs = [subprocess.Popen([sys.executable, "-m", "cloudmask", *cmd], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    runs = sorted(p for p in root.iterdir() if p.is_dir())
    assert len(runs) == 2
    assert all(json.loads((r / "results.json").read_text())["status"] == "success" for r in runs)


def test_a_taken_default_name_gets_the_next_number(tmp_path, monkeypatch):
    cfg = load_config(overrides=[f"output.root={tmp_path}"])
    monkeypatch.setattr('cloudmask.run.run_dir.time.strftime', lambda fmt: "20261203-101010")
    first, second, third = (RunDir.create(None, cfg).path.name for _ in range(3))
    assert (first, second, third) == ("20261203-101010-seed1234", "20261203-101010-seed1234-2",
                                      "20261203-101010-seed1234-3")
    (tmp_path / "file").write_text("x")
    with pytest.raises(Exception, match="a file of that name already exists"):
        RunDir.create(tmp_path / "file", cfg)
