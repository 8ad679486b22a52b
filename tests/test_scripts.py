"""Every shell script in the repository passes shellcheck (CI installs it; elsewhere the test skips)."""

from __future__ import annotations

import os
import shutil
import subprocess
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
