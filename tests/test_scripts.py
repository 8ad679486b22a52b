"""Every shell script in the repository passes shellcheck (CI installs it; elsewhere the test skips)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shell_scripts() -> list[Path]:
    found = [p for d in ("scripts", "slurm", "containers", ".ci") for p in sorted((REPO / d).rglob("*"))
             if p.is_file() and (p.suffix == ".sh" or p.read_bytes()[:20].startswith(b"#!/usr/bin/env bash"))]
    return found


def test_there_are_scripts_to_check():
    names = {p.name for p in shell_scripts()}
    assert {"train.sh", "aggregate.sh", "test.sh", "bench.sh", "env.sh", "run", "container_ci.sh", "apptainer_ci.sh",
            "gpu_suite.sh"} <= names


def test_shellcheck():
    if shutil.which("shellcheck") is None:
        if os.environ.get("CLOUDMASK_CI") == "1":
            pytest.fail("CLOUDMASK_CI=1 but shellcheck is not installed (apt-get install shellcheck)")
        pytest.skip("shellcheck not installed")
    done = subprocess.run(["shellcheck", "--severity=style", "--external-sources", *map(str, shell_scripts())],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr


def test_after_the_quick_start_readme_and_bench_sh_say_how_to_run_cloudmask_and_it_works(tmp_path):
    """The quick start leaves `cloudmask` in .venv, not on PATH: bench.sh says so on stderr, the README says so
    where the quick start first names a cloudmask command, and what they say works (#35)."""
    venv = Path(sys.prefix)
    if not (venv / ".cloudmask-installed").is_file():
        pytest.skip("not run from an environment made by scripts/env.sh (./scripts/test.sh makes one)")
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != venv / "bin")
    env = {**os.environ, "PATH": path, "CLOUDMASK_VENV": str(venv), "VIRTUAL_ENV": ""}
    assert shutil.which("cloudmask", path=path) is None  # as after the quick start: not on PATH
    done = subprocess.run([str(REPO / "scripts" / "bench.sh"), "--help"], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0 and "usage: cloudmask bench" in done.stdout, done.stderr
    assert "'. .venv/bin/activate' or .venv/bin/cloudmask" in done.stderr

    quick_start = (REPO / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    first_command = quick_start.index("`cloudmask ")
    hint = quick_start.rfind("(`. .venv/bin/activate`)", 0, first_command)
    assert 0 <= hint and "(`.venv/bin/cloudmask`)" in quick_start[hint:first_command]
    for how in (f". {venv}/bin/activate && cloudmask --version", f"{venv}/bin/cloudmask --version"):
        done = subprocess.run(["bash", "-c", how], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.startswith("cloudmask"), (how, done.stdout + done.stderr)


def test_the_suite_and_what_it_starts_keep_temporary_files_and_caches_under_pytest_root(tmp_path_factory):
    """tests/conftest.py points the temporary directory and the user caches of the session, and of every process
    it starts, under pytest's own root (#35): nothing of the tests lands in /tmp (ReFrame's rfm-*.log, a killed
    run's Keras save directory) or in ~/.cache."""
    root = tmp_path_factory.getbasetemp().resolve()
    code = ("import os, tempfile; print(tempfile.gettempdir()); print(os.environ['XDG_CACHE_HOME']); "
            "print(os.environ['CLOUDMASK_CACHE_DIR'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    started = done.stdout.split()
    assert len(started) == 3
    for path in (tempfile.gettempdir(), *started):
        assert Path(path).resolve().is_relative_to(root), f"{path} is not under {root}"


def test_the_test_workers_follow_the_cpus_not_omp_num_threads():
    """scripts/env.sh's worker count for the test scripts: OMP_NUM_THREADS=1, common in HPC shells, must not
    turn the suite into one process (GNU nproc obeys it)."""
    def workers(**extra: str) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "CLOUDMASK_TEST_WORKERS"))}
        done = subprocess.run(["bash", "-c", f"source {REPO / 'scripts' / 'env.sh'}; cloudmask_xdist_args loadfile"],
                              env={**env, **extra}, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    plain = workers()
    assert workers(OMP_NUM_THREADS="1", OMP_THREAD_LIMIT="1") == plain
    if (os.cpu_count() or 1) > 1 and plain:
        assert plain.startswith("-n ") and "--dist loadfile" in plain
    assert workers(CLOUDMASK_TEST_WORKERS="3") == "-n 3 --dist loadfile --no-loadscope-reorder"
