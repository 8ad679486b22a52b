"""What energy can be read from: the job's NVIDIA GPUs (NVML) and the CPU packages (RAPL powercap counters).

Each source reports cumulative joules per device since ``start()``; the meter (energy.py) reads them at the
edges of its windows. A source that cannot measure says why (``method = "none"``, ``reason``).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


class EnergySource:
    """A set of devices whose cumulative energy since ``start()`` can be read at any time."""

    kind = "?"
    method = "none"
    reason: str | None = None
    labels: list[str] = []

    def start(self) -> None: ...

    def joules(self) -> list[float]:
        return []

    def sample(self, t: float) -> None:
        """Called by the sampler thread every interval."""

    def stop(self) -> None: ...

    def describe(self) -> list[dict]:
        return [{"label": label} for label in self.labels]


# -------------------------------------------------------------------------------------------------- GPU


def _load_nvml():
    import pynvml

    return pynvml


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def job_gpu_selection(environ=os.environ) -> tuple[list[str] | None, str]:
    """The GPUs this job may use, as NVML indices or UUIDs (None = all), and where that came from."""
    for var in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        value = environ.get(var)
        if value is not None:
            items = [v.strip() for v in value.split(",") if v.strip()]
            if var == "CUDA_VISIBLE_DEVICES" and (not items or items[0] in ("-1", "NoDevFiles")):
                return [], var
            return items, var
    return None, "all"


class NvmlGpus(EnergySource):
    kind = "gpu"

    def __init__(self, environ=os.environ, nvml=None):
        self._environ = environ
        self._nvml = nvml
        self.handles: list = []
        self.info: list[dict] = []
        self.labels = []
        self._counter_start: list[float] = []
        self._lock = threading.Lock()
        self._samples: list[tuple[float, list[float]]] = []  # (monotonic t, watts per GPU)
        self.rows: list[list] = []  # power.csv rows waiting to be written

    def start(self) -> None:
        try:
            nv = self._nvml or _load_nvml()
        except ImportError:
            self.reason = "pynvml (nvidia-ml-py) is not installed"
            return
        self._nvml = nv
        try:
            nv.nvmlInit()
        except nv.NVMLError as e:
            self.reason = f"NVML unavailable: {_text(e)} (no NVIDIA driver on this host)"
            self._nvml = None
            return
        try:
            self._select(nv)
        except nv.NVMLError as e:
            self.reason = f"NVML error while listing GPUs: {_text(e)}"
            self.handles = []
        if not self.handles:
            self.reason = self.reason or "no GPU visible to this job"
            nv.nvmlShutdown()
            self._nvml = None
            return
        try:
            self._counter_start = [nv.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0 for h in self.handles]
            self.method = "counter"
        except nv.NVMLError:  # pre-Volta GPUs and some vGPUs: no energy counter
            self.method = "sampled"
        self.sample(time.perf_counter())

    def _select(self, nv) -> None:
        selection, source = job_gpu_selection(self._environ)
        count = nv.nvmlDeviceGetCount()
        if selection is None:
            wanted = [str(i) for i in range(count)]
        else:
            wanted = selection
        for item in wanted:
            if item.startswith(("GPU-", "MIG-")):
                handle = nv.nvmlDeviceGetHandleByUUID(item)
            elif item.isdigit() and int(item) < count:
                handle = nv.nvmlDeviceGetHandleByIndex(int(item))
            else:
                continue
            self.handles.append(handle)
            self.info.append({"index": item, "name": _text(nv.nvmlDeviceGetName(handle)),
                              "uuid": _text(nv.nvmlDeviceGetUUID(handle)), "selected_by": source})
        self.labels = [f"gpu{i['index']}" for i in self.info]

    def sample(self, t: float) -> None:
        nv = self._nvml
        if nv is None:
            return
        watts, wall = [], time.time()
        for i, h in enumerate(self.handles):
            try:
                w = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
                util = nv.nvmlDeviceGetUtilizationRates(h).gpu
                mem = nv.nvmlDeviceGetMemoryInfo(h).used / 2**20
                temp = nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)
                clock = nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)
            except nv.NVMLError:
                w = util = mem = temp = clock = None
            watts.append(w if w is not None else (self._samples[-1][1][i] if self._samples else 0.0))
            self.rows.append([round(wall, 3), self.info[i]["index"], w, util, None if mem is None else round(mem, 1),
                              temp, clock])
        with self._lock:
            self._samples.append((t, watts))

    def joules(self) -> list[float]:
        nv = self._nvml
        if nv is None:
            return []
        if self.method == "counter":
            return [nv.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0 - c0
                    for h, c0 in zip(self.handles, self._counter_start)]
        return self.integrated(time.perf_counter())

    def integrated(self, until: float) -> list[float]:
        """Trapezoid integral of the sampled power from the first sample to ``until`` (extrapolated flat)."""
        with self._lock:
            samples = list(self._samples)
        if not samples:
            return [0.0] * len(self.handles)
        total = [0.0] * len(samples[0][1])
        for (t0, p0), (t1, p1) in zip(samples, samples[1:]):
            if t1 > until:
                t1 = until
                p1 = [a + (b - a) * (until - t0) / ((t1 - t0) or 1) for a, b in zip(p0, p1)]
            if t1 <= t0:
                break
            for g in range(len(total)):
                total[g] += (p0[g] + p1[g]) / 2 * (t1 - t0)
        t_last, p_last = samples[-1]
        if until > t_last:
            for g in range(len(total)):
                total[g] += p_last[g] * (until - t_last)
        return total

    def stop(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
            self._nvml = None

    def describe(self) -> list[dict]:
        return self.info


# -------------------------------------------------------------------------------------------------- CPU

POWERCAP = Path("/sys/class/powercap")


class RaplPackages(EnergySource):
    """CPU package energy from the powercap RAPL counters (cumulative µJ that wrap at max_energy_range_uj)."""

    kind = "cpu"

    def __init__(self, root: Path = POWERCAP):
        self.root = Path(root)
        self.zones: list[Path] = []
        self._last: list[int] = []
        self._range: list[int] = []
        self._acc: list[int] = []
        self._lock = threading.Lock()
        self.labels = []

    def start(self) -> None:
        zones = sorted(p for p in self.root.glob("intel-rapl:*") if p.name.count(":") == 1) \
            if self.root.is_dir() else []
        if not zones:
            self.reason = f"no RAPL package zones under {self.root}"
            return
        try:
            self._last = [int((z / "energy_uj").read_text()) for z in zones]
            self._range = [int((z / "max_energy_range_uj").read_text()) for z in zones]
        except PermissionError:
            self.reason = f"{zones[0] / 'energy_uj'} is not readable by this user (root only on most systems)"
            return
        except (OSError, ValueError) as e:
            self.reason = f"cannot read RAPL counters: {e}"
            return
        self.zones = zones
        self._acc = [0] * len(zones)
        self.labels = [_zone_name(z) for z in zones]
        self.method = "rapl"

    def _update(self) -> None:
        with self._lock:
            for i, z in enumerate(self.zones):
                now = int((z / "energy_uj").read_text())
                delta = now - self._last[i]
                if delta < 0:  # the counter wrapped
                    delta += self._range[i]
                self._acc[i] += delta
                self._last[i] = now

    def sample(self, t: float) -> None:
        if self.zones:
            self._update()

    def joules(self) -> list[float]:
        if not self.zones:
            return []
        self._update()
        return [a / 1e6 for a in self._acc]

    def describe(self) -> list[dict]:
        return [{"zone": z.name, "name": label} for z, label in zip(self.zones, self.labels)]


def _zone_name(zone: Path) -> str:
    try:
        return (zone / "name").read_text().strip()
    except OSError:
        return zone.name
