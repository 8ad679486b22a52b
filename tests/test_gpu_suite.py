"""scripts/measure/gpu_suite.sh, the GPU measurement suite, end to end at toy size on the CPU: the JAX lane's longest
test (scripts/ci/jax_lane.sh), in a file of its own so that pytest-xdist's workers (one file each) run it beside the
rest of the lane. Skipped under the TensorFlow suite, as the JAX lane is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("KERAS_BACKEND") != "jax",
                                reason="the JAX lane: scripts/ci/jax_lane.sh (KERAS_BACKEND=jax, no TensorFlow)")

# The fields of suite.json, as the GPU run writes them (scripts/measure/gpu_suite.py); the CPU run must have every one.
SUITE_FIELDS = {"suite", "started", "finished", "mode", "sizes", "steps", "facts", "data", "throughput", "epoch",
                "inference", "short_run", "check_log", "targets", "failed_steps", "work_dir"}
THROUGHPUT_FIELDS = {"backend", "devices", "precision", "batch_size", "input", "warmup_steps", "timed_steps",
                     "train_patches_per_s", "train_epoch_s_full_dataset", "loader_patches_per_s",
                     "inference_patches_per_s", "test_set_100_images_s", "forward_gflop_per_patch",
                     "train_gflop_per_patch", "achieved_tflops", "device_peak_tflops", "utilisation", "peak_rss_gib"}


@pytest.mark.longest
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
    assert s["facts"]["nvidia_smi"][0]["name"] == "NVIDIA H200"
    assert "Product Name" in (out / "nvidia-smi.txt").read_text()
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
