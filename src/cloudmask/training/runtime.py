"""Process-wide setup that must happen before or right after Keras starts: backend, seeds, determinism,
precision, and what accelerators the backend sees (how a run spreads over them: distribution.py)."""

from __future__ import annotations

import os
import platform
import random
from pathlib import Path

import numpy as np


def quiet_tensorflow() -> None:
    # oneDNN/absl info lines would otherwise fill every console log; warnings and errors still show
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def backend() -> str:
    import keras

    return keras.backend.backend()


def seed_everything(seed: int, deterministic: bool) -> None:
    """One seed for Python, NumPy and the Keras backend; optional op determinism (TensorFlow backend)."""
    import keras

    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    if deterministic and backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def set_precision(precision: str) -> None:
    """Keras dtype policy for layers built from now on: fp32 -> float32, else the named mixed policy."""
    import keras

    keras.mixed_precision.set_global_policy("float32" if precision == "fp32" else precision)


def accelerators() -> list[str]:
    """Names of the GPUs the Keras backend will use (empty on CPU)."""
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        out = []
        for gpu in gpus:
            try:
                out.append(tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name))
            except Exception:  # details are best effort; the count is what matters
                out.append(gpu.name)
        return out
    if name == "jax":
        import jax

        return [d.device_kind for d in jax.devices() if d.platform == "gpu"]
    return []  # the model is written for TensorFlow and JAX only


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_threads(setting) -> int:
    """``data.read_threads``: ``auto`` is the CPUs this process may run on (a SLURM job's allocation sets the
    affinity; SLURM_CPUS_PER_TASK where it does not), at most 16; a number is taken as it is."""
    if setting != "auto":
        return int(setting)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit():
        cpus = min(cpus, int(per_task))
    return max(1, min(16, cpus))
