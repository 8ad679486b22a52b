"""A stand-in for the ``pynvml`` module (the narrowest boundary to the NVIDIA driver, which CI machines lack).

Each fake GPU has a known power curve P(t) in watts over ``time.perf_counter()`` and, when it "has a
counter", the exact energy E(t) = integral of P, so tests can check measured joules against the truth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


@dataclass
class FakeGpu:
    name: str
    uuid: str
    power: Callable[[float], float]                     # watts at perf_counter time t
    energy: Callable[[float], float] | None = None      # joules since t=0; None: no energy counter
    memory_total: int = 80 * 2**30
    calls: list = field(default_factory=list)


def constant(watts: float) -> tuple[Callable, Callable]:
    return (lambda t: watts), (lambda t: watts * t)


def ramp(w0: float, slope: float, t0: float) -> tuple[Callable, Callable]:
    """P(t) = w0 + slope * (t - t0) for t >= t0; E is its exact integral from t0."""
    return (lambda t: w0 + slope * max(t - t0, 0.0)), (lambda t: w0 * (t - t0) + slope * (t - t0) ** 2 / 2)


class FakeNvml:
    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    def __init__(self, gpus: list[FakeGpu], library: bool = True):
        self.gpus = gpus
        self.library = library
        self.initialised = 0
        self.power_reads = 0

    # -- lifecycle ------------------------------------------------------------------------------------------
    def nvmlInit(self):
        if not self.library:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")
        self.initialised += 1

    def nvmlShutdown(self):
        self.initialised -= 1

    # -- devices --------------------------------------------------------------------------------------------
    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.gpus[i]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        for g in self.gpus:
            if g.uuid == uuid:
                return g
        raise NVMLError("Not Found")

    def nvmlDeviceGetName(self, h):
        return h.name.encode()

    def nvmlDeviceGetUUID(self, h):
        return h.uuid

    def nvmlSystemGetDriverVersion(self):
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self):
        return 12040

    # -- readings -------------------------------------------------------------------------------------------
    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if h.energy is None:
            raise NVMLError_NotSupported("Not Supported")
        return int(h.energy(time.perf_counter()) * 1000)  # mJ, integer like the driver

    def nvmlDeviceGetPowerUsage(self, h):
        self.power_reads += 1
        return int(h.power(time.perf_counter()) * 1000)  # mW

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=87, memory=40)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=12 * 2**30, total=h.memory_total, free=h.memory_total - 12 * 2**30)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 55

    def nvmlDeviceGetClockInfo(self, h, clock):
        return 1755


def two_gpus(counter: bool = True) -> FakeNvml:
    p0, e0 = constant(250.0)
    p1, e1 = constant(100.0)
    return FakeNvml([FakeGpu("NVIDIA H100 80GB HBM3", "GPU-aaaa", p0, e0 if counter else None),
                     FakeGpu("NVIDIA H100 80GB HBM3", "GPU-bbbb", p1, e1 if counter else None)])
