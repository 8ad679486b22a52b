"""`cloudmask report` statistics and collection on hand-made run directories (real ones: test_slurm, test_bench)."""

from __future__ import annotations

import csv
import json
import math

import pytest
from conftest import assert_clean_error, run_cli

from cloudmask.campaign.report import describe
from cloudmask.config import load_config


def test_describe_known_values():
    s = describe([3.0, 1.0, 5.0, 2.0, 4.0])
    assert s["n"] == 5 and s["mean"] == 3.0 and s["min"] == 1.0 and s["max"] == 5.0
    assert s["std"] == pytest.approx(math.sqrt(2.5))
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)  # Student t, 4 degrees of freedom (tables: 2.776)
    assert (s["ci95_low"], s["ci95_high"]) == (pytest.approx(3 - half), pytest.approx(3 + half))
    assert s["olympic_mean"] == 3.0
    assert describe([1.0, 2.0, 3.0, 10.0])["olympic_mean"] == 2.5
    two = describe([1.0, 2.0])
    assert two["olympic_mean"] is None and two["std"] == pytest.approx(math.sqrt(0.5))
    assert describe([7.0])["std"] is None and describe([])["n"] == 0


def test_confidence_intervals_use_exact_t_quantiles_at_any_n():
    # 41 repeats: 40 degrees of freedom, t = 2.0210754 (a normal 1.96 would understate the interval by 3 %)
    values = [float(i % 2) for i in range(41)]
    s = describe(values)
    half = 2.0210754 * s["std"] / math.sqrt(41)
    assert (s["ci95_low"], s["ci95_high"]) == (pytest.approx(s["mean"] - half), pytest.approx(s["mean"] + half))


def _fake_run(path, seed, acc, epoch_s, status="success", energy=None, target=None):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(load_config(overrides=[f"seed={seed}"]).to_yaml())
    results = {"status": status, "error": None if status == "success" else "DataError: x.hdf unreadable",
               "seed": seed, "epochs_run": 2, "devices": ["NVIDIA H100 80GB HBM3"], "division": "closed",
               "train": {"accuracy": 0.9}, "test": {"avg_accuracy": acc},
               "history": {"loss": [0.5, 0.4], "accuracy": [0.8, 0.9], "val_loss": [0.6, 0.5],
                           "val_accuracy": [0.7, 0.8]},
               "timing": {"time_per_epoch_s": epoch_s, "time_per_inference_s": 0.1, "epoch_s": [epoch_s] * 2},
               "energy": {"gpu": energy or {"method": "none"}}, "target": target}
    (path / "results.json").write_text(json.dumps(results))
    (path / "manifest.json").write_text(json.dumps({"host": {"hostname": "node7"}}))


def test_report_groups_repeats_and_lists_broken_runs(tmp_path):
    exp = tmp_path / "results" / "base"
    _fake_run(exp / "1_1", 1, 0.90, 10.0, energy={"method": "counter", "total_j": 2000.0,
                                                  "above_idle_j": 1500.0, "per_epoch_j": [900.0, 1000.0]})
    _fake_run(exp / "1_2", 2, 0.92, 12.0, energy={"method": "counter", "total_j": 2200.0,
                                                  "above_idle_j": 1600.0, "per_epoch_j": [1000.0, 1100.0]})
    _fake_run(exp / "1_3", 3, 0.50, 1.0, status="failed")
    (exp / "1_4").mkdir()
    (exp / "1_4" / "config.yaml").write_text("seed: 4\n")  # started, then killed: no results.json
    (exp / "1_5").mkdir()
    (exp / "1_5" / "config.yaml").write_text("seed: 5\n")
    (exp / "1_5" / "results.json").write_text("{truncated")
    (exp / "1_6").mkdir()
    (exp / "1_6" / "config.yaml").write_text("seed: 6\n")
    (exp / "1_6" / "results.json").write_text(json.dumps({"status": 42, "test": "x"}))  # wrong types
    (exp / "1_7").mkdir()  # no config.yaml, and a results.json that is not an object
    (exp / "1_7" / "results.json").write_text("[1, 2]")
    _fake_run(exp / "1_8", 8, 0.9, 1.0)
    bad = json.loads((exp / "1_8" / "results.json").read_text())
    bad["energy"]["gpu"] = "lots"  # a nested section of the wrong shape
    (exp / "1_8" / "results.json").write_text(json.dumps(bad))

    done = run_cli("report", str(tmp_path / "results"), "--format", "csv")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "results" / "report"
    rows = list(csv.DictReader(open(out / "runs.csv")))
    by_run = {r["run"]: r for r in rows}
    assert [r["status"] for r in rows] == ["success", "success", "failed", "failed"] + ["unreadable"] * 4
    assert by_run["base/1_3"]["reason"] == "DataError: x.hdf unreadable"
    assert "no results.json" in by_run["base/1_4"]["reason"]
    assert by_run["base/1_5"]["reason"].startswith("results.json: Expecting property name")
    assert "status 42 is none of success, failed, interrupted" in by_run["base/1_6"]["reason"]
    assert "not a JSON object but list" in by_run["base/1_7"]["reason"]
    assert "unexpected structure" in by_run["base/1_8"]["reason"]
    assert by_run["base/1_1"]["gpu_energy_per_epoch_j"] == "950"
    assert done.stdout == (out / "runs.csv").read_text()

    summary = {r["metric"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    acc = summary["test_accuracy"]
    assert (acc["experiment"], acc["machine"], acc["gpu"], acc["n"]) == ("base", "node7", "NVIDIA H100 80GB HBM3", "2")
    assert float(acc["mean"]) == pytest.approx(0.91) and float(acc["std"]) == pytest.approx(0.0141421, rel=1e-4)
    assert float(summary["gpu_energy_j"]["mean"]) == pytest.approx(2100.0)

    md = (out / "report.md").read_text()
    problems = md.split("## Failed")[1]
    for name in ("base/1_3", "base/1_4", "base/1_5", "base/1_6", "base/1_7", "base/1_8"):
        assert name in problems
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert run_cli("report", str(tmp_path / "results")).returncode == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # deterministic


def test_report_of_a_missing_directory_is_a_clean_error(tmp_path):
    assert_clean_error(run_cli("report", str(tmp_path / "nope")), "no such directory")


def test_report_of_a_directory_without_runs_is_an_error_not_zero_runs(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert_clean_error(run_cli("report", str(tmp_path / "empty")), "no runs found", "config.yaml or results.json")
    assert not (tmp_path / "empty" / "report").exists()


def _is_png(path, min_bytes=5_000):
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > min_bytes, path
    height, width = matplotlib.image.imread(path).shape[:2]  # decodes the whole image
    assert height > 200 and width > 200
    return True


@pytest.mark.slow  # two bench runs; the report's tables and plots run by default on hand-made runs
def test_report_over_real_bench_runs_and_a_broken_one(dataset, tmp_path):
    pytest.importorskip("matplotlib")
    from conftest import TINY

    results = tmp_path / "results"
    for seed in (1, 2):
        done = run_cli("bench", "--data", str(dataset), "--out", str(results / "tiny" / f"seed{seed}"),
                       *(a for kv in [*TINY, f"seed={seed}", "infer.max_files=1"] for a in ("--set", kv)))
        assert done.returncode == 0, done.stderr
    broken = results / "tiny" / "seed3"
    broken.mkdir()
    (broken / "config.yaml").write_text("seed: 3\n")
    (broken / "results.json").write_text('{"status": "failed", "error": "DataError: S3A_x.hdf: truncated"}')

    done = run_cli("report", str(results))
    assert done.returncode == 0, done.stderr
    out = results / "report"
    for name in ("runs.csv", "summary.csv", "report.json", "report.md", "report.html"):
        assert (out / name).stat().st_size > 200, name
    rows = {r["run"]: r for r in csv.DictReader(open(out / "runs.csv"))}
    assert {rows["tiny/seed1"]["seed"], rows["tiny/seed2"]["seed"]} == {"1", "2"}
    assert rows["tiny/seed3"]["status"] == "failed" and "truncated" in rows["tiny/seed3"]["reason"]
    acc = next(r for r in csv.DictReader(open(out / "summary.csv")) if r["metric"] == "test_accuracy")
    values = [float(rows[f"tiny/seed{s}"]["test_accuracy"]) for s in (1, 2)]
    assert acc["n"] == "2" and float(acc["mean"]) == pytest.approx(sum(values) / 2, abs=1e-5)
    assert float(acc["std"]) == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2), abs=1e-5)
    md = (out / "report.md").read_text()
    assert "tiny/seed3" in md.split("## Failed")[1] and "truncated" in md
    assert md == done.stdout
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["accuracy_vs_time_energy-tiny.png", "curves-tiny.png", "time_per_epoch.png"]
    assert all(_is_png(out / p) for p in pngs)
    for p in pngs:
        assert f"]({p})" in md and p.split(".")[0] in (out / "report.html").read_text()


def test_energy_and_power_plots(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "r" / "gpu" / "1_1"
    _fake_run(run, 1, 0.9, 3.0, energy={"method": "counter", "total_j": 900.0, "above_idle_j": 400.0,
                                        "per_epoch_j": [450.0, 450.0]})
    lines = ["time,gpu,power_w,utilization_pct,memory_used_mib,temperature_c,sm_clock_mhz"]
    lines += [f"{1000 + i * 0.1:.1f},0,{60 + 200 * (i > 20)},{95},{1000},{50},{1980}" for i in range(100)]
    (run / "power.csv").write_text("\n".join(lines) + "\n")
    assert run_cli("report", str(tmp_path / "r")).returncode == 0
    out = tmp_path / "r" / "report"
    assert _is_png(out / "energy_per_epoch.png") and _is_png(out / "power_trace.png")


def test_time_and_energy_to_target_per_run_and_per_group(tmp_path):
    pytest.importorskip("matplotlib")
    exp = tmp_path / "r" / "target"
    times = {1: 30.0, 2: 20.0, 3: 40.0, 4: 25.0}
    for seed, t in times.items():
        _fake_run(exp / f"1_{seed}", seed, 0.9, t / 2, energy={"method": "counter", "total_j": 100 * t,
                                                                "per_epoch_j": [50 * t, 50 * t]},
                  target={"metric": "val_accuracy", "value": 0.75, "reached": True, "epochs_to_target": 2,
                          "time_to_target_s": t, "energy_to_target_j": 100 * t,
                          "energy_to_target_above_idle_j": 60 * t})
    _fake_run(exp / "1_5", 5, 0.8, 10.0, target={"metric": "val_accuracy", "value": 0.75, "reached": False,
                                                 "epochs_to_target": None, "time_to_target_s": None,
                                                 "energy_to_target_j": None, "energy_to_target_above_idle_j": None})
    assert run_cli("report", str(tmp_path / "r")).returncode == 0
    out = tmp_path / "r" / "report"
    rows = {r["run"]: r for r in csv.DictReader(open(out / "runs.csv"))}
    assert rows["target/1_2"]["target"] == "val_accuracy 0.75" and rows["target/1_2"]["time_to_target_s"] == "20"
    assert rows["target/1_5"]["time_to_target_s"] == "" and rows["target/1_5"]["status"] == "success"
    summary = {r["metric"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    tt = summary["time_to_target_s"]
    assert tt["n"] == "4"  # the runs that reached the target
    assert float(tt["olympic_mean"]) == pytest.approx((25 + 30) / 2)  # MLPerf: best and worst dropped
    assert float(tt["mean"]) == pytest.approx(28.75)
    assert float(summary["energy_to_target_j"]["olympic_mean"]) == pytest.approx(2750)
    assert float(summary["energy_to_target_above_idle_j"]["mean"]) == pytest.approx(60 * 28.75)
    assert _is_png(out / "accuracy_vs_time_energy-target.png")
    assert "time to target (s)" in (out / "report.md").read_text()


def test_report_names_experiments_and_never_writes_into_a_run(tmp_path):
    results = tmp_path / "results"  # output.root's default: says nothing about its runs
    for seed in (1, 2):
        _fake_run(results / f"20261204-1200{seed}0-seed{seed}", seed, 0.9, 10.0)
        manifest = results / f"20261204-1200{seed}0-seed{seed}" / "manifest.json"
        manifest.write_text(json.dumps({"host": {"hostname": "node7"}, "command": ["cloudmask", "bench"]}))
    done = run_cli("report", str(results))
    assert done.returncode == 0, done.stderr
    md = (results / "report" / "report.md").read_text()
    assert "### bench runs (2 runs)" in md and "### results" not in md
    assert "report of 2 runs: " in done.stderr

    named = run_cli("report", str(results), "--name", "laptop-cpu", "--out", str(tmp_path / "named"))
    assert named.returncode == 0, named.stderr
    assert "### laptop-cpu (2 runs)" in (tmp_path / "named" / "report.md").read_text()

    single = results / "20261204-120010-seed1"
    before = sorted(p.name for p in single.iterdir())
    done = run_cli("report", str(single))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in single.iterdir()) == before  # the run directory is left as its run wrote it
    md = (results / "report-20261204-120010-seed1" / "report.md").read_text()
    assert "(1 run)" in md and "1 runs" not in md and "1 run in 1 experiment: 1 successful." in md


def test_a_run_that_failed_before_its_data_opened_is_grouped_by_its_command(tmp_path):
    """A real train run in a generic results/ folder that stops at start-up (3 files: the validation file gives
    fewer patches than one batch) still leaves its manifest, so the report files it under "train runs" (#35)."""
    from cloudmask.dataset.synth import synthesize

    synthesize(tmp_path / "data", n_train=3, n_test=1, seed=3)
    done = run_cli("train", "--data", str(tmp_path / "data"), "--set", "model.filters=4", "--set", "model.depth=2",
                   cwd=tmp_path)
    assert_clean_error(done, "fewer than one batch")
    (run,) = (tmp_path / "results").iterdir()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["command"][1:3] == ["train", "--data"] and manifest["host"]["hostname"]
    assert manifest["dataset"]["manifest_sha256"] is None and manifest["end_time"]
    done = run_cli("report", str(tmp_path / "results"), "--format", "csv")
    assert done.returncode == 0, done.stderr
    (row,) = csv.DictReader(open(tmp_path / "results" / "report" / "runs.csv"))
    assert (row["experiment"], row["status"]) == ("train runs", "failed") and "fewer than one batch" in row["reason"]
