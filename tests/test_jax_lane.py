"""The JAX lane: Keras 3 on JAX in an environment without TensorFlow, as on the GPU machine that can be borrowed
(it has JAX, no TensorFlow). `scripts/ci/jax_lane.sh` (called by `.ci/run`) builds that environment and runs this
module with KERAS_BACKEND=jax; under the TensorFlow suite it is skipped."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ALL_TEST_FILES, TINY, run_cli

from cloudmask.run.results import schema_problem

pytestmark = pytest.mark.skipif(os.environ.get("KERAS_BACKEND") != "jax",
                                reason="the JAX lane: scripts/ci/jax_lane.sh (KERAS_BACKEND=jax, no TensorFlow)")
SETS = [a for kv in [*TINY, ALL_TEST_FILES] for a in ("--set", kv)]


def test_the_lane_has_jax_and_no_tensorflow():
    assert importlib.util.find_spec("jax") is not None
    assert importlib.util.find_spec("tensorflow") is None, "the lane must prove the JAX path needs no TensorFlow"


def test_bench_trains_infers_and_passes_check_log(tmp_path):
    out = tmp_path / "run"
    done = run_cli("bench", "--out", str(out), *SETS, "--set", "bench.train_files=5", "--set", "bench.test_files=2",
                   env={"XDG_CACHE_HOME": str(tmp_path / "cache")}, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert schema_problem(r) is None, schema_problem(r)
    assert r["status"] == "success" and r["backend"] == "jax" and r["epochs_run"] == 2
    assert r["test"]["files"] == 2 and len(list((out / "masks").glob("*.h5"))) == 2
    assert 0 <= r["test"]["avg_accuracy"] <= 1 and r["energy"]["gpu"]["method"] == "none"
    check = run_cli("check-log", str(out))
    assert check.returncode == 0, check.stdout + check.stderr


def test_sigterm_then_resume_continues_on_jax(tmp_path, dataset):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "cloudmask", "train", "--data", str(dataset), "--out", str(out),
                             *SETS, "--set", "train.epochs=3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            (out / "history.csv").is_file() and len((out / "history.csv").read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr[-3000:]
    stopped = json.loads((out / "results.json").read_text())["epochs_run"]
    assert 1 <= stopped < 3
    done = run_cli("train", "--resume", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert (r["status"], r["epochs_run"], r["attempts"]) == ("success", 3, 2)
    assert f"resuming after epoch {stopped}" in (out / "console.log").read_text()
    assert run_cli("check-log", str(out)).returncode == 0


def test_throughput_from_a_device_resident_store(prepared):
    done = run_cli("bench", "--mode", "throughput", "--json", "--store", str(prepared), "--warmup", "1",
                   "--steps", "3", *SETS, "--set", "data.resident=device")
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout[done.stdout.index("{"):])
    assert r["backend"] == "jax" and r["input"] == "patch-store"
    for key in ("loader_patches_per_s", "train_patches_per_s", "inference_patches_per_s", "achieved_tflops"):
        assert r[key] > 0, key
