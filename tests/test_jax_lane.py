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


# The fields of suite.json, as the GPU run writes them (scripts/measure/gpu_suite.py); the CPU run must have every one.
SUITE_FIELDS = {"suite", "started", "finished", "mode", "sizes", "steps", "facts", "data", "throughput", "epoch",
                "inference", "short_run", "check_log", "targets", "failed_steps", "work_dir"}
THROUGHPUT_FIELDS = {"backend", "devices", "precision", "batch_size", "input", "warmup_steps", "timed_steps",
                     "train_patches_per_s", "train_epoch_s_full_dataset", "loader_patches_per_s",
                     "inference_patches_per_s", "test_set_100_images_s", "forward_gflop_per_patch",
                     "train_gflop_per_patch", "achieved_tflops", "device_peak_tflops", "utilisation", "peak_rss_gib"}


def test_gpu_suite_runs_end_to_end_on_the_cpu(tmp_path):
    """scripts/measure/gpu_suite.sh --cpu --small: every step of the H200 suite, with the driver's two faces faked
    at their narrowest boundary (the pynvml module and the nvidia-smi program, tests/fake_gpu)."""
    tests = os.path.dirname(__file__)
    fake = os.path.join(tests, "fake_gpu")
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([fake, tests, os.environ.get("PYTHONPATH", "")]), "PYTHON": sys.executable}
    out = tmp_path / "suite"
    script = os.path.join(tests, os.pardir, "scripts", "measure", "gpu_suite.sh")
    done = subprocess.run([script, "--out", str(out), "--cpu", "--small"], capture_output=True, text=True, env=env,
                          timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    s = json.loads((out / "suite.json").read_text())
    assert set(s) == SUITE_FIELDS and s["failed_steps"] == []
    assert all(step["status"] == "ok" for step in s["steps"].values()), s["steps"]
    assert s["facts"]["nvidia_smi"][0]["name"] == "NVIDIA H200" and "Product Name" in (out / "nvidia-smi.txt").read_text()
    assert s["data"]["counts"] == {"train_x": 120, "val_x": 40, "test_x": 3}
    runs = {(t["precision"], t["batch_size"]) for t in s["throughput"]}
    assert runs == {(p, b) for p in ("fp32", "mixed_bfloat16") for b in (8, 16)}
    for t in s["throughput"]:
        assert set(t) == THROUGHPUT_FIELDS and t["backend"] == "jax" and t["input"] == "patch-store"
        assert t["train_patches_per_s"] > 0 and t["achieved_tflops"] > 0
    e = s["epoch"]
    assert e["energy_method"] == "counter" and len(e["epoch_s"]) == 2 and e["patches"] == 120
    assert all(j > 0 for j in e["energy_per_epoch_above_idle_j"]), e  # the fake's power rises after the idle baseline
    assert e["idle_w"] > 100 and os.path.isfile(e["power_csv"])
    assert s["inference"]["images"] == 3 and s["inference"]["seconds_per_image"] > 0
    short = s["short_run"]
    assert short["epochs"] == 5 and isinstance(short["beats_baseline"], bool)
    assert s["check_log"] == {"full-size": "PASS", "bench": "PASS"}
    assert set(s["targets"]) == {"bf16_train_patches_per_s", "test_set_100_images_s", "energy_net_of_idle"}
    assert s["targets"]["energy_net_of_idle"]["met"] is True
    assert not os.path.exists(s["work_dir"]), "the synthetic data is removed unless --keep-data"
