"""`cloudmask bench`: the README's main job, run exactly as a user runs it (reference model and batch, 5 epochs)."""

import json

import pytest
from conftest import run_cli

from cloudmask.config import load_config
from cloudmask.dataset import synth


@pytest.mark.slow  # the reference model for 5 epochs: ~6-9 minutes on 2 cores; .ci/run runs it after the suite
@pytest.mark.longest
def test_bench_end_to_end_beats_the_majority_baseline(tmp_path):
    out = tmp_path / "R"
    done = run_cli("bench", "--out", str(out), env={"XDG_CACHE_HOME": str(tmp_path / "cache")}, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("config.yaml", "results.json", "history.csv", "mlperf.log", "model.keras", "manifest.json",
                 "timers.csv"):
        assert (out / name).is_file(), name
    r = json.loads((out / "results.json").read_text())
    # no GPU here: energy says so and why; CPU energy is RAPL where the machine exposes it
    assert r["energy"]["gpu"]["method"] == "none" and r["energy"]["gpu"]["reason"]
    assert r["energy"]["cpu"]["method"] in ("none", "rapl")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == r["seed"] and manifest["config_sha256"] == r["config_sha256"]
    assert manifest["packages"]["keras"] and manifest["host"]["cpu_count"] >= 1 and manifest["end_time"]
    phases = (out / "timers.csv").read_text()
    for phase in ("run/init", "run/train/epoch 5", "run/inference"):
        assert phase in phases
    assert "# csv,timer,1,run/train," in (out / "console.log").read_text()
    assert r["status"] == "success" and r["epochs_run"] == 5
    assert r["division"] == "closed" and r["deviations"] == {}  # the reference model and hyper-parameters
    # the preset's memory saving is recorded: batch 32 as 4 accumulated micro-batches of 8
    assert (r["global_batch_size"], r["micro_batch_size"], r["gradient_accumulation_steps"]) == (32, 8, 4)
    logged = [json.loads(line.split(":::MLLOG", 1)[1]) for line in (out / "mlperf.log").read_text().splitlines()
              if ":::MLLOG" in line]
    assert [e["value"] for e in logged if e["key"] == "gradient_accumulation_steps"] == [4]
    assert r["test"]["files"] == 4 and len(list((out / "masks").glob("*.h5"))) == 4
    assert r["test"]["avg_accuracy"] > r["test"]["majority_baseline"] + 0.05, r["test"]
    assert "test avg accuracy" in done.stdout and "majority-class baseline" in done.stdout
    assert run_cli("check-log", str(out)).returncode == 0


def test_synthetic_bench_data_is_made_once_and_reused(tmp_path):
    cfg = load_config("bench", [f"bench.cache_dir={tmp_path}", "bench.train_files=2", "bench.test_files=1"])
    first = synth.synthetic_dataset(cfg)
    stamp = {p: p.stat().st_mtime_ns for p in first.rglob("*.hdf")}
    assert len(stamp) == 3
    assert synth.synthetic_dataset(cfg) == first
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*.hdf")} == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary build directory left"
