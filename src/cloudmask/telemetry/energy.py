"""Energy of a run: GPU energy (NVML), CPU energy (RAPL), measured per named *window*.

* GPU, ``counter``: NVML's total-energy counter (Volta and newer), read at both edges of a window;
* GPU, ``sampled``: where the counter is missing, power sampled by a background thread at a fixed interval
  (default 100 ms, drift-free schedule) and integrated (trapezoids, interpolated at the window edges);
* CPU, ``rapl``: the powercap package counters (``/sys/class/powercap/intel-rapl:N/energy_uj``), wrap-corrected;
* ``none``, with the reason, when no such device or permission exists: the run carries on.

Only the GPUs of this job are measured: ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs), else SLURM's
``SLURM_STEP_GPUS``/``SLURM_JOB_GPUS``, else every GPU. An idle baseline (``telemetry.idle_seconds`` before
training) gives idle watts, and each window also reports energy above idle. (Why this and not Zeus:
docs/telemetry.md.)
"""

from __future__ import annotations

import csv
import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .energy_sources import POWERCAP, EnergySource, NvmlGpus, RaplPackages

# ----------------------------------------------------------------------------------------------- meter


@dataclass
class EnergyWindow:
    name: str
    start_t: float
    start_j: dict[str, list[float]]
    seconds: float | None = None
    joules: dict[str, list[float]] = field(default_factory=dict)


class EnergyMeter:
    """Polls its sources on a fixed schedule in a background thread and measures named windows."""

    POWER_FIELDS = ["time", "gpu", "power_w", "utilization_pct", "memory_used_mib", "temperature_c", "sm_clock_mhz"]

    def __init__(self, sources: list[EnergySource], interval_s: float = 0.1, power_csv: Path | None = None):
        self.sources = sources
        self.interval_s = interval_s
        self.power_csv = power_csv
        self.windows: list[EnergyWindow] = []
        self._open: dict[str, EnergyWindow] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.idle_w: dict[str, list[float]] = {}
        self.samples_taken = 0
        self._csv = None

    @classmethod
    def for_config(cls, cfg, power_csv: Path | None, environ=os.environ, nvml=None,
                   powercap: Path = POWERCAP) -> "EnergyMeter":
        return cls([NvmlGpus(environ, nvml), RaplPackages(powercap)], cfg.telemetry.interval_s, power_csv)

    def source(self, kind: str) -> EnergySource:
        return next(s for s in self.sources if s.kind == kind)

    @property
    def active(self) -> list[EnergySource]:
        return [s for s in self.sources if s.method != "none"]

    def start(self) -> "EnergyMeter":
        for s in self.sources:
            s.start()
        gpus = self.source("gpu") if any(s.kind == "gpu" for s in self.sources) else None
        if self.power_csv is not None and gpus is not None and gpus.method != "none":
            self._csv = open(self.power_csv, "a", newline="")
            if self._csv.tell() == 0:
                csv.writer(self._csv).writerow(self.POWER_FIELDS)
        if self.active:
            self._thread = threading.Thread(target=self._loop, name="cloudmask-energy", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        # Drift-free schedule: the n-th sample is due at start + n * interval, however long sampling takes.
        start = time.perf_counter()
        n = 0
        while not self._stop.is_set():
            n += 1
            delay = start + n * self.interval_s - time.perf_counter()
            if delay > 0 and self._stop.wait(delay):
                break
            t = time.perf_counter()
            for s in self.active:
                s.sample(t)
            self.samples_taken += 1
            self._flush_rows()

    def _flush_rows(self) -> None:
        gpus = next((s for s in self.sources if isinstance(s, NvmlGpus)), None)
        if gpus is None or not gpus.rows:
            return
        rows, gpus.rows = gpus.rows, []
        if self._csv is not None:
            csv.writer(self._csv).writerows(rows)
            self._csv.flush()

    def _read(self) -> dict[str, list[float]]:
        return {s.kind: s.joules() for s in self.active}

    def begin(self, name: str) -> None:
        self._open[name] = EnergyWindow(name, time.perf_counter(), self._read())

    def end(self, name: str) -> EnergyWindow:
        w = self._open.pop(name)
        now = self._read()
        w.seconds = time.perf_counter() - w.start_t
        w.joules = {k: [b - a for a, b in zip(w.start_j.get(k, []), v)] for k, v in now.items()}
        self.windows.append(w)
        return w

    @contextmanager
    def window(self, name: str):
        self.begin(name)
        try:
            yield
        finally:
            self.end(name)

    def measure_idle(self, seconds: float) -> None:
        """Idle baseline: the average power of each device over ``seconds`` of doing nothing."""
        if seconds <= 0 or not self.active:
            return
        with self.window("idle"):
            time.sleep(seconds)
        w = self.windows[-1]
        self.idle_w = {k: [j / w.seconds for j in v] for k, v in w.joules.items()}

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10 * self.interval_s + 5)
        self._flush_rows()
        if self._csv is not None:
            self._csv.close()
            self._csv = None
        for s in self.sources:
            s.stop()

    # -- results ----------------------------------------------------------------------------------------------
    def summary(self, epoch_prefix: str = "epoch ", validation_prefix: str = "validation ") -> dict:
        """The ``energy`` section of results.json."""
        out = {}
        for s in self.sources:
            devices = []
            section = {"method": s.method, "reason": s.reason,
                       "interval_s": self.interval_s if s.method == "sampled" else None, "devices": devices}
            if s.method != "none":
                idle = self.idle_w.get(s.kind)
                for i, info in enumerate(s.describe()):
                    def windows(prefix, i=i):
                        return [w.joules[s.kind][i] for w in self.windows
                                if w.name.startswith(prefix) and s.kind in w.joules]

                    def one(name, i=i):
                        return next((w.joules[s.kind][i] for w in self.windows
                                     if w.name == name and s.kind in w.joules), None)

                    run_w = next((w for w in self.windows if w.name == "run"), None)
                    total = one("run")
                    dev = {**info, "total_j": total,
                           "idle_w": idle[i] if idle else None,
                           "above_idle_j": (total - idle[i] * run_w.seconds) if idle and total is not None else None,
                           "init_j": one("init"), "per_epoch_j": windows(epoch_prefix),
                           "validation_j": windows(validation_prefix), "inference_j": one("inference")}
                    devices.append(dev)
                section["total_j"] = _sum([d["total_j"] for d in devices])
                section["above_idle_j"] = _sum([d["above_idle_j"] for d in devices])
                section["per_epoch_j"] = [sum(x) for x in zip(*[d["per_epoch_j"] for d in devices])]
                section["inference_j"] = _sum([d["inference_j"] for d in devices])
                section["samples"] = self.samples_taken
            out[s.kind] = section
        return out

    def epoch_joules(self, name: str, kind: str = "gpu") -> float | None:
        w = next((w for w in reversed(self.windows) if w.name == name), None)
        if w is None or kind not in w.joules:
            return None
        return sum(w.joules[kind])

    def joules_above_idle(self, name: str, kind: str = "gpu") -> float | None:
        """Window ``name``'s energy minus the idle power over the window's own seconds (None without a baseline)."""
        w = next((w for w in reversed(self.windows) if w.name == name), None)
        idle = self.idle_w.get(kind)
        if w is None or kind not in w.joules or not idle:
            return None
        return sum(w.joules[kind]) - sum(idle) * w.seconds


def _sum(values: list) -> float | None:
    return None if not values or any(v is None for v in values) else float(sum(values))


# -------------------------------------------------------------------------------- attempts and workers


def merge_energy(current: dict, earlier: list[dict], history: list[dict], per_epoch_from_history: bool = True) -> dict:
    """results.json ``energy``: this attempt's detail, totals over all attempts, per-epoch GPU and CPU energy
    from history.csv (which spans every attempt; it holds the chief's node only, so a multi-worker run keeps
    the per-epoch sums over every node of this attempt instead)."""
    out = json.loads(json.dumps(current))
    for kind, column in (("gpu", "energy_j"), ("cpu", "cpu_energy_j")):
        section = out.get(kind)
        if not section or section["method"] == "none":
            continue
        for key in ("total_j", "above_idle_j"):
            values = [section.get(key)] + [e.get(kind, {}).get(key) for e in earlier]
            section[key] = None if any(v is None for v in values) else float(sum(values))
        if per_epoch_from_history:
            section["per_epoch_j"] = [row.get(column) for row in history]
        section["attempts"] = 1 + len(earlier)
    return out


def combine_energy(sections: list[dict | None]) -> dict | None:
    """One results.json ``energy`` section from every worker's: devices of every node, a device measured by two
    workers of one node (same host, kind and identity) counted once, totals and per-epoch sums over them."""
    sections = [s for s in sections if s]
    if not sections:
        return None
    out: dict = {"workers": len(sections)}
    for kind in ("gpu", "cpu"):
        parts = [(s["host"], s.get(kind)) for s in sections if s.get(kind)]
        measured = [(host, p) for host, p in parts if p["method"] != "none"]
        if not measured:
            out[kind] = parts[0][1] if parts else None
            continue
        seen, devices = set(), []
        for host, p in measured:
            for dev in p["devices"]:
                key = (host, json.dumps({k: v for k, v in dev.items() if k in ("uuid", "index", "zone", "label",
                                                                               "name", "pci_bus_id")},
                                        sort_keys=True))
                if key not in seen:
                    seen.add(key)
                    devices.append({"host": host, **dev})
        section = {"method": measured[0][1]["method"], "reason": measured[0][1].get("reason"),
                   "methods": sorted({p["method"] for _, p in measured}), "nodes": len({h for h, _ in measured}),
                   "devices": devices}
        for key in ("total_j", "above_idle_j", "inference_j"):
            values = [d.get(key) for d in devices]
            section[key] = None if any(v is None for v in values) else float(sum(values))
        epochs = [d.get("per_epoch_j") or [] for d in devices]
        section["per_epoch_j"] = [float(sum(x)) for x in zip(*epochs)] if epochs else []
        out[kind] = section
    return out
