"""`cloudmask package` on three real tiny repeats: the tree, the score, and a refusal for each broken input."""

import json
import shutil

import pytest
from conftest import TINY, assert_clean_error, run_cli


@pytest.fixture(scope="module")
def repeats(dataset, tmp_path_factory):
    """Three seeded repeats with a quality target reached in epoch 1, and mlperf.runs=3 (no inference: the
    package's score is the time to the target)."""
    root = tmp_path_factory.mktemp("repeats") / "exp"
    for seed in (1, 2, 3):
        sets = [*TINY, f"seed={seed}", "train.target.value=0.01", "mlperf.runs=3", "infer.enabled=false"]
        done = run_cli("train", "--data", str(dataset), "--out", str(root / f"seed{seed}"),
                       *(a for kv in sets for a in ("--set", kv)))
        assert done.returncode == 0, done.stderr[-2000:]
    return root


def _package(tmp_path, *runs):
    out = tmp_path / "pkg"
    return out, run_cli("package", *map(str, runs), "--org", "Test Lab", "--system", "node7-cpu", "--out", str(out))


def test_three_repeats_make_a_checked_package(repeats, tmp_path):
    out, done = _package(tmp_path, repeats)
    assert done.returncode == 0, done.stderr
    folder = out / "results" / "node7-cpu" / "cloudmask"
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "result_0.txt", "result_1.txt",
                                                        "result_2.txt", "summary.json"]
    for i, seed in enumerate((1, 2, 3)):
        assert (folder / f"result_{i}.txt").read_bytes() == (repeats / f"seed{seed}" / "mlperf.log").read_bytes()
        assert run_cli("check-log", str(folder / f"result_{i}.txt")).returncode == 0
    system = json.loads((out / "systems" / "node7-cpu.json").read_text())
    assert system["submitter"] == "Test Lab" and system["host_processor_model_name"]
    assert system["accelerators_per_node"] == 0 and system["division"] == "open"
    summary = json.loads((folder / "summary.json").read_text())
    times = sorted(json.loads((repeats / f"seed{s}" / "results.json").read_text())["target"]["time_to_target_s"]
                   for s in (1, 2, 3))
    assert summary["score_metric"] == "time_to_target_s" and summary["score"] == pytest.approx(times[1])
    assert [r["seed"] for r in summary["per_run"]] == [1, 2, 3]
    assert "score time_to_target_s olympic mean" in done.stdout
    _, again = _package(tmp_path, repeats)
    assert_clean_error(again, "already exists")


def _copy(repeats, tmp_path, seed, name):
    target = tmp_path / "runs" / name
    shutil.copytree(repeats / f"seed{seed}", target)
    return target


def test_a_duplicated_seed_is_refused_naming_the_runs(repeats, tmp_path):
    twin = _copy(repeats, tmp_path, 2, "twin")
    out, done = _package(tmp_path, repeats, twin)
    assert_clean_error(done, "both have seed 2", "twin")
    assert not out.exists()


def test_a_failed_run_is_refused_naming_it(repeats, tmp_path):
    broken = _copy(repeats, tmp_path, 3, "broken")
    results = json.loads((broken / "results.json").read_text())
    (broken / "results.json").write_text(json.dumps({**results, "status": "failed", "error": "DataError: x"}))
    out, done = _package(tmp_path, repeats / "seed1", repeats / "seed2", broken)
    assert_clean_error(done, str(broken), "failed")
    assert not out.exists()


def test_a_log_that_fails_the_ruleset_is_refused_naming_the_run(repeats, tmp_path):
    bad = _copy(repeats, tmp_path, 3, "badlog")
    log = bad / "mlperf.log"
    log.write_text("".join(line for line in open(log) if '"key": "run_stop"' not in line))
    out, done = _package(tmp_path, repeats / "seed1", repeats / "seed2", bad)
    assert_clean_error(done, str(bad), "fails the cloudmask ruleset")
    assert not out.exists()


def test_fewer_runs_than_the_config_asks_for_are_refused(repeats, tmp_path):
    out, done = _package(tmp_path, repeats / "seed1", repeats / "seed2")
    assert_clean_error(done, "2 runs, the config asks for 3 (mlperf.runs)")
    assert not out.exists()
