"""A fake ``pynvml`` for whole processes (CLI runs, scripts/measure/gpu_suite.py): put tests/fake_gpu and tests first on
PYTHONPATH. One "NVIDIA H200" with an energy counter, whose power rises from 100 W by 2 W per second since the
process imported this module, so work done after an idle baseline measures above it."""

import time

from fake_nvml import FakeGpu, FakeNvml, ramp

_nvml = FakeNvml([FakeGpu("NVIDIA H200", "GPU-fake-h200", *ramp(100.0, 2.0, time.perf_counter()))])


def __getattr__(name):
    return getattr(_nvml, name)
