"""scripts/reframe/cloudmask_check.py under the real ReFrame with its local scheduler (on the local SLURM cluster:
tests/test_slurm.py): the sanity check is check-log PASS, the figures land in ReFrame's perflog."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY

pytestmark = pytest.mark.slow  # ReFrame around tiny bench runs: half a minute each
REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "scripts" / "reframe" / "cloudmask_check.py"


def run_reframe(prefix: Path, data: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``reframe -c cloudmask_check.py -r`` in ``prefix`` on ``data`` with the tiny model and a quality target."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **(env or {})}
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '')}"
    args = [str(bin_dir / "reframe"), "-c", str(CHECK), "-r", "--prefix", str(prefix), "-S", f"data={data}",
            "-S", "mode=train", "-S", "target=0.01", "-S", f"extra_sets={','.join(TINY)}",
            "-S", f"python={sys.executable}", *extra]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=900, cwd=prefix.parent)


def perflog_values(prefix: Path) -> list[str]:
    """The last perflog line of the check (ReFrame's default format: fields separated by |)."""
    logs = list((prefix / "perflogs").rglob("CloudMaskBenchmark.log"))
    assert len(logs) == 1, logs
    return logs[0].read_text().splitlines()[-1].split("|")


def test_the_reframe_check_passes_on_the_local_scheduler(dataset, tmp_path):
    prefix = tmp_path / "rfm"
    done = run_reframe(prefix, dataset)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "PASSED" in done.stdout and "@generic:default" in done.stdout
    shown = {line.split(":")[1].strip() for line in done.stdout.splitlines() if line.startswith("P: ")}
    # no GPU here: energy is not measured, so it is no performance variable (rather than a nan that fails)
    assert shown == {"time_per_epoch", "patches_per_s", "test_accuracy", "time_to_target"}
    line = perflog_values(prefix)
    assert line[0] == "pass" and line.count("s") >= 2 and "patches/s" in line
    numbers = [float(v) for v, unit in zip(line, line[1:]) if unit in ("s", "patches/s")]
    assert len(numbers) >= 3 and all(v > 0 for v in numbers)


def test_a_run_whose_log_fails_fails_the_sanity_check(dataset, tmp_path):
    prefix = tmp_path / "rfm"
    # a config the ruleset refuses: mlperf.division=closed with a model that is not the reference's
    done = run_reframe(prefix, dataset, "-S", f"extra_sets={','.join(TINY)},mlperf.division=closed")
    assert done.returncode != 0 and "sanity" in done.stdout, done.stdout[-3000:]
