"""End-to-end training runs with a tiny U-Net on real synthetic HDF5 files."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import ALL_TEST_FILES, TINY, assert_clean_error, run_cli

from cloudmask.config import load_config
from cloudmask.dataset.files import find_files, read_sample, resolve_layout, stage_dataset
from cloudmask.errors import DataError
from cloudmask.run import modes


def _train(dataset, out, *extra):
    cfg = load_config(overrides=[*TINY, f"data.root={dataset}", *extra])
    return modes.run(cfg, out)


@pytest.fixture(scope="module")
def finished_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    results = _train(dataset, out, "train.deterministic=true", ALL_TEST_FILES)
    return out, results


def test_run_directory_holds_the_contract(finished_run):
    out, results = finished_run
    for name in ("config.yaml", "results.json", "history.csv", "mlperf.log", "console.log", "state.json",
                 "model.keras", "manifest.json", "timers.csv"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    saved = load_config(str(out / "config.yaml"))  # every key written out, reloadable as a config file
    assert (saved.model.filters, saved.train.epochs, saved.train.deterministic) == (4, 2, True)
    assert saved.sha256() == results["config_sha256"]
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "latest-epoch0002.keras" in checkpoints and any(n.startswith("best-") for n in checkpoints)
    assert not [p for p in out.rglob("*.tmp*")], "temporary files left behind"


def test_results_schema(finished_run):
    out, r = finished_run
    assert r["benchmark"] == "cloudmask" and r["status"] == "success" and r["seed"] == 1234
    assert r["epochs_run"] == r["epochs_configured"] == 2
    for key in ("accuracy", "loss", "val_accuracy", "val_loss"):
        assert 0 <= r["train"][key] and np.isfinite(r["train"][key])
    assert len(r["history"]["loss"]) == 2
    test = r["test"]
    assert test["files"] == 2 and len(test["per_file"]) == 2
    assert test["avg_accuracy"] == pytest.approx(np.mean([f["accuracy"] for f in test["per_file"]]))
    for f in test["per_file"]:
        assert f["tp"] + f["fp"] + f["fn"] + f["tn"] == 1200 * 1500
        assert f["accuracy"] == pytest.approx((f["tp"] + f["tn"]) / 1.8e6)
    t = r["timing"]
    assert len(t["epoch_s"]) == 2 and t["train_s"] >= sum(t["epoch_s"]) * 0.99
    assert t["time_per_epoch_s"] == pytest.approx(t["train_s"] / 2)
    assert t["time_per_inference_s"] == pytest.approx(t["inference_s"] / 2)
    # the reference's clock: data set-up, model build, fit and the model save (timers.csv), per configured epoch
    timers = {row["name"]: float(row["seconds"]) for row in csv.DictReader(open(out / "timers.csv"))}
    reference_s = timers["run/init/data"] + timers["run/init/model"] + timers["run/train"]
    assert t["reference_train_s"] == pytest.approx(reference_s) and reference_s > t["train_s"]
    assert t["reference_time_per_epoch_s"] == pytest.approx(reference_s / 2)
    line = next(ln for ln in (out / "console.log").read_text().splitlines() if "CloudMask training," in ln)
    assert line.endswith(f"time_per_epoch={t['reference_time_per_epoch_s']:.2f}")
    assert r["samples"] == {"train": 80, "val": 20, "train_files": 4, "val_files": 1, "test_files": 2,
                            "train_steps_per_epoch": 10}
    assert r["division"] == "open" and "model.filters" in r["deviations"]
    events = {e["key"]: e["value"] for e in (json.loads(ln[len(":::MLLOG "):])
                                             for ln in (out / "mlperf.log").read_text().splitlines())}
    assert events["number_of_ranks"] == 1 and events["cloudmask_deviations"] == sorted(r["deviations"])


def test_history_csv(finished_run):
    out, r = finished_run
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "epoch_s", "samples_per_s"):
        assert all(float(row[key]) >= 0 for row in rows)
    assert [float(row["loss"]) for row in rows] == pytest.approx(r["history"]["loss"])


def test_masks_are_compact_and_match_the_scores(finished_run, dataset):
    out, r = finished_run
    masks = sorted((out / "masks").glob("*.h5"))
    assert len(masks) == 2
    for mask_file, scored in zip(masks, sorted(r["test"]["per_file"], key=lambda f: os.path.basename(f["file"]))):
        with h5py.File(mask_file) as f:
            mask = f["mask"][()]
            assert mask.dtype == np.uint8 and mask.shape == (1200, 1500)
            assert "probability" not in f
        truth = read_sample(dataset / "inference" / scored["file"]).label[..., 0]
        assert np.mean(mask == truth) == pytest.approx(scored["accuracy"])
        assert mask_file.stat().st_size < 2e6  # the reference wrote ~149 MB per image


def test_check_log_passes_and_fails_without_run_stop(finished_run, tmp_path):
    out, _ = finished_run
    assert run_cli("check-log", str(out)).returncode == 0
    broken = tmp_path / "mlperf.log"
    broken.write_text("".join(line for line in open(out / "mlperf.log") if '"key": "run_stop"' not in line))
    done = run_cli("check-log", str(broken))
    assert done.returncode == 1 and "run_stop" in done.stdout + done.stderr


def test_mlperf_log_has_per_epoch_events_and_the_reference_result(finished_run):
    out, r = finished_run
    events = [json.loads(line.split(":::MLLOG ", 1)[1]) for line in open(out / "mlperf.log")]
    keys = [e["key"] for e in events]
    assert keys.count("epoch_start") == keys.count("epoch_stop") == 2
    assert keys.count("eval_start") == 3  # two validations and the test inference
    accs = [e["value"] for e in events if e["key"] == "eval_accuracy"]
    assert accs == pytest.approx(r["history"]["val_accuracy"])
    result = next(e["value"] for e in events if e["key"] == "result")
    assert result["name"] == "cloudmask" and result["inference"]["avg_accuracy"] == r["test"]["avg_accuracy"]
    assert set(result["training"]) >= {"samples", "accuracy", "loss", "val_loss", "val_accuracy", "history"}
    assert keys[-1] == "run_stop"


@pytest.mark.slow  # a second whole run; seeded determinism runs by default in
# test_pipeline.py::test_same_seed_same_order_and_resume_reproduces_the_epoch (the order, bit for bit)
def test_same_seed_gives_identical_results(finished_run, dataset, tmp_path):
    _, first = finished_run
    second = _train(dataset, tmp_path / "again", "train.deterministic=true", ALL_TEST_FILES)
    assert second["history"] == first["history"]
    assert second["test"]["avg_accuracy"] == first["test"]["avg_accuracy"]
    assert [f["accuracy"] for f in second["test"]["per_file"]] == [f["accuracy"] for f in first["test"]["per_file"]]
    other = _train(dataset, tmp_path / "other", "train.deterministic=true", "seed=99", "train.epochs=1",
                   "infer.enabled=false")
    assert other["history"]["loss"][0] != first["history"]["loss"][0]


def test_an_existing_run_directory_is_refused_and_left_alone(finished_run, dataset):
    out, _ = finished_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    done = run_cli("train", "--data", str(dataset), "--out", str(out), *sum((["--set", s] for s in TINY), []))
    assert_clean_error(done, str(out), "already exists", f"cloudmask train --resume --out {out}")
    done = run_cli("bench", "--data", str(dataset), "--out", str(out))  # bench has no --resume of its own
    assert_clean_error(done, str(out), "already exists", f"cloudmask train --resume --out {out}")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_resume_of_a_finished_run_is_refused_and_changes_nothing(finished_run):
    out, _ = finished_run
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    done = run_cli("train", "--resume", "--out", str(out))
    assert_clean_error(done, str(out), "has finished", "cloudmask infer")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert run_cli("check-log", str(out)).returncode == 0


def test_wrong_paths_are_named_for_what_they_are(finished_run, dataset, tmp_path):
    out, _ = finished_run
    assert_clean_error(run_cli("infer", str(tmp_path / "nope")), "no such run directory to score")
    (tmp_path / "plain").write_text("x")
    assert_clean_error(run_cli("train", "--resume", "--out", str(tmp_path / "plain")), "is a file, not a run")
    assert_clean_error(run_cli("train", "--data", str(dataset), "--out", str(tmp_path / "plain")),
                       "a file of that name already exists")
    assert_clean_error(run_cli("infer", str(tmp_path / "plain")), "is a file, not a run directory")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    state = json.loads((copy / "state.json").read_text())
    state["phase"] = "training"
    (copy / "state.json").write_text(json.dumps(state))
    (copy / state["latest"]).unlink()
    assert_clean_error(run_cli("train", "--resume", "--out", str(copy)), state["latest"].split("/")[-1],
                       "checkpoint missing")


def test_resume_with_a_different_config_is_refused(finished_run):
    out, _ = finished_run
    done = run_cli("train", "--resume", "--out", str(out), "--set", "train.epochs=9")
    assert_clean_error(done, "different config", "train.epochs")


def test_missing_data_is_a_clean_error(tmp_path):
    done = run_cli("train", "--out", str(tmp_path / "r"))
    assert_clean_error(done, "no dataset given")
    assert not (tmp_path / "r").exists()
    done = run_cli("train", "--data", str(tmp_path), "--out", str(tmp_path / "r"))
    assert_clean_error(done, str(tmp_path))


def _history_columns(run) -> list[dict]:
    """history.csv without its timing columns: every metric, validation included."""
    with open(run / "history.csv") as f:
        return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in csv.DictReader(f)]


def _weights(run):
    import keras

    return keras.models.load_model(run / "model.keras").get_weights()


@pytest.mark.slow  # three trainings; a signal and a resume run by default in test_integrity (SIGHUP, two resumes)
def test_sigterm_then_resume_continues_and_matches_an_uninterrupted_run(dataset, tmp_path):
    """Deterministic: the resumed run's whole history.csv (validation too) and final weights equal an
    uninterrupted run's. With micro-batches, as the bench preset: Keras re-chained the two batches it peeked at
    in front of every validation pass of a plain stream, so validation differed after a resume."""
    out = tmp_path / "run"
    args = ["train", "--data", str(dataset), "--out", str(out)]
    sets = [*TINY, "train.epochs=4", "train.deterministic=true", "train.micro_batch_size=4"]
    proc = subprocess.Popen([sys.executable, "-m", "cloudmask", *args, *sum((["--set", s] for s in sets), [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "history.csv").is_file() and len((out / "history.csv").read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    time.sleep(0.5)  # into epoch 2
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "SIGTERM received" in stderr and "--resume" in stderr
    interrupted = json.loads((out / "results.json").read_text())
    assert interrupted["status"] == "interrupted" and 1 <= interrupted["epochs_run"] < 4
    done_before = interrupted["epochs_run"]

    done = run_cli("train", "--resume", "--out", str(out))
    assert done.returncode == 0, done.stderr
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["status"] == "success" and resumed["epochs_run"] == 4 and resumed["attempts"] == 2
    assert f"resuming after epoch {done_before}" in (out / "console.log").read_text()
    assert run_cli("check-log", str(out)).returncode == 0

    straight = _train(dataset, tmp_path / "straight", "train.epochs=4", "train.deterministic=true",
                      "train.micro_batch_size=4")
    assert _history_columns(out) == _history_columns(tmp_path / "straight")
    assert resumed["history"] == straight["history"]
    assert all(np.array_equal(a, b) for a, b in zip(_weights(out), _weights(tmp_path / "straight")))
    assert resumed["test"]["avg_accuracy"] == straight["test"]["avg_accuracy"]


@pytest.mark.slow  # a run stopped in inference, then resumed
def test_sigterm_during_inference_stops_cleanly_and_resume_scores_only(dataset, tmp_path):
    out = tmp_path / "run"
    sets = [*TINY, ALL_TEST_FILES, "train.epochs=1", "infer.images_per_call=1", "telemetry.idle_seconds=0"]
    proc = subprocess.Popen([sys.executable, "-m", "cloudmask", "train", "--data", str(dataset), "--out", str(out),
                             *sum((["--set", s] for s in sets), [])], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # training over, the model saved: inference next
        try:
            if json.loads((out / "state.json").read_text()).get("phase") == "inference":
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "stopped during inference" in stderr and "--resume" in stderr
    stopped = json.loads((out / "results.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["epochs_run"] == 1 and stopped["test"] is None
    history = (out / "history.csv").read_text()

    done = run_cli("train", "--resume", "--out", str(out))
    assert done.returncode == 0, done.stderr
    r = json.loads((out / "results.json").read_text())
    assert r["status"] == "success" and r["attempts"] == 2 and r["test"]["files"] == 2
    assert (out / "history.csv").read_text() == history  # training was not repeated
    assert "epoch 1/1" not in done.stdout
    assert run_cli("check-log", str(out)).returncode == 0


@pytest.mark.slow  # a run, then its checkpoint damaged and resumed
def test_a_corrupt_checkpoint_on_resume(dataset, tmp_path):
    out = tmp_path / "run"
    _train(dataset, out, "train.epochs=1", "infer.enabled=false")
    state = json.loads((out / "state.json").read_text())
    # pretend the run was stopped after epoch 1 and its checkpoint got damaged
    state.update(phase="training")
    (out / "state.json").write_text(json.dumps(state))
    (out / state["latest"]).write_bytes(b"garbage")
    history = (out / "history.csv").read_text()
    done = run_cli("train", "--resume", "--out", str(out), "--set", "train.epochs=1")
    assert done.returncode != 0
    done = run_cli("train", "--resume", "--out", str(out))
    assert_clean_error(done, state["latest"].split("/")[-1], "SHA-256 differs")  # not the bytes the run wrote
    assert (out / "history.csv").read_text() == history
    state.update(checkpoint_sha256={})  # a state without digests (an earlier version's): loading it fails
    (out / "state.json").write_text(json.dumps(state))
    done = run_cli("train", "--resume", "--out", str(out))
    assert_clean_error(done, state["latest"].split("/")[-1], "cannot be loaded")
    assert (out / "history.csv").read_text() == history


@pytest.mark.slow  # about a minute on 2 cores
def test_a_bad_file_met_mid_run(dataset_copy, tmp_path):
    # headers fine, values all NaN: found only when the file is read during the epoch
    victim = find_files(dataset_copy / "training")[0]
    with h5py.File(victim, "r+") as f:
        f["bts"][...] = np.nan
        f["refs"][...] = np.nan
    with pytest.raises(DataError, match=str(victim)):
        _train(dataset_copy, tmp_path / "strict")
    failed = json.loads((tmp_path / "strict" / "results.json").read_text())
    assert failed["status"] == "failed" and str(victim) in failed["error"]
    ok = _train(dataset_copy, tmp_path / "lenient", "data.skip_bad=true")
    assert ok["status"] == "success" and ok["epochs_run"] == 2


@pytest.mark.slow  # two trainings compared
def test_micro_batches_give_the_same_training(dataset, tmp_path):
    """Batches of 8 as 4 accumulated micro-batches of 2: the same updates up to float rounding."""
    import keras

    whole = _train(dataset, tmp_path / "whole", "train.deterministic=true", "infer.enabled=false")
    micro = _train(dataset, tmp_path / "micro", "train.deterministic=true", "infer.enabled=false",
                   "train.micro_batch_size=2")
    assert micro["history"]["loss"] == pytest.approx(whole["history"]["loss"], rel=1e-4)
    assert micro["samples"] == whole["samples"] and micro["micro_batch_size"] == 2
    a = keras.models.load_model(tmp_path / "whole" / "model.keras")
    b = keras.models.load_model(tmp_path / "micro" / "model.keras")
    assert int(a.optimizer.iterations) == int(b.optimizer.iterations) == 20  # 2 epochs x 10 updates
    # Adam moves every weight by about lr per step whatever the gradient's size, so float noise in tiny
    # gradients shows as differences of a fraction of lr: bound them by one step (observed: ~1e-4)
    worst = max(float(np.abs(wa - wb).max()) for wa, wb in zip(a.get_weights(), b.get_weights()))
    assert worst <= 1e-3
    assert micro["deviations"] == whole["deviations"]  # same global batch: not a deviation


@pytest.mark.slow  # a six-epoch run; the early-stopping counters are checked by default in test_state
def test_early_stopping_and_best_weights(dataset, tmp_path):
    r = _train(dataset, tmp_path / "es", "train.epochs=5", "train.early_stopping.enabled=true",
               "train.early_stopping.patience=0", "train.early_stopping.min_delta=10.0", "infer.enabled=false")
    assert r["stopped_early"] and r["epochs_run"] == 2 and not r["restored_best_weights"]
    r = _train(dataset, tmp_path / "esb", "train.epochs=5", "train.early_stopping.enabled=true",
               "train.early_stopping.patience=0", "train.early_stopping.min_delta=10.0",
               "train.early_stopping.restore_best_weights=true", "infer.enabled=false")
    assert r["restored_best_weights"] and "train.early_stopping.restore_best_weights" in r["deviations"]


def test_infer_scores_a_finished_run_into_a_new_directory(finished_run, tmp_path):
    out, r = finished_run
    before = sorted(p.name for p in out.iterdir())
    done = run_cli("infer", str(out), "--out", str(tmp_path / "inf"), "--set", "infer.save_probabilities=true")
    assert done.returncode == 0, done.stderr
    inf = json.loads((tmp_path / "inf" / "results.json").read_text())
    assert inf["mode"] == "inference" and inf["test"]["avg_accuracy"] == r["test"]["avg_accuracy"]
    with h5py.File(next((tmp_path / "inf" / "masks").glob("*.h5"))) as f:
        assert f["probability"].dtype == np.float16
    assert sorted(p.name for p in out.iterdir()) == before
    done = run_cli("infer", str(tmp_path / "nope"))
    assert_clean_error(done, "no such run directory")


@pytest.mark.slow  # a run staged twice; staging a store runs by default in test_store
def test_stage_to_copies_the_dataset_once_and_logs_mlperf_staging(dataset, tmp_path):
    stage = tmp_path / "node-local"
    cfg = load_config(overrides=[*TINY, "train.epochs=1", "infer.max_files=1", f"data.root={dataset}"])
    results = modes.run(cfg, tmp_path / "run", stage_to=stage)
    staged = results["staging"][0]
    n_files = len(find_files(dataset / "training")) + len(find_files(dataset / "inference"))
    assert (staged["files"], staged["copied"]) == (n_files, n_files)
    assert sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*.hdf")) == \
        sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*.hdf"))
    log = (tmp_path / "run" / "mlperf.log").read_text()
    assert log.index('"staging_start"') < log.index('"staging_stop"') < log.index('"init_stop"')
    assert run_cli("check-log", str(tmp_path / "run")).returncode == 0
    # a second run staging to the same place (a task requeued onto the same node) copies nothing
    layout, again = stage_dataset(resolve_layout(str(dataset)), stage)
    assert (again.files, again.copied) == (n_files, 0) and layout.train_dir == stage / "training"


@pytest.mark.slow  # a run refused at staging; staging itself runs by default above
def test_stage_to_an_unwritable_place_is_a_clean_error(dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    done = run_cli("train", "--data", str(dataset), "--out", str(tmp_path / "run"), "--stage-to",
                   str(blocker / "x"), *(a for kv in TINY for a in ("--set", kv)))
    assert_clean_error(done, "cannot stage the dataset")


@pytest.mark.slow  # a whole run; precision's deviation is checked by default in test_config
def test_mixed_precision_trains_and_is_a_deviation(dataset, tmp_path):
    results = _train(dataset, tmp_path / "bf16", "train.precision=mixed_bfloat16", "train.epochs=1",
                     "infer.max_files=1")
    assert results["status"] == "success" and results["deviations"]["train.precision"]["value"] == "mixed_bfloat16"
    assert np.isfinite(results["history"]["loss"]).all() and 0 <= results["test"]["avg_accuracy"] <= 1
    import keras

    keras.mixed_precision.set_global_policy("float32")  # later tests in this process build fp32 models


@pytest.mark.slow  # two trainings compared, the two-replica one slow on 2 cores
def test_two_mirrored_replicas_follow_the_single_device_trajectory(dataset, tmp_path):
    """Data parallelism (MirroredStrategy over 2 logical CPUs) against the same strategy on 1 device, same global
    batch: the same losses up to the all-reduce's summation order (stated tolerance: 1e-4 absolute per epoch).
    (A run without any strategy is not bit-comparable: variables are created differently under a strategy.)"""
    sets = [*TINY, "train.deterministic=true", "train.epochs=2", "infer.max_files=1", "distribute.strategy=mirrored"]
    runs = {}
    for name, extra in (("one", []), ("two", ["distribute.cpu_devices=2"])):
        done = run_cli("train", "--data", str(dataset), "--out", str(tmp_path / name),
                       *(a for kv in [*sets, *extra] for a in ("--set", kv)))
        assert done.returncode == 0, done.stderr
        runs[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert (runs["one"]["replicas"], runs["two"]["replicas"]) == (1, 2)
    assert "2 replicas: global batch 8, 4 per replica" in (tmp_path / "two" / "console.log").read_text()
    for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
        np.testing.assert_allclose(runs["two"]["history"][key], runs["one"]["history"][key], atol=1e-4, err_msg=key)
