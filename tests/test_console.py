"""What a user sees on the console: progress lines in a batch log, stderr without the frameworks' start-up
messages, machine-readable lines in console.log only, aligned tables, hints for a mistyped command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, run_cli

from cloudmask.cli.progress import Progress
from cloudmask.cli.tables import text_table

CLOUDMASK = str(Path(sys.executable).with_name("cloudmask"))  # the console script a user runs
NOISE = re.compile(r"absl|oneDNN|^[IWE]\d{4} |cpu_feature_guard|TF_ENABLE_ONEDNN_OPTS", re.M)


def _user_env(**extra) -> dict:
    """A user's environment: no TF_CPP_MIN_LOG_LEVEL, as on a fresh machine."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CLOUDMASK_VERBOSE")}
    return {**env, **extra}


def test_bench_in_a_batch_log_shows_progress_before_the_first_epoch_ends(dataset, tmp_path):
    out = tmp_path / "run"
    args = [CLOUDMASK, "bench", "--data", str(dataset), "--out", str(out),
            *(a for kv in [*TINY, "infer.max_files=1"] for a in ("--set", kv))]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_user_env())
    seen_during_epoch_1 = []
    lines = []
    for line in proc.stdout:  # stdout is a pipe, as in a SLURM output file: no terminal, no live bar
        lines.append(line)
        if line.startswith("epoch 1/2 training") and not (out / "history.csv").exists():
            seen_during_epoch_1.append((time.monotonic(), line))
    stderr = proc.stderr.read()
    assert proc.wait(timeout=600) == 0, stderr
    stdout = "".join(lines)
    # a line at the first step (the slowest: it compiles), before history.csv has its first epoch
    assert seen_during_epoch_1 and re.match(r"epoch 1/2 training  1/10\s+10 %  [\d.]+ (?:patches/s|s/patch)  \S+ "
                                            r"elapsed  ETA ", seen_during_epoch_1[0][1]), stdout
    assert "epoch 1/2 validation  2/2" in stdout and "inference  1/1" in stdout
    assert stdout.index("epoch 1/2 training  1/10") < stdout.index("epoch 1/2  loss")
    # quiet stderr: no absl or oneDNN lines (TensorFlow writes them on every import)
    assert not NOISE.search(stderr), stderr
    # the timer table on the screen, its CSV form only in console.log
    assert "timers" in stdout and "# csv,timer" not in stdout
    console = (out / "console.log").read_text()
    assert re.search(r"^# csv,timer,1,run/train,1,", console, re.M)
    assert "epoch 1/2 training  1/10" in console


@pytest.mark.slow  # a bench run; progress itself is checked by default above
def test_quiet_silences_progress(dataset, tmp_path):
    done = run_cli("bench", "--data", str(dataset), "--out", str(tmp_path / "run"), "--quiet",
                   *(a for kv in [*TINY, "train.epochs=1", "infer.max_files=1"] for a in ("--set", kv)))
    assert done.returncode == 0, done.stderr
    assert "training  1/" not in done.stdout and "inference  1/" not in done.stdout
    assert "epoch 1/1  loss" in done.stdout  # the per-epoch result line stays


@pytest.mark.slow  # two doctor runs; the noise filter is checked by default below
def test_doctor_stderr_is_quiet_and_verbose_brings_the_messages_back(tmp_path):
    quiet = subprocess.run([CLOUDMASK, "doctor", "--results", str(tmp_path)], capture_output=True, text=True,
                           env=_user_env(), timeout=300)
    assert "backend" in quiet.stdout.lower() or "tensorflow" in quiet.stdout.lower(), quiet.stdout
    assert not NOISE.search(quiet.stderr), quiet.stderr
    verbose = subprocess.run([CLOUDMASK, "doctor", "--verbose", "--results", str(tmp_path)], capture_output=True,
                             text=True, env=_user_env(), timeout=300)
    assert NOISE.search(verbose.stderr), "TensorFlow printed nothing at import: the quiet test proves nothing"


def test_the_noise_filter_drops_only_noise_and_survives_a_crash():
    code = r"""
import os, sys
from cloudmask.cli.console import filter_framework_noise
filter_framework_noise()
os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
os.write(2, b"I0000 00:00:1796402341.835788    1443 port.cc:153] oneDNN custom operations are on.\n")
os.write(2, b"E0000 00:00:1796402352.117603    1443 util.cc:131] oneDNN supports DT_INT32 only on platforms "
            b"with AVX-512.\n")
os.write(2, b"E0000 00:00:1796402352.117603    1443 cuda.cc:1] failed call to cuInit: UNKNOWN ERROR (303)\n")
print("a Python warning", file=sys.stderr)
os.write(2, b"F0000 check failed: the last words before a crash\n")
os.abort()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == -6  # SIGABRT, and still every line that matters arrived
    assert done.stderr.splitlines() == ["E0000 00:00:1796402352.117603    1443 cuda.cc:1] failed call to cuInit: "
                                        "UNKNOWN ERROR (303)", "a Python warning",
                                        "F0000 check failed: the last words before a crash"]


def test_progress_lines_every_tenth_or_interval(caplog):
    caplog.set_level("INFO", logger='cloudmask.cli.progress')
    bar = Progress("epoch 1/1 training", 100, mode="lines", items_per_step=32, interval_s=3600)
    for step in range(1, 101):
        bar.update(step)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 11 and lines[0].startswith("epoch 1/1 training  1/100") and "ETA" in lines[0]
    assert [line.split()[3] for line in lines[1:]] == [f"{n}/100" for n in range(10, 101, 10)]
    assert "ETA" not in lines[-1]
    caplog.clear()
    timed = Progress("x", 10**6, mode="lines", interval_s=1.0, started=time.perf_counter())
    timed.update(1)
    time.sleep(1.05)
    timed.update(2)
    timed.update(3)  # within the interval and the same tenth: no line
    assert [r.getMessage().split()[1] for r in caplog.records] == ["1/1000000", "2/1000000"]
    caplog.clear()
    Progress("off", 10, mode="off").update(10)
    assert not caplog.records


def test_a_slow_rate_reads_as_time_per_item_and_the_last_line_comes_once(caplog):
    caplog.set_level("INFO", logger='cloudmask.cli.progress')
    started = time.perf_counter() - 64.0  # two images took 64 s
    slow = Progress("inference", 2, mode="lines", unit="images", items_per_step=1, started=started)
    slow.update(2)
    slow.update(2)  # evaluate()'s final update after its last group: the same count, no second line
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and re.search(r"  3\d\.\d s/image  1:0\d elapsed$", lines[0]), lines
    assert "0.0 images/s" not in lines[0]
    fast = Progress("epoch", 4, mode="off", items_per_step=32, started=time.perf_counter() - 1.0)
    fast.update(1)
    assert re.search(r"  3\d\.\d patches/s  ", fast.line()), fast.line()


def test_tables_align_numbers_on_the_decimal_point_and_text_left():
    table = text_table(["phase", "seconds"], [["run", "406.52"], ["  init", "5.4"], ["  other", None]])
    rows = table.splitlines()[2:]
    points = {row.index(".") for row in rows if "." in row}
    assert len(points) == 1, table
    summary = text_table(["", ""], [["epochs run", "5 of 5"], ["baseline", 0.5828]]).splitlines()
    assert summary[2].split("  ")[-1].startswith("5 of 5") and summary[3].endswith("0.5828")
    assert summary[3].index("0.5828") == summary[2].index("5 of 5")  # one column, one alignment


def test_unknown_option_shows_the_command_usage_and_the_set_form():
    done = run_cli("bench", "--epochs", "3")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "usage: cloudmask bench" in done.stderr
    assert "did you mean --set train.epochs=3?" in done.stderr
    near = run_cli("train", "--skipbad")
    assert "did you mean --skip-bad?" in near.stderr


def test_misspelt_command_gets_a_suggestion():
    done = run_cli("trian")
    assert done.returncode == 2 and "did you mean 'train'?" in done.stderr
    done = run_cli("data", "sytnh")
    assert "did you mean 'synth'?" in done.stderr
