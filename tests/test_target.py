"""train.target, the quality target: real tiny runs stop at the epoch that reaches it (MLPerf status success) or
run all epochs without it (aborted); time and energy to the target; resume across the target epoch."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import TINY, assert_clean_error, run_cli
from fake_nvml import two_gpus

from cloudmask.config import load_config
from cloudmask.run import modes
from cloudmask.telemetry import energy_sources


def _mllog(run) -> list[dict]:
    return [json.loads(line.split(":::MLLOG ", 1)[1]) for line in open(run / "mlperf.log") if ":::MLLOG" in line]


def _with_target(line: str, value: float) -> str:
    """An MLPerf log line with the cloudmask_target event's value replaced."""
    if '"cloudmask_target"' not in line:
        return line
    head, body = line.split(":::MLLOG ", 1)
    event = json.loads(body)
    event["value"] = value
    return f"{head}:::MLLOG {json.dumps(event)}\n"


def _run(dataset, out, *extra):
    return modes.run(load_config(overrides=[*TINY, f"data.root={dataset}", *extra]), out)


def test_a_target_reached_early_stops_the_run_with_time_and_energy(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(energy_sources, "_load_nvml", lambda: two_gpus(counter=True))  # 250 W + 100 W, constant
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    out = tmp_path / "run"
    r = _run(dataset, out, "train.epochs=3", "train.target.value=0.01", "telemetry.idle_seconds=0.2")
    t = r["target"]
    assert r["status"] == "success" and r["epochs_run"] == 1 and not r["stopped_early"]
    assert (t["metric"], t["value"], t["reached"], t["epochs_to_target"]) == ("val_accuracy", 0.01, True, 1)
    epoch_s = r["timing"]["epoch_s"][0]
    assert epoch_s <= t["time_to_target_s"] < epoch_s + 5  # run_start -> the eval of epoch 1
    assert t["energy_to_target_j"] == pytest.approx(r["energy"]["gpu"]["per_epoch_j"][0])
    assert t["energy_to_target_j"] == pytest.approx(350 * epoch_s, rel=0.15)  # the epoch's window vs its clock
    assert abs(t["energy_to_target_above_idle_j"]) < 0.01 * t["energy_to_target_j"]  # constant power: 0 above idle
    events = _mllog(out)
    assert [e["metadata"]["status"] for e in events if e["key"] == "run_stop"] == ["success"]
    assert [(e["value"], e["metadata"]["metric"]) for e in events if e["key"] == "cloudmask_target"] == \
        [(0.01, "val_accuracy")]
    assert run_cli("check-log", str(out)).returncode == 0

    # the ruleset checks the eval that ended a successful run against the target
    reached = [e["value"] for e in events if e["key"] == "eval_accuracy"][-1]
    assert reached < 0.999
    forged = tmp_path / "forged.log"
    forged.write_text("".join(_with_target(line, 0.999) for line in open(out / "mlperf.log")))
    failed = run_cli("check-log", str(forged))
    assert failed.returncode == 1 and "run_stop" in failed.stdout + failed.stderr


@pytest.mark.slow  # every epoch of a run; a target runs by default above
def test_an_unreachable_target_runs_every_epoch_and_aborts(dataset, tmp_path):
    out = tmp_path / "run"
    r = _run(dataset, out, "train.target.metric=val_loss", "train.target.value=1e-9")
    assert r["status"] == "success" and r["epochs_run"] == 2
    assert r["target"] == {"metric": "val_loss", "value": 1e-9, "reached": False, "epochs_to_target": None,
                           "time_to_target_s": None, "energy_to_target_j": None,
                           "energy_to_target_above_idle_j": None}
    assert [e["metadata"]["status"] for e in _mllog(out) if e["key"] == "run_stop"] == ["aborted"]
    assert run_cli("check-log", str(out)).returncode == 0
    # without a target, aborted is not a valid ending
    plain = tmp_path / "plain.log"
    plain.write_text("".join(line for line in open(out / "mlperf.log") if '"cloudmask_target"' not in line))
    assert run_cli("check-log", str(plain)).returncode == 1


@pytest.mark.slow  # three trainings; the target itself runs by default above
def test_resume_across_the_target_epoch_matches_an_uninterrupted_run(dataset, tmp_path):
    sets = ["train.epochs=4", "train.deterministic=true", "train.micro_batch_size=4"]
    straight = _run(dataset, tmp_path / "straight", *sets)
    losses = straight["history"]["val_loss"]
    # the first epoch from 2 on that beats every earlier one: a val_loss target reached exactly there
    k = next((i for i in range(1, 4) if losses[i] < min(losses[:i])), None)
    assert k is not None, losses
    target = ["train.target.metric=val_loss", f"train.target.value={losses[k]!r}"]

    out = tmp_path / "run"
    argv = [sys.executable, "-m", "cloudmask", "train", "--data", str(dataset), "--out", str(out),
            *sum((["--set", s] for s in [*TINY, *sets, *target]), [])]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "history.csv").is_file() and len((out / "history.csv").read_text().splitlines()) >= k + 1:
            break  # epoch k (of k + 1) is done: stop in the epoch that reaches the target
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert json.loads((out / "results.json").read_text())["epochs_run"] == k

    done = run_cli("train", "--resume", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads((out / "results.json").read_text())
    assert r["attempts"] == 2 and r["epochs_run"] == k + 1
    assert (r["target"]["reached"], r["target"]["epochs_to_target"]) == (True, k + 1)
    assert r["history"] == {key: values[: k + 1] for key, values in straight["history"].items()}
    assert r["target"]["time_to_target_s"] >= sum(r["timing"]["epoch_s"]) * 0.99
    assert [e["metadata"]["status"] for e in _mllog(out) if e["key"] == "run_stop"] == ["success"]
    assert run_cli("check-log", str(out)).returncode == 0


def test_a_bad_target_is_a_clean_error(dataset, tmp_path):
    args = ["train", "--data", str(dataset), "--out", str(tmp_path / "run")]
    assert_clean_error(run_cli(*args, "--set", "train.target.value=1.5"), "train.target.value=1.5")
    assert_clean_error(run_cli(*args, "--set", "train.target.metric=f1"), "train.target.metric")
    assert not (tmp_path / "run").exists()
