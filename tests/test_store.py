"""The patch store: prepared from real synthetic HDF5 files, read back in the streaming order, trained on."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from conftest import TINY, assert_clean_error, run_cli

from cloudmask.config import load_config
from cloudmask.dataset.files import find_files, split_files
from cloudmask.dataset.preprocess import Geometry
from cloudmask.inputs import hdf5_source, store
from cloudmask.inputs.batches import StreamSettings, epoch_patches
from cloudmask.run import modes

# float16 keeps 11 significant bits: |x - float16(x)| <= 2**-11 |x|; the normalised inputs stay below ~4
F16_ABS = 4 * 2.0 ** -11


def test_store_layout_and_metadata(prepared, dataset):
    meta = json.loads((prepared / "store.json").read_text())
    files = find_files(dataset / "training")
    train, val = split_files(files, 0.8, 42)
    assert meta["files"]["train"] == [p.relative_to(dataset / "training").as_posix() for p in train]
    assert meta["counts"] == {"train_x": 20 * len(train), "val_x": 20 * len(val), "test_x": 2}
    x = np.load(prepared / "train_x.npy", mmap_mode="r")
    y = np.load(prepared / "train_y.npy", mmap_mode="r")
    assert x.dtype == np.float16 and x.shape == (80, 256, 256, 9) and y.dtype == np.uint8
    raw_x, raw_y = hdf5_source.load_train_patches(train[2], Geometry(), "fixed", 0.5)
    np.testing.assert_allclose(x[40:60].astype(np.float32), raw_x, atol=F16_ABS, rtol=0)
    np.testing.assert_array_equal(y[40:60], raw_y)


def test_replicate_makes_a_full_size_store_of_copies(prepared, tmp_path):
    big = tmp_path / "big"
    done = run_cli("data", "replicate", str(prepared), str(big), "--train-files", "10", "--val-files", "3",
                   "--test-files", "5")
    assert done.returncode == 0, done.stderr
    assert "200 training + 60 validation patches, 5 test images" in done.stdout
    src, meta = json.loads((prepared / "store.json").read_text()), json.loads((big / "store.json").read_text())
    assert meta["counts"] == {"train_x": 200, "val_x": 60, "test_x": 5}
    assert meta["replicated_from"]["files"] == {"train": 4, "val": 1, "test": 2}
    for split, n in (("train", 10), ("val", 3), ("test", 5)):
        names = meta["files"][split]
        assert len(names) == n and len({name.rsplit("/", 1)[-1].split(".")[0] for name in names}) == n  # mask names
    x, small = np.load(big / "train_x.npy", mmap_mode="r"), np.load(prepared / "train_x.npy", mmap_mode="r")
    np.testing.assert_array_equal(x[180:200], small[20:40])  # file 9 is a copy of file 9 % 4 = 1
    np.testing.assert_array_equal(np.load(big / "test_y.npy")[3], np.load(prepared / "test_y.npy")[1])
    assert meta["geometry"] == src["geometry"] and meta["normalisation"] == src["normalisation"]
    cfg = load_config(overrides=TINY)
    images = store.store_test_images(store.open_store(big, cfg))
    assert len(images.files) == 5
    assert_clean_error(run_cli("data", "replicate", str(prepared), str(big)), "already exists")
    assert_clean_error(run_cli("data", "replicate", str(tmp_path / "none"), str(tmp_path / "x")), "not a patch store")


@pytest.mark.parametrize("order", ["reference", "window"])
def test_the_store_reproduces_the_streaming_pipelines_order(prepared, dataset, order):
    cfg = load_config(overrides=[f"data.root={dataset}", "train.batch_size=8", "train.shuffle_buffer_files=3"])
    files = split_files(find_files(dataset / "training"), 0.8, 42)[0]
    settings = StreamSettings(batch_size=8, seed=5, shuffle=True, order=order, window_files=3)
    raw = hdf5_source.PatchStream(files, hdf5_source.RawReading(Geometry()), settings)
    st = store.open_store(prepared, cfg)
    ours = store.StoreStream(st, "train", settings)
    assert (ours.batches, ours.steps) == (raw.batches, raw.steps)
    for (xr, yr), (xs, ys) in itertools.islice(zip(raw, ours), 2 * raw.steps):  # two epochs
        np.testing.assert_allclose(xs, xr, atol=F16_ABS, rtol=0)
        np.testing.assert_array_equal(ys, yr)


def test_global_order_is_a_fresh_permutation_every_epoch(prepared, dataset):
    cfg = load_config(overrides=[f"data.root={dataset}"])
    st = store.open_store(prepared, cfg)
    settings = StreamSettings(batch_size=8, seed=1, shuffle=True, order="global")
    s = store.StoreStream(st, "train", settings)
    e0, e1 = epoch_patches(s.order, 0), epoch_patches(s.order, 1)
    assert len(set(e0)) == len(e0) == 80 and sorted(e0) == list(range(80))
    assert not np.array_equal(e0, e1)
    np.testing.assert_array_equal(e0, epoch_patches(store.StoreStream(st, "train", settings).order, 0))
    for mode in ("host", "device"):
        reads = store.StoreStream(st, "train", settings)
        resident = store.StoreStream(st, "train", settings, resident=mode)
        for (a, b), (c, d) in itertools.islice(zip(reads, resident), 12):
            np.testing.assert_array_equal(a, np.asarray(c))
            np.testing.assert_array_equal(b, np.asarray(d))


@pytest.mark.slow  # two trainings compared; training from a store runs by default in the device-resident test
def test_training_from_the_store_matches_the_raw_files(prepared, dataset, tmp_path):
    """Same seed, deterministic CPU: the store's float16 inputs move each epoch's loss by far less than 1e-3
    (stated tolerance: 2e-3 absolute on losses and accuracies, 5e-3 on the test accuracy)."""
    common = [*TINY, "train.deterministic=true", "train.epochs=2"]
    raw = modes.run(load_config(overrides=[*common, f"data.root={dataset}"]), tmp_path / "raw")
    ours = modes.run(load_config(overrides=[*common, f"data.store={prepared}"]), tmp_path / "store")
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(ours["history"][key], raw["history"][key], atol=2e-3, rtol=0, err_msg=key)
    assert ours["test"]["avg_accuracy"] == pytest.approx(raw["test"]["avg_accuracy"], abs=5e-3)
    assert [r["file"] for r in ours["test"]["per_file"]] == [r["file"] for r in raw["test"]["per_file"]]
    assert ours["input_pipeline"] == "patch-store" and "data.store" in ours["deviations"]
    assert ours["division"] == "open"
    assert run_cli("check-log", str(tmp_path / "store")).returncode == 0


def test_staging_a_store_copies_it_once(prepared, tmp_path):
    target, first = store.stage_store(prepared, tmp_path / "local")
    # 6 arrays, their 6 CRC-32 sidecars and store.json
    assert target == tmp_path / "local" / prepared.name and first.copied == first.files == 13
    _, again = store.stage_store(prepared, tmp_path / "local")
    assert again.copied == 0
    assert (target / "store.json").read_text() == (prepared / "store.json").read_text()


def test_bad_stores_are_clean_errors(prepared, dataset, tmp_path):
    import shutil

    args = ["train", "--out", str(tmp_path / "run"), *(a for kv in TINY for a in ("--set", kv))]
    assert_clean_error(run_cli(*args, "--store", str(tmp_path / "nope")), "not a patch store")
    broken = tmp_path / "broken"
    shutil.copytree(prepared, broken)
    with open(broken / "train_x.npy", "r+b") as f:
        f.truncate(1000)
    assert_clean_error(run_cli(*args, "--store", str(broken)), "train_x.npy: truncated")
    assert_clean_error(run_cli(*args, "--store", str(prepared), "--set", "data.normalisation=zscore"),
                       "prepared with normalisation fixed")
    assert_clean_error(run_cli(*args, "--set", "train.shuffle=global", "--data", str(dataset)),
                       "train.shuffle=global needs a patch store")
    assert_clean_error(run_cli("data", "prepare", str(dataset), str(prepared)), "already exists")
    assert not (tmp_path / "run").exists()


def test_throughput_mode_prints_the_fields_as_json(prepared):
    # --set train.shuffle=global is valid only with the store given by --store: validated after both apply
    done = run_cli("bench", "--mode", "throughput", "--json", "--store", str(prepared), "--warmup", "1",
                   "--steps", "3", *(a for kv in [*TINY, "train.shuffle=global"] for a in ("--set", kv)))
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout[done.stdout.index("{"):])
    for key in ("loader_patches_per_s", "train_patches_per_s", "inference_patches_per_s", "time_per_inference_s",
                "forward_gflop_per_patch", "achieved_tflops", "peak_rss_gib"):
        assert r[key] > 0, key
    assert (r["timed_steps"], r["warmup_steps"], r["input"], r["devices"]) == (3, 1, "patch-store", ["CPU"])
    assert r["train_gflop_per_patch"] == pytest.approx(3 * r["forward_gflop_per_patch"])
    assert r["utilisation"] is None and r["device_peak_tflops"] is None  # no known peak for a CPU
    from cloudmask.training import model as model_lib

    tiny = model_lib.build_unet(256, 9, 4, 2)
    assert r["forward_gflop_per_patch"] == pytest.approx(model_lib.forward_flops(tiny) / 1e9)


def test_device_peaks():
    from cloudmask.run.throughput import device_peak

    assert device_peak("NVIDIA H100 80GB HBM3", "mixed_bfloat16") == pytest.approx(989.4e12)
    assert device_peak("NVIDIA H100 80GB HBM3", "fp32") == pytest.approx(67e12)
    assert device_peak("AMD EPYC", "fp32") is None


@pytest.mark.slow  # scripts/measure/compare_storage.py, a measuring script
def test_the_comparison_script_prints_the_ratio_table(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "measure" / "compare_pipelines.py"
    done = subprocess.run([sys.executable, str(script), "--files", "3", "--threads", "1", "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    table = [ln for ln in done.stdout.splitlines() if ln.startswith("|")]
    assert table[0].startswith("| training files | batches | reference e1 p/s | off e1 p/s | auto e1 p/s | auto/ref")
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[0] == "2" and cells[5].endswith("x") and float(cells[5][:-1]) > 0
    assert all(float(c.replace(",", "")) > 0 for c in cells[2:5])
    assert any(row.startswith("| 1 |") for row in table)  # the thread-scaling row
    assert table[-3].startswith("| decode") and all(float(c) > 0 for c in table[-1].strip("| ").split(" | "))


def test_a_device_resident_globally_shuffled_run(prepared, tmp_path):
    cfg = load_config(overrides=[*TINY, f"data.store={prepared}", "data.resident=device", "train.shuffle=global",
                                 "train.epochs=1", "infer.max_files=1"])
    results = modes.run(cfg, tmp_path / "run")
    assert results["status"] == "success" and np.isfinite(results["history"]["loss"]).all()
    assert {"train.shuffle", "data.store"} <= set(results["deviations"])
