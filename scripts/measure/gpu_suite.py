"""The GPU measurement suite: every accelerator figure of docs/performance.md from one prepared command.

    scripts/measure/gpu_suite.sh --out DIR                   on the GPU machine (Keras on JAX; see the .sh)
    scripts/measure/gpu_suite.sh --out DIR --cpu --small     the same steps at toy size on the CPU (tests/test_gpu_suite.py)

Each step is a real ``cloudmask`` command run as a user runs it; its output goes to DIR/logs/<step>.log and its
figures into DIR/suite.json, which is rewritten after every step, so a run cut off at a time limit keeps what it
measured. The steps, most valuable first (a step that would outlast ``--budget-s`` is skipped, and says so):

1. device facts: ``nvidia-smi`` (and its full ``-q`` report in DIR/nvidia-smi.txt);
2. data: synthetic SLSTR-like files (``data synth``), a patch store of them (``data prepare``), and a full-size
   store of copies (``data replicate``: 776 training, 194 validation, 100 test files, as the real dataset) in
   RAM-backed /dev/shm when it has room;
3. steady-state training throughput from the store resident in device memory, XLA on, for each precision and
   batch size (``bench --mode throughput``), with achieved TFLOP/s and the share of the device's peak;
4. one full-size training run (``train``, 2 epochs of 15,520 patches): epoch times, NVML energy per epoch net of
   the idle baseline measured before training, power.csv, then inference of the 100 test images;
5. a short real training run on the synthetic files (``bench``) that must beat the majority-class baseline;
6. ``check-log`` on both runs' MLPerf logs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Targets (issue 18): bf16 training patches/s on an H200 and seconds for the 100 test images.
TARGET_PATCHES_PER_S = 6000
TARGET_TEST_SET_S = 3.0
FULL = {"synth": (10, 4), "files": (776, 194, 100), "sets": [], "batches": (32, 256), "warmup": 5, "steps": 60,
        "epochs": 2, "batch": 32, "idle_s": 10, "budget_s": 480}
SMALL = {"synth": (10, 2), "files": (6, 2, 3), "sets": ["model.filters=4", "model.depth=2", "infer.images_per_call=2"],
         "batches": (8, 16), "warmup": 1, "steps": 2, "epochs": 2, "batch": 8, "idle_s": 1, "budget_s": 1200}
PRECISIONS = ("mixed_bfloat16", "fp32")


class Suite:
    def __init__(self, out: Path, size: dict, cpu: bool, budget_s: float):
        self.out, self.size, self.cpu = out, size, cpu
        self.deadline = time.monotonic() + budget_s
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if cpu:
            self.env["JAX_PLATFORMS"] = "cpu"  # not CUDA_VISIBLE_DEVICES: NVML would then measure no GPU either
        self.result = {"suite": "cloudmask gpu_suite", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "mode": "cpu-small" if cpu else "gpu", "sizes": size, "steps": {}, "facts": None,
                       "data": None, "throughput": [], "epoch": None, "inference": None, "short_run": None,
                       "check_log": {}, "targets": None}
        (out / "logs").mkdir(parents=True)

    # -------------------------------------------------------------------------------------------- running
    def cloudmask(self, step: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess | None:
        """Run ``cloudmask ARGS`` as one step; None when it was skipped for lack of time. Failures are recorded."""
        return self.command(step, [sys.executable, "-m", "cloudmask", *args], timeout)

    def command(self, step: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess | None:
        left = self.deadline - time.monotonic()
        if left < 5:
            self.result["steps"][step] = {"status": "skipped", "reason": "suite time budget spent"}
            self.save()
            return None
        t0 = time.perf_counter()
        try:
            done = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=min(timeout, left))
            status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        except subprocess.TimeoutExpired as e:
            done = subprocess.CompletedProcess(argv, -9, _text(e.stdout), _text(e.stderr))
            status = f"timed out after {min(timeout, left):.0f} s"
        seconds = time.perf_counter() - t0
        (self.out / "logs" / f"{step}.log").write_text(f"$ {' '.join(argv)}\n{done.stdout}\n{done.stderr}")
        self.result["steps"][step] = {"status": status, "seconds": round(seconds, 2)}
        self.save()
        print(f"[{step}] {status} in {seconds:.1f} s", flush=True)
        return done if done.returncode == 0 else None

    def save(self) -> None:
        tmp = self.out / "suite.json.tmp"
        tmp.write_text(json.dumps(self.result, indent=2))
        tmp.replace(self.out / "suite.json")

    @property
    def failed(self) -> list[str]:
        return [k for k, v in self.result["steps"].items() if v["status"] != "ok"]

    # ------------------------------------------------------------------------------------------------ steps
    def facts(self) -> None:
        facts = {"host": socket.gethostname(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "git_revision": _git_revision(), "nvidia_smi": None, "reason": None}
        if shutil.which("nvidia-smi") is None:
            facts["reason"] = "nvidia-smi not found (no NVIDIA driver on this host)"
        else:
            query = "name,driver_version,memory.total,power.limit,clocks.max.sm,clocks.max.mem,pci.bus_id"
            done = self.command("nvidia-smi", ["nvidia-smi", f"--query-gpu={query}",
                                               "--format=csv,noheader,nounits"], 60)
            if done is not None:
                keys = query.split(",")
                facts["nvidia_smi"] = [dict(zip(keys, (v.strip() for v in line.split(","))))
                                       for line in done.stdout.strip().splitlines()]
            full = subprocess.run(["nvidia-smi", "-q"], capture_output=True, text=True, timeout=60)
            (self.out / "nvidia-smi.txt").write_text(full.stdout + full.stderr)
        self.result["facts"] = facts
        self.save()

    def data(self, work: Path) -> Path | None:
        """The raw synthetic files and the full-size store; the store's path, or None if a step failed."""
        n_train, n_test = self.size["synth"]
        raw, seed_store, store = work / "raw", work / "seed-store", work / "store"
        ok = (self.cloudmask("synth", "data", "synth", "--out", str(raw), "--train", str(n_train),
                             "--test", str(n_test))
              and self.cloudmask("prepare", "data", "prepare", str(raw), str(seed_store), "--jobs",
                                 str(min(8, os.cpu_count() or 1)))
              and self.cloudmask("replicate", "data", "replicate", str(seed_store), str(store),
                                 *_files_args(self.size["files"])))
        if not ok:
            return None
        meta = json.loads((store / "store.json").read_text())
        self.result["data"] = {"how": "synthetic files (data synth), prepared, then replicated file by file to the "
                                      "real dataset's file counts (data replicate)",
                               "raw": str(raw), "store": str(store), "counts": meta["counts"],
                               "store_gib": round(sum(f.stat().st_size for f in store.iterdir()) / 2**30, 2),
                               "seconds": {k: self.result["steps"][k]["seconds"]
                                           for k in ("synth", "prepare", "replicate")}}
        self.save()
        return store

    def throughput(self, store: Path, precision: str, batch: int) -> None:
        step = f"throughput-{precision}-b{batch}"
        done = self.cloudmask(step, "bench", "--mode", "throughput", "--json", "--store", str(store),
                              "--warmup", str(self.size["warmup"]), "--steps", str(self.size["steps"]),
                              *_sets(*self.size["sets"], "data.resident=device", f"train.precision={precision}",
                                     "train.jit_compile=true", f"train.batch_size={batch}"), timeout=300)
        if done is None:
            return
        r = json.loads(done.stdout[done.stdout.index("{"):])
        keep = ("backend", "devices", "precision", "batch_size", "input", "warmup_steps", "timed_steps",
                "train_patches_per_s", "train_epoch_s_full_dataset", "loader_patches_per_s",
                "inference_patches_per_s", "test_set_100_images_s", "forward_gflop_per_patch",
                "train_gflop_per_patch", "achieved_tflops", "device_peak_tflops", "utilisation", "peak_rss_gib")
        self.result["throughput"].append({k: r.get(k) for k in keep})
        self.save()

    def epoch(self, store: Path) -> None:
        """Full-size training with energy, then the 100 test images; also the idle baseline (telemetry)."""
        run = self.out / "runs" / "full-size"
        s = self.size
        done = self.cloudmask("full-size-run", "train", "--store", str(store), "--out", str(run),
                              *_sets(*s["sets"], "data.resident=device", "train.precision=mixed_bfloat16",
                                     "train.jit_compile=true", f"train.batch_size={s['batch']}",
                                     f"train.epochs={s['epochs']}", f"telemetry.idle_seconds={s['idle_s']}"),
                              timeout=420)
        if done is None:
            return
        r = json.loads((run / "results.json").read_text())
        gpu = (r.get("energy") or {}).get("gpu") or {}
        idle_w = _sum([d.get("idle_w") for d in gpu.get("devices", [])])
        epochs_j = gpu.get("per_epoch_j") or [None] * len(r["timing"]["epoch_s"])
        self.result["epoch"] = {
            "run": str(run), "precision": "mixed_bfloat16", "batch_size": s["batch"], "patches": r["samples"]["train"],
            "epoch_s": r["timing"]["epoch_s"], "samples_per_s": r["timing"]["samples_per_s"],
            "energy_method": gpu.get("method"), "energy_reason": gpu.get("reason"), "idle_w": idle_w,
            "energy_per_epoch_j": epochs_j,
            "energy_per_epoch_above_idle_j": [None if j is None or idle_w is None else j - idle_w * t
                                              for j, t in zip(epochs_j, r["timing"]["epoch_s"])],
            "power_csv": str(run / "power.csv") if (run / "power.csv").is_file() else None,
            "net_of_idle": "epoch energy minus the idle power (telemetry.idle_seconds before training, same "
                           "process, GPU allocated and idle) times the epoch's seconds"}
        test = r["test"]
        self.result["inference"] = {"images": test["files"], "seconds": test["inference_s"],
                                    "seconds_per_image": test["time_per_inference_s"],
                                    "patches_per_image": 63, "energy_j": gpu.get("inference_j")}
        self.save()
        self.check_log("full-size", run)

    def short_run(self, raw: Path) -> None:
        run = self.out / "runs" / "bench"
        done = self.cloudmask("bench", "bench", "--data", str(raw), "--out", str(run), *_sets(*self.size["sets"]),
                              timeout=420)
        if done is None:
            return
        r = json.loads((run / "results.json").read_text())
        test = r["test"]
        self.result["short_run"] = {"run": str(run), "epochs": r["epochs_run"], "test_accuracy": test["avg_accuracy"],
                                    "majority_baseline": test["majority_baseline"],
                                    "beats_baseline": test["avg_accuracy"] > test["majority_baseline"],
                                    "time_per_epoch_s": r["timing"]["time_per_epoch_s"]}
        self.save()
        self.check_log("bench", run)

    def check_log(self, name: str, run: Path) -> None:
        done = self.cloudmask(f"check-log-{name}", "check-log", str(run), timeout=120)
        self.result["check_log"][name] = "PASS" if done is not None else "FAIL"
        self.save()

    def targets(self) -> None:
        bf16 = [t["train_patches_per_s"] for t in self.result["throughput"] if t["precision"] == "mixed_bfloat16"]
        best = max(bf16) if bf16 else None
        test_s = (self.result["inference"] or {}).get("seconds")
        self.result["targets"] = {
            "bf16_train_patches_per_s": {"target": TARGET_PATCHES_PER_S, "measured": best,
                                         "met": best is not None and best >= TARGET_PATCHES_PER_S},
            "test_set_100_images_s": {"target": TARGET_TEST_SET_S, "measured": test_s,
                                      "met": test_s is not None and test_s < TARGET_TEST_SET_S},
            "energy_net_of_idle": {"method": (self.result["epoch"] or {}).get("energy_method"),
                                   "met": bool((self.result["epoch"] or {}).get("energy_per_epoch_above_idle_j"))
                                   and None not in self.result["epoch"]["energy_per_epoch_above_idle_j"]}}
        self.result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.result["failed_steps"] = self.failed
        self.save()


def _sets(*pairs: str) -> list[str]:
    return [a for kv in pairs for a in ("--set", kv)]


def _files_args(files: tuple[int, int, int]) -> list[str]:
    return ["--train-files", str(files[0]), "--val-files", str(files[1]), "--test-files", str(files[2])]


def _sum(values: list):
    return None if not values or any(v is None for v in values) else float(sum(values))


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def _git_revision() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent)
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def work_dir(cpu: bool, out: Path, store_gib: float) -> Path:
    """Where the data goes: RAM-backed /dev/shm on the GPU machine when it has room, else beside DIR."""
    shm = Path("/dev/shm")
    if not cpu and shm.is_dir() and shutil.disk_usage(shm).free > 1.3 * store_gib * 2**30:
        return Path(tempfile.mkdtemp(prefix="cloudmask-suite-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="cloudmask-suite-", dir=out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="new output directory (suite.json, logs/, runs/)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is visible")
    p.add_argument("--small", action="store_true", help="toy sizes (a tiny model, a few files): minutes on 2 cores")
    p.add_argument("--budget-s", type=float, help="skip steps that would start after this many seconds "
                                                  "(default 480 full size, 1200 small)")
    p.add_argument("--keep-data", action="store_true", help="keep the synthetic files and stores")
    args = p.parse_args(argv)
    if args.out.exists():
        p.error(f"{args.out} already exists; choose a new output directory")
    size = SMALL if args.small else FULL
    suite = Suite(args.out, size, args.cpu, args.budget_s or size["budget_s"])
    work = work_dir(args.cpu, args.out, store_gib=27 if not args.small else 0)
    suite.result["work_dir"] = str(work)
    try:
        suite.facts()
        store = suite.data(work)
        if store is not None:
            runs = [(p, b) for b in size["batches"] for p in PRECISIONS]
            suite.throughput(store, *runs[0])  # the headline figure first, then the run, then the rest
            suite.epoch(store)
            suite.short_run(work / "raw")
            for precision, batch in runs[1:]:
                suite.throughput(store, precision, batch)
        suite.targets()
    finally:
        if not args.keep_data:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: suite.result[k] for k in ("targets", "failed_steps")}, indent=2))
    return 1 if suite.failed else 0


if __name__ == "__main__":
    sys.exit(main())
