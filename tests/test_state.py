"""state.json through run/state.RunState: files of earlier versions load, the file keeps its keys, a damaged
file is one clear error."""

from __future__ import annotations

import json
import logging

import pytest

from cloudmask.errors import RunDirError
from cloudmask.run.state import RunState

# state.json as 60fdb10 (before RunState) wrote it after the second epoch of a run with early stopping: the keys
# it had set by then, in its order; the ones it never set (restored_best_epoch, staging, ...) are absent
BEFORE = {"attempts": 2, "replicas": 1, "strategy": None, "global_batch_size": 8,
          "topology": {"source": "single", "workers": 1, "nodes": 1, "accelerators_per_node": 0, "hosts": ["vm"]},
          "run_started": True, "phase": "training", "best": "checkpoints/best-epoch0002.keras", "best_epoch": 2,
          "best_val_loss": 0.61, "latest": "checkpoints/latest-epoch0002.keras", "epochs_done": 2,
          "early_stopping": {"wait": 0, "best": 0.61, "best_epoch": 1}, "stopped_early": False,
          "energy_attempts": [{"gpu": None}], "fit_s": 12.5}


def test_a_state_file_of_the_earlier_layout_loads_and_keeps_its_values(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps(BEFORE))
    state = RunState.load(tmp_path)
    assert (state.phase, state.epochs_done, state.latest, state.best_epoch) == \
        ("training", 2, "checkpoints/latest-epoch0002.keras", 2)
    assert state.trains_on and state.checkpoint("best") == "checkpoints/best-epoch0002.keras"
    assert state.staging == [] and state.restored_best_epoch is None  # never set then: the defaults
    state.begin_attempt()
    state.commit()
    again = json.loads((tmp_path / "state.json").read_text())
    assert {k: again[k] for k in BEFORE} == {**BEFORE, "attempts": 3}  # the same keys, the same meaning
    assert set(again) == {f for f in RunState.__dataclass_fields__ if f != "path"}


def test_unknown_keys_are_named_and_ignored(tmp_path, caplog):
    (tmp_path / "state.json").write_text(json.dumps({**BEFORE, "from_the_future": 1}))
    with caplog.at_level(logging.WARNING, logger="cloudmask.run.state"):
        state = RunState.load(tmp_path)
    assert state.epochs_done == 2 and "from_the_future" in caplog.text


def test_no_file_is_a_new_run_and_a_damaged_one_a_clear_error(tmp_path):
    fresh = RunState.load(tmp_path)
    assert (fresh.phase, fresh.attempts, fresh.epochs_done) == ("training", 0, 0) and not RunState.exists(tmp_path)
    for damaged in ('{"phase": "train', "[1, 2]"):
        (tmp_path / "state.json").write_text(damaged)
        with pytest.raises(RunDirError, match="state.json: (unreadable|not a JSON object)"):
            RunState.load(tmp_path)


def test_an_epoch_commit_records_the_checkpoints_and_the_early_stopping_counters(tmp_path):
    state = RunState.load(tmp_path)
    state.commit_epoch(1, "checkpoints/latest-epoch0001.keras", ("checkpoints/best-epoch0001.keras", 0.7),
                       {"wait": 0}, stopped_early=False)
    state.commit_epoch(2, "checkpoints/latest-epoch0002.keras", None, {"wait": 1}, stopped_early=True)
    state.commit()
    saved = json.loads((tmp_path / "state.json").read_text())
    assert (saved["epochs_done"], saved["latest"], saved["best"], saved["best_epoch"], saved["best_val_loss"]) == \
        (2, "checkpoints/latest-epoch0002.keras", "checkpoints/best-epoch0001.keras", 1, 0.7)
    assert saved["early_stopping"] == {"wait": 1} and saved["stopped_early"] is True
    assert not RunState.load(tmp_path).trains_on
