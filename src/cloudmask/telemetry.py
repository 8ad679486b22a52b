"""Telemetry of a run: GPU energy (NVML), CPU energy (RAPL), named phase timers, and the provenance manifest.

Energy is read per *window* (init, each epoch, each validation, inference, the whole run):

* GPU, ``counter``: NVML's total-energy counter (Volta and newer), read at both edges of a window;
* GPU, ``sampled``: where the counter is missing, power sampled by a background thread at a fixed interval
  (default 100 ms, drift-free schedule) and integrated (trapezoids, interpolated at the window edges);
* CPU, ``rapl``: the powercap package counters (``/sys/class/powercap/intel-rapl:N/energy_uj``), wrap-corrected;
* ``none``, with the reason, when no such device or permission exists: the run carries on.

Only the GPUs of this job are measured: ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs), else SLURM's
``SLURM_STEP_GPUS``/``SLURM_JOB_GPUS``, else every GPU. An idle baseline (``telemetry.idle_seconds`` before
training) gives idle watts, and each window also reports energy above idle.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, fileio

# ================================================================================================ timers


@dataclass
class TimerRecord:
    name: str  # unique path, e.g. "run/train/epoch 3"
    depth: int
    start: float  # seconds since the timers were created
    seconds: float | None = None
    attempt: int = 1


class Timers:
    """Named, nested phases on the monotonic clock. Names are made unique by their path and a #n suffix."""

    def __init__(self, attempt: int = 1):
        self._t0 = time.perf_counter()
        self._open: list[TimerRecord] = []
        self.records: list[TimerRecord] = []
        self.attempt = attempt

    def start(self, name: str) -> TimerRecord:
        path = f"{self._open[-1].name}/{name}" if self._open else name
        taken = {r.name for r in self.records}
        unique, n = path, 2
        while unique in taken:
            unique, n = f"{path}#{n}", n + 1
        record = TimerRecord(unique, len(self._open), time.perf_counter() - self._t0, attempt=self.attempt)
        self.records.append(record)
        self._open.append(record)
        return record

    def stop(self, record: TimerRecord | None = None) -> float:
        """Stop ``record`` (default: the innermost open phase) and any phase opened inside it."""
        record = record or self._open[-1]
        now = time.perf_counter() - self._t0
        while self._open:
            inner = self._open.pop()
            inner.seconds = now - inner.start
            if inner is record:
                break
        return record.seconds or 0.0

    @contextmanager
    def phase(self, name: str):
        record = self.start(name)
        try:
            yield record
        finally:
            if record.seconds is None:
                self.stop(record)

    def close(self) -> None:
        while self._open:
            self.stop()

    def seconds(self, name: str) -> float | None:
        return next((r.seconds for r in self.records if r.name == name), None)

    # -- output ---------------------------------------------------------------------------------------------
    CSV_FIELDS = ["attempt", "name", "depth", "start_s", "seconds"]

    def rows(self) -> list[dict]:
        return [{"attempt": r.attempt, "name": r.name, "depth": r.depth, "start_s": round(r.start, 6),
                 "seconds": None if r.seconds is None else round(r.seconds, 6)} for r in self.records]

    def csv_lines(self) -> list[str]:
        """Greppable lines for console logs: ``grep '^# csv,timer' console.log``."""
        head = "# csv,timer," + ",".join(self.CSV_FIELDS)
        return [head] + [f"# csv,timer,{r['attempt']},{r['name']},{r['depth']},{r['start_s']},{r['seconds']}"
                         for r in self.rows()]

    def table(self) -> str:
        from .tables import text_table

        total = next((r.seconds for r in self.records if r.depth == 0 and r.seconds), None)
        rows = []
        for r in self.records:
            share = f"{100 * r.seconds / total:.1f} %" if total and r.seconds is not None else "-"
            rows.append(["  " * r.depth + r.name.rsplit("/", 1)[-1], r.seconds, share, round(r.start, 3)])
        return text_table(["phase", "seconds", "of run", "start s"], rows, title="timers")

    def write_csv(self, path: Path, previous: list[dict] | None = None) -> None:
        """timers.csv with the rows of earlier attempts (a resumed run) kept before this attempt's."""
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows([r for r in (previous or []) if int(r["attempt"]) != self.attempt] + self.rows())
        fileio.write_text(path, buf.getvalue())


def read_timers_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ================================================================================================ energy


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


# ----------------------------------------------------------------------------------------------- meter


@dataclass
class Window:
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
        self.windows: list[Window] = []
        self._open: dict[str, Window] = {}
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
        self._open[name] = Window(name, time.perf_counter(), self._read())

    def end(self, name: str) -> Window:
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

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

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


def _sum(values: list) -> float | None:
    return None if not values or any(v is None for v in values) else float(sum(values))


# ============================================================================================== manifest


def _package_versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("tensorflow", "tensorflow-cpu", "keras", "jax", "jaxlib", "torch", "numpy", "h5py",
                 "mlperf-logging", "nvidia-ml-py", "psutil", "pyyaml", "protobuf"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _git_revision() -> dict:
    source = Path(__file__).resolve().parent
    if os.environ.get("CLOUDMASK_GIT_REVISION"):  # baked into container images at build time
        return {"revision": os.environ["CLOUDMASK_GIT_REVISION"], "dirty": None, "source": "image"}
    try:
        rev = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return {"revision": None, "dirty": None, "source": "no git checkout"}
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip()), "source": "checkout"}
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None, "source": "git not available"}


def container_context(environ=os.environ) -> dict:
    if environ.get("APPTAINER_CONTAINER") or environ.get("SINGULARITY_CONTAINER"):
        runtime = "apptainer" if environ.get("APPTAINER_CONTAINER") else "singularity"
        image = environ.get("APPTAINER_CONTAINER") or environ.get("SINGULARITY_CONTAINER")
    elif Path("/run/.containerenv").exists():
        runtime, image = "podman", _containerenv_image()
    elif Path("/.dockerenv").exists():
        runtime, image = "docker", None
    else:
        runtime, image = "none", None
    return {"runtime": runtime, "image": image, "image_label": environ.get("CLOUDMASK_IMAGE")}


def _containerenv_image() -> str | None:
    try:
        for line in Path("/run/.containerenv").read_text().splitlines():
            if line.startswith("image="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return None


SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
              "SLURM_JOB_NAME", "SLURM_JOB_PARTITION", "SLURM_JOB_ACCOUNT", "SLURM_CLUSTER_NAME", "SLURM_JOB_NODELIST",
              "SLURM_NNODES", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_CPUS_PER_TASK", "SLURM_MEM_PER_NODE",
              "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_RESTART_COUNT", "SLURMD_NODENAME")


def host_context() -> dict:
    import psutil

    from .runtime import cpu_model

    return {"hostname": socket.gethostname(), "os": platform.platform(), "kernel": platform.release(),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 2)}


def gpu_context(nvml=None) -> dict:
    """GPUs of this job as NVML reports them (names, UUIDs, driver, memory), or why there are none."""
    try:
        nv = nvml or _load_nvml()
    except ImportError:
        return {"available": False, "reason": "pynvml not installed", "devices": []}
    try:
        nv.nvmlInit()
    except nv.NVMLError as e:
        return {"available": False, "reason": _text(e), "devices": []}
    try:
        gpus = NvmlGpus(nvml=nv)
        gpus._select(nv)
        devices = []
        for info, h in zip(gpus.info, gpus.handles):
            devices.append({**info, "memory_gib": round(nv.nvmlDeviceGetMemoryInfo(h).total / 2**30, 2)})
        return {"available": True, "driver": _text(nv.nvmlSystemGetDriverVersion()),
                "cuda_driver": nv.nvmlSystemGetCudaDriverVersion(), "devices": devices}
    except nv.NVMLError as e:
        return {"available": False, "reason": _text(e), "devices": []}
    finally:
        nv.nvmlShutdown()


def framework_context() -> dict:
    out = {"keras_backend": None, "build": {}}
    try:
        import keras

        out["keras_backend"] = keras.backend.backend()
        if out["keras_backend"] == "tensorflow":
            import tensorflow as tf

            info = tf.sysconfig.get_build_info()
            out["build"] = {k: info.get(k) for k in ("cuda_version", "cudnn_version", "is_cuda_build")}
    except ImportError:
        pass
    return out


def collect_manifest(cfg, dataset_root: Path | None, dataset_digest: str | None, started: float,
                     nvml=None) -> dict:
    """Provenance of a run: code, environment, hardware, scheduler, inputs."""
    return {
        "schema_version": 1,
        "cloudmask_version": __version__,
        "git": _git_revision(),
        "command": sys.argv,
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "packages": _package_versions(),
        "framework": framework_context(),
        "container": container_context(),
        "host": host_context(),
        "gpus": gpu_context(nvml),
        "slurm": {k: os.environ[k] for k in SLURM_VARS if k in os.environ},
        "environment": {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "KERAS_BACKEND", "TF_DETERMINISTIC_OPS",
                                                   "XLA_FLAGS", "OMP_NUM_THREADS") if k in os.environ},
        "seed": cfg.seed,
        "config_sha256": cfg.sha256(),
        "dataset": {"root": str(dataset_root) if dataset_root else None, "manifest_sha256": dataset_digest},
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "end_time": None,
    }


def finish_manifest(manifest: dict) -> dict:
    manifest["end_time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return manifest



# ============================================================================================ run telemetry


class RunTelemetry:
    """Timers, energy meter and manifest of one attempt of a run, written into its run directory.

    A resumed run is several attempts (several processes, maybe on different nodes): ``timers.csv`` keeps
    every attempt's rows, ``manifest.json`` keeps earlier attempts under ``previous_attempts``, and the energy
    totals add the earlier attempts' (carried in state.json).
    """

    def __init__(self, cfg, run_path: Path, attempt: int, environ=os.environ, nvml=None, powercap: Path = POWERCAP):
        self.cfg = cfg
        self.path = Path(run_path)
        self.attempt = attempt
        self.timers = Timers(attempt)
        power_csv = self.path / "power.csv" if cfg.telemetry.power_csv else None
        self.meter = EnergyMeter([NvmlGpus(environ, nvml), RaplPackages(powercap)], cfg.telemetry.interval_s,
                                 power_csv)
        self._nvml = nvml
        self._run_timer: TimerRecord | None = None
        self.manifest: dict | None = None
        self._started = time.time()

    def start(self) -> "RunTelemetry":
        self.meter.start()
        self.meter.begin("run")
        self._run_timer = self.timers.start("run")
        return self

    def write_manifest(self, dataset_root: Path | None, dataset_digest: str | None, files: dict) -> None:
        manifest = collect_manifest(self.cfg, dataset_root, dataset_digest, self._started, self._nvml)
        manifest["dataset"].update(files)
        manifest["energy_methods"] = {s.kind: {"method": s.method, "reason": s.reason} for s in self.meter.sources}
        previous = self.path / "manifest.json"
        if previous.is_file():
            try:
                old = json.loads(previous.read_text())
                manifest["previous_attempts"] = old.pop("previous_attempts", []) + [old]
            except (OSError, ValueError):
                manifest["previous_attempts"] = []
        manifest["attempt"] = self.attempt
        self.manifest = manifest
        fileio.write_json(previous, manifest)

    def finish(self, log) -> dict:
        """Close every window and timer, stop sampling, write timers.csv and manifest.json; return energy."""
        if "run" in self.meter._open:
            self.meter.end("run")
        self.meter.stop()
        self.timers.close()
        timers_csv = self.path / "timers.csv"
        self.timers.write_csv(timers_csv, read_timers_csv(timers_csv))
        log.info("\n%s", self.timers.table())
        for line in self.timers.csv_lines():
            log.info(line)
        if self.manifest is not None:
            fileio.write_json(self.path / "manifest.json", finish_manifest(self.manifest))
        return self.meter.summary()


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
