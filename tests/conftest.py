"""Shared fixtures: a small real synthetic dataset (real HDF5 files, real shapes) made once per session, and
the tiny-model settings that keep training tests to seconds on 2 CPU cores."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# A tiny U-Net (filters 4, depth 2) and small batches: same code paths as the reference model, ~100x cheaper.
TINY = ["model.filters=4", "model.depth=2", "train.batch_size=8", "train.epochs=2", "infer.images_per_call=2"]


@pytest.fixture(scope="session", autouse=True)
def patch_cache_dir(tmp_path_factory) -> Path:
    """data.cache=auto writes here, not to the user's ~/.cache (CLI runs and SLURM jobs inherit it)."""
    root = tmp_path_factory.mktemp("patch-cache")
    os.environ["CLOUDMASK_CACHE_DIR"] = str(root)
    return root


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """5 training files (4 train + 1 validation after the split) and 2 test files, read-only for tests."""
    from cloudmask.synth import synthesize

    root = tmp_path_factory.mktemp("data") / "synthetic"
    synthesize(root, n_train=5, n_test=2, seed=7)
    return root


@pytest.fixture
def dataset_copy(dataset, tmp_path) -> Path:
    """A private copy a test may damage."""
    target = tmp_path / "data"
    shutil.copytree(dataset, target)
    return target


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd=None) -> subprocess.CompletedProcess:
    """Run the real ``cloudmask`` entry point in a fresh interpreter, as a user would."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cloudmask", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)


def assert_clean_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    """A user error: non-zero exit, one 'cloudmask: error:' line naming the problem, no traceback."""
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("cloudmask: error:")]
    assert len(errors) == 1, done.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture(scope="session")
def prepared(dataset, tmp_path_factory) -> Path:
    """A patch store of ``dataset`` (80 training, 20 validation patches, 2 test images), read-only for tests."""
    out = tmp_path_factory.mktemp("store") / "store"
    done = run_cli("data", "prepare", str(dataset), str(out))
    assert done.returncode == 0, done.stderr
    return out
