"""Peak resident memory of a real run, per phase (init, train, inference), for docs/performance.md.

    python scripts/measure/peak_memory.py --data DIR [--set key=value ...]

Runs `cloudmask train` in this process with a background RSS sampler (every 50 ms), then splits the samples by
the phases the run itself wrote to timers.csv. Prints one Markdown table row per call. The run directory is a
temporary one, deleted afterwards.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="dataset root")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from cloudmask.config import load_config
    from cloudmask.run import modes

    proc = psutil.Process()
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample():
        while not done.wait(0.05):
            samples.append((time.perf_counter(), proc.memory_info().rss))

    cfg = load_config(overrides=[f"data.root={args.data}", *args.set])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        results = modes.run(cfg, Path(tmp) / "run")
        done.set()
        thread.join()
        with open(Path(tmp) / "run" / "timers.csv") as f:
            phases = [r for r in csv.DictReader(f) if r["depth"] == "1"]
    # the run's timers start a few ms after t0 (the run directory is made first): far below the 50 ms sampling
    offset = t0
    peaks = {}
    for r in phases:
        start, end = offset + float(r["start_s"]), offset + float(r["start_s"]) + float(r["seconds"] or 0)
        inside = [rss for t, rss in samples if start <= t <= end]
        peaks[r["name"].split("/", 1)[1]] = max(inside) / 2**30 if inside else None
    overall = max(rss for _, rss in samples) / 2**30
    gib = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print("| settings | peak RSS init GiB | peak RSS train GiB | peak RSS inference GiB | peak RSS GiB | "
          "s per test image |")
    print(f"| {' '.join(args.set) or 'defaults'} | {gib(peaks.get('init'))} | {gib(peaks.get('train'))} | "
          f"{gib(peaks.get('inference'))} | {overall:.2f} | "
          f"{results['timing']['time_per_inference_s'] or 0:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
