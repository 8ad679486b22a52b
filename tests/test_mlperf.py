import json

import pytest

from cloudmask.errors import CloudmaskError
from cloudmask.run import mlperf


def _write_log(path, drop=(), division="open", batch=8, lr=0.001, deviations=("model.filters",)):
    """A complete, minimal cloudmask MLPerf log written through the real MLPerfLog."""
    log = mlperf.MLPerfLog(path)
    events = [
        ("start", "init_start", None, {}),
        ("event", "submission_benchmark", "cloudmask", {}), ("event", "submission_org", "test", {}),
        ("event", "submission_division", division, {}), ("event", "submission_status", "research", {}),
        ("event", "submission_platform", "ci", {}), ("event", "cache_clear", False, {}),
        ("event", "seed", 1234, {}), ("event", "global_batch_size", batch, {}), ("event", "opt_name", "adam", {}),
        ("event", "gradient_accumulation_steps", 1, {}),
        ("event", "opt_base_learning_rate", lr, {}), ("event", "train_samples", 80, {}),
        ("event", "eval_samples", 20, {}), ("event", "number_of_ranks", 1, {}), ("event", "number_of_nodes", 1, {}),
        ("event", "accelerators_per_node", 0, {}), ("event", "cloudmask_deviations", list(deviations), {}),
        ("end", "init_stop", None, {}), ("start", "run_start", None, {}),
        ("start", "epoch_start", None, {"epoch_num": 1}), ("start", "eval_start", None, {"epoch_num": 1}),
        ("end", "eval_stop", None, {"epoch_num": 1}), ("end", "epoch_stop", None, {"epoch_num": 1}),
        ("event", "eval_accuracy", 0.8, {"epoch_num": 1}),
        ("event", "result", {"name": "cloudmask", "training": {}}, {}),
        ("end", "run_stop", None, {"status": "success"}),
    ]
    for kind, key, value, meta in events:
        if key not in drop:
            getattr(log, kind)(key, value, **meta)
    log.close()
    return path


def test_a_complete_log_passes(tmp_path):
    ok, output = mlperf.check_log(_write_log(tmp_path / "mlperf.log"))
    assert ok, output
    assert "SUCCESS" in output


@pytest.mark.parametrize("key", ["run_stop", "run_start", "init_stop", "seed", "submission_benchmark",
                                 "eval_accuracy", "epoch_start", "result", "train_samples",
                                 "gradient_accumulation_steps", "number_of_ranks", "cloudmask_deviations"])
def test_a_log_missing_a_required_key_fails(tmp_path, key):
    ok, output = mlperf.check_log(_write_log(tmp_path / "mlperf.log", drop=(key,)))
    assert not ok
    assert key in output


def test_closed_division_requires_reference_hyperparameters(tmp_path):
    ok, _ = mlperf.check_log(_write_log(tmp_path / "a.log", division="closed", batch=32, deviations=()))
    assert ok
    ok, output = mlperf.check_log(_write_log(tmp_path / "d.log", division="closed", batch=32))
    assert not ok and "cloudmask_deviations" in output  # a closed run with a ledger deviation
    ok, output = mlperf.check_log(_write_log(tmp_path / "b.log", division="closed", batch=8, deviations=()))
    assert not ok and "== 32" in output
    ok, output = mlperf.check_log(_write_log(tmp_path / "c.log", division="closed", batch=32, lr=0.01,
                                              deviations=()))
    assert not ok and "0.001" in output


def test_lines_are_mllog_json_with_package_relative_files(tmp_path):
    from cloudmask.config import load_config

    path = _write_log(tmp_path / "mlperf.log")
    lines = path.read_text().splitlines()
    assert all(line.startswith(":::MLLOG {") for line in lines)
    first = json.loads(lines[0][len(":::MLLOG "):])
    assert first["key"] == "init_start" and first["event_type"] == "INTERVAL_START"
    # events logged by the package name their call site relative to it (stable across machines)
    log = mlperf.MLPerfLog(tmp_path / "b.log")
    mlperf.log_submission(log, load_config(), "ci", "open")
    log.close()
    record = json.loads((tmp_path / "b.log").read_text().splitlines()[0][len(":::MLLOG "):])
    assert record["key"] == "submission_benchmark" and record["metadata"]["file"] == "cloudmask/run/mlperf.py"


def test_missing_or_garbage_log(tmp_path):
    with pytest.raises(CloudmaskError, match="no MLPerf log"):
        mlperf.check_log(tmp_path)
    (tmp_path / "mlperf.log").write_text("hello\n")
    ok, output = mlperf.check_log(tmp_path)
    assert not ok
