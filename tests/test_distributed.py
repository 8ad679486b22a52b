"""Multi-worker training (distribute.strategy=multi_worker): real worker processes on localhost that find each
other through TF_CONFIG (scripts/local_workers.sh), against one worker and against Keras fit; the SLURM
launch is in test_slurm.py. The cluster description, energy merging and bad settings are tested directly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, assert_clean_error, run_cli

from cloudmask.config import load_config
from cloudmask.errors import ConfigError
from cloudmask.telemetry import energy
from cloudmask.training import cluster

REPO = Path(__file__).resolve().parents[1]
LOCAL_WORKERS = REPO / "scripts" / "local_workers.sh"
SETS = [*TINY, "infer.max_files=1", "telemetry.idle_seconds=0", "distribute.strategy=multi_worker"]
# Two workers sum their halves' gradients in another order than one worker sums the whole batch: the
# trajectories agree to float32 rounding, amplified a little by 2 epochs of Adam. Stated tolerance:
TOLERANCE = 1e-4  # absolute, per epoch, on loss, accuracy, val_loss, val_accuracy


def free_ports(n: int) -> int:
    """A base port with ``n`` consecutive free ports."""
    for base in range(30000 + os.getpid() % 1000 * 20, 60000, 20):
        try:
            for p in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("localhost", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


def workers(n: int, *args: str, tmp: Path, sets=SETS, env: dict | None = None, wait=True):
    """``cloudmask ARGS`` as ``n`` workers through scripts/local_workers.sh; worker i>0 logs in tmp/logs."""
    (tmp / "scratch").mkdir(exist_ok=True)
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PORT": str(free_ports(n)),
                "WORKER_LOGS": str(tmp / "logs"), "TMPDIR": str(tmp / "scratch"), **(env or {})}
    cmd = ["bash", str(LOCAL_WORKERS), str(n), sys.executable, "-m", "cloudmask", *args,
           *(a for kv in sets for a in ("--set", kv))]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                                start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=full_env)


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


@pytest.mark.slow  # four trainings, a minute; two workers run by default in
# test_a_failure_on_the_chief_stops_every_worker_with_its_message
def test_two_workers_follow_one_worker_and_keras_fit(prepared, tmp_path):
    """The must-hold: 2 workers (each reading half of every global batch of 8) train the tiny model along the
    trajectory of 1 worker with the same global batch, and of plain Keras fit, within TOLERANCE."""
    runs = {}
    for name, n in (("one", 1), ("two", 2)):
        (tmp_path / name).mkdir()
        done = workers(n, "train", "--store", str(prepared), "--out", str(tmp_path / name / "run"),
                       tmp=tmp_path / name)
        assert done.returncode == 0, done.stdout + done.stderr
        runs[name] = results(tmp_path / name / "run")
    plain = run_cli("train", "--store", str(prepared), "--out", str(tmp_path / "plain"),
                    *(a for kv in SETS[:-1] for a in ("--set", kv)))
    assert plain.returncode == 0, plain.stderr
    runs["plain"] = results(tmp_path / "plain")

    one, two = runs["one"], runs["two"]
    assert (one["strategy"], one["replicas"], two["replicas"], runs["plain"]["strategy"]) == (
        "multi_worker", 1, 2, None)
    for other in ("two", "plain"):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            np.testing.assert_allclose(runs[other]["history"][key], one["history"][key], atol=TOLERANCE,
                                       rtol=0, err_msg=f"{other}: {key}")
    assert one["history"]["loss"][1] < one["history"]["loss"][0]  # it learns, so the comparison means something

    d = two["distributed"]
    assert (d["source"], d["workers"], d["nodes"], d["accelerators_per_node"]) == ("TF_CONFIG", 2, 1, 0)
    # each worker fed its half of every batch: 10 steps x 4 patches x 2 epochs
    assert [w["patches"] for w in d["per_worker"]] == [80, 80]
    assert d["total_patches_per_s"] == pytest.approx(160 / max(w["train_s"] for w in d["per_worker"]))
    assert two["energy"]["workers"] == 2 and two["global_batch_size"] == 8
    log = (tmp_path / "two" / "run" / "mlperf.log").read_text()
    assert '"key": "number_of_nodes", "value": 1' in log and '"key": "global_batch_size", "value": 8' in log
    assert run_cli("check-log", str(tmp_path / "two" / "run")).returncode == 0
    # only the chief wrote a run directory, the other worker's scratch directory is gone
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["logs", "run", "scratch"]
    assert list((tmp_path / "two" / "scratch").iterdir()) == []
    assert "worker 1 of 2" in (tmp_path / "two" / "logs" / "worker-1.log").read_text()


@pytest.mark.slow  # two workers, a signal and a resume: about a minute on 2 cores
def test_a_signal_to_one_worker_stops_both_at_the_same_step_and_the_run_resumes(prepared, tmp_path):
    run = tmp_path / "run"
    sets = [*SETS, "train.epochs=4", "infer.enabled=false"]
    proc = workers(2, "train", "--store", str(prepared), "--out", str(run), tmp=tmp_path, sets=sets, wait=False)
    history = run / "history.csv"
    deadline = time.monotonic() + 300
    while not (history.is_file() and len(history.read_text().splitlines()) >= 2):  # epoch 1 done
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    pids = subprocess.run(["pgrep", "-f", "--", f"--out {run}"], capture_output=True, text=True).stdout.split()
    index = {}
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        config = [e[len(b"TF_CONFIG="):] for e in environ if e.startswith(b"TF_CONFIG=")]
        if config and b"python" in Path(f"/proc/{pid}/cmdline").read_bytes():
            index[json.loads(config[0])["task"]["index"]] = int(pid)
    assert sorted(index) == [0, 1], pids
    other = index[1]  # the worker that is not the chief gets the signal; the chief must stop with it
    os.kill(other, signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode in (138, 143), out + err  # 128 + USR1 from the worker, or 128 + TERM from the chief
    state = json.loads((run / "state.json").read_text())
    assert 1 <= state["epochs_done"] < 4
    assert "training stopped after" in out + err and not (run / "results.json").read_text().count('"success"')

    done = workers(2, "train", "--resume", "--out", str(run), tmp=tmp_path, sets=[])
    assert done.returncode == 0, done.stdout + done.stderr
    r = results(run)
    assert (r["status"], r["epochs_run"], r["attempts"]) == ("success", 4, 2)
    assert f"resuming after epoch {state['epochs_done']}" in done.stdout


def test_a_failure_on_the_chief_stops_every_worker_with_its_message(prepared, tmp_path):
    (tmp_path / "taken").mkdir()
    done = workers(2, "train", "--store", str(prepared), "--out", str(tmp_path / "taken"), tmp=tmp_path)
    assert_clean_error(done, "run directory already exists")
    worker1 = (tmp_path / "logs" / "worker-1.log").read_text()
    assert "cloudmask: error: worker 0 stopped:" in worker1 and "run directory already exists" in worker1
    assert "Traceback" not in worker1


@pytest.mark.slow  # two workers timed; throughput mode runs by default in test_store
def test_throughput_reports_every_worker_and_the_weak_scaling_efficiency(prepared, tmp_path):
    done = workers(2, "bench", "--mode", "throughput", "--store", str(prepared), "--warmup", "1", "--steps", "3",
                   "--json", tmp=tmp_path, sets=[*TINY, "train.batch_size=4", "train.micro_batch_size=null",
                                                 "distribute.strategy=multi_worker",
                                                 "distribute.per_replica_batch=true"])
    assert done.returncode == 0, done.stdout + done.stderr
    r = json.loads(done.stdout[done.stdout.index("{"):])
    w = r["workers"]
    assert (r["batch_size"], w["workers"], w["per_worker_batch"]) == (8, 2, 4)
    assert [x["rank"] for x in w["per_worker"]] == [0, 1]
    assert w["alone_total_patches_per_s"] == pytest.approx(sum(x["alone_patches_per_s"] for x in w["per_worker"]))
    assert w["weak_scaling_efficiency"] == pytest.approx(r["train_patches_per_s"] / w["alone_total_patches_per_s"])
    # the total is timed on the chief's clock: its share of every global batch, times the workers
    assert r["train_patches_per_s"] == pytest.approx(2 * w["per_worker"][0]["joint_patches_per_s"])


# --------------------------------------------------------------------------------- without processes


def test_slurm_tasks_become_a_tf_config_in_block_order():
    cfg = load_config(overrides=["distribute.port=25000"])
    hosts = lambda nodelist: ["n1", "n2", "n3"]  # noqa: E731  (scontrol show hostnames n[1-3])
    env = {"SLURM_STEP_NUM_TASKS": "5", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURMD_NODENAME": "n2",
           "SLURM_STEP_NODELIST": "n[1-3]", "SLURM_STEP_TASKS_PER_NODE": "2(x2),1", "SLURM_JOB_ID": "7"}
    assert cluster.slurm_tf_config(cfg, env, hostnames=hosts) == {
        "cluster": {"worker": ["n1:25000", "n1:25001", "n2:25000", "n2:25001", "n3:25000"]},
        "task": {"type": "worker", "index": 3}}
    auto = cluster.slurm_tf_config(load_config(), env, hostnames=hosts)
    assert auto["cluster"]["worker"][:2] == ["n1:20056", "n1:20057"]  # 20000 + (job 7 % 4000) * 8
    with pytest.raises(ConfigError, match="--distribution=block"):  # rank 3 as n2's first task: cyclic order
        cluster.slurm_tf_config(cfg, {**env, "SLURM_LOCALID": "0"}, hostnames=hosts)
    with pytest.raises(ConfigError, match="does not add up"):
        cluster.slurm_tf_config(cfg, {**env, "SLURM_STEP_NUM_TASKS": "6"}, hostnames=hosts)
    assert cluster.slurm_tf_config(cfg, {**env, "SLURM_STEP_NUM_TASKS": "1"}, hostnames=hosts) is None
    assert cluster.slurm_tf_config(cfg, {}, hostnames=hosts) is None


def test_tasks_per_node_reads_slurms_compressed_counts():
    assert cluster.tasks_per_node("2(x3),1", 4) == [2, 2, 2, 1]
    assert cluster.tasks_per_node("4", 1) == [4]
    with pytest.raises(ConfigError, match="names 2 nodes, the step has 3"):
        cluster.tasks_per_node("1(x2)", 3)
    with pytest.raises(ConfigError, match="cannot be read"):
        cluster.tasks_per_node("two", 1)


@pytest.mark.parametrize("text, needle", [
    ("{not json", "TF_CONFIG cannot be read"),
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:1"]}, "task": {"type": "worker", "index": 0}}', "only 'worker'"),
    ('{"cluster": {"worker": ["a"]}, "task": {"type": "worker", "index": 0}}', "list of host:port"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}', "task.index=1"),
    ('{"cluster": {"worker": ["a:1"]}}', "TF_CONFIG cannot be read"),
])
def test_a_bad_tf_config_is_named(text, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        cluster.read_tf_config(text)


@pytest.mark.slow  # a CLI start-up; the messages are checked by default above
def test_a_bad_tf_config_is_a_clean_error_from_the_cli(prepared, tmp_path):
    done = run_cli("train", "--store", str(prepared), "--out", str(tmp_path / "r"), "--set",
                   "distribute.strategy=multi_worker", env={"TF_CONFIG": '{"cluster": {"worker": ["a:1"]}, '
                                                                         '"task": {"type": "worker", "index": 2}}'})
    assert_clean_error(done, "TF_CONFIG task.index=2")
    assert not (tmp_path / "r").exists()


def test_multi_worker_settings_are_checked_up_front(dataset, tmp_path):
    with pytest.raises(ConfigError, match="needs a patch store"):
        load_config(overrides=["distribute.strategy=multi_worker"])
    with pytest.raises(ConfigError, match="data.resident=host"):
        load_config(overrides=["distribute.strategy=multi_worker", "data.store=/s", "data.resident=host"])
    with pytest.raises(ConfigError, match="gradient accumulation"):
        load_config(overrides=["distribute.strategy=multi_worker", "data.store=/s", "train.micro_batch_size=8"])
    with pytest.raises(ConfigError, match="distribute.port"):
        load_config(overrides=["distribute.port=80"])
    done = run_cli("train", "--data", str(dataset), "--out", str(tmp_path / "r"), "--set",
                   "distribute.strategy=multi_worker")
    assert_clean_error(done, "distribute.strategy=multi_worker needs a patch store", "cloudmask data prepare")


def test_per_replica_batch_makes_the_batch_global():
    cfg = load_config(overrides=["distribute.per_replica_batch=true", "train.batch_size=8",
                                 "train.micro_batch_size=8"])
    scaled = cfg.for_replicas(4)
    assert (scaled.train.batch_size, scaled.train.micro_batch_size) == (32, None)
    assert "distribute.per_replica_batch" in scaled.deviations()
    assert cfg.for_replicas(1) is cfg and load_config().for_replicas(4).train.batch_size == 32


def test_energy_of_every_node_is_combined_and_a_shared_device_counted_once():
    def section(*devices):
        return {"method": "sampled", "reason": None, "devices": [
            {"index": i, "uuid": u, "total_j": t, "above_idle_j": None, "inference_j": None, "per_epoch_j": e}
            for i, u, t, e in devices]}

    none = {"method": "none", "reason": "no RAPL", "devices": []}
    a = {"host": "a", "gpu": section((0, "GPU-a0", 10.0, [4.0, 5.0]), (1, "GPU-a1", 20.0, [8.0, 9.0])), "cpu": none}
    a_again = {"host": "a", "gpu": section((0, "GPU-a0", 11.0, [4.0, 5.0])), "cpu": none}  # same node, same GPU
    b = {"host": "b", "gpu": section((0, "GPU-b0", 30.0, [1.0, 2.0])), "cpu": none}
    out = energy.combine_energy([a, a_again, b, None])
    gpu = out["gpu"]
    assert out["workers"] == 3 and gpu["nodes"] == 2
    assert [(d["host"], d["uuid"]) for d in gpu["devices"]] == [("a", "GPU-a0"), ("a", "GPU-a1"), ("b", "GPU-b0")]
    assert gpu["total_j"] == 60.0 and gpu["per_epoch_j"] == [13.0, 16.0] and gpu["above_idle_j"] is None
    assert out["cpu"]["method"] == "none"
    assert energy.combine_energy([None]) is None


def test_nodes_and_accelerators_per_node_come_from_the_workers():
    reports = [{"host": "a", "devices": ["H100"]}, {"host": "a", "devices": ["H100"]},
               {"host": "b", "devices": ["H100"]}, {"host": "b", "devices": ["H100"]}]
    assert cluster.describe_workers(reports) == {"workers": 4, "nodes": 2, "accelerators_per_node": 2,
                                                     "hosts": ["a", "b"]}
    assert cluster.describe_workers([{"host": "a", "devices": []}])["accelerators_per_node"] == 0


def test_multi_worker_needs_the_tensorflow_backend(monkeypatch):
    monkeypatch.setattr('cloudmask.training.runtime.backend', lambda: "jax")
    cfg = load_config(overrides=["distribute.strategy=multi_worker", "data.store=/s"])
    with pytest.raises(ConfigError, match="needs the TensorFlow backend"):
        cluster.connect(cfg, environ={})
