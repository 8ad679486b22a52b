"""Process-wide setup that must happen before or right after Keras starts: backend, seeds, determinism, and what
accelerators the backend sees."""

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


def distribution(cfg, cluster=None):
    """(context manager to build and compile the model in, number of replicas, strategy name or None).

    ``cluster`` (distributed.Cluster, for distribute.strategy=multi_worker): its MultiWorkerMirroredStrategy,
    over every worker's devices. Otherwise one-node data parallelism:

    TensorFlow: MirroredStrategy over the visible GPUs (or ``distribute.cpu_devices`` logical CPUs), the global
    batch split evenly over the replicas and gradients all-reduced. JAX: keras.distribution.DataParallel over
    the GPUs. Must run before the framework creates its devices (first thing in a run)."""
    import contextlib

    if cluster is not None:
        return cluster.strategy.scope(), cluster.replicas, "multi_worker"
    mode, cpus = cfg.distribute.strategy, cfg.distribute.cpu_devices
    name = backend()
    if mode == "none" or name not in ("tensorflow", "jax"):
        return contextlib.nullcontext(), 1, None
    if name == "tensorflow":
        import tensorflow as tf

        if cpus:
            cpu = tf.config.list_physical_devices("CPU")[0]
            try:
                tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpus)
            except RuntimeError:
                pass  # already initialised: fine if an earlier run of this process made the same split
            devices = [d.name for d in tf.config.list_logical_devices("CPU")][:cpus]
            if len(devices) < cpus:
                from .errors import ConfigError

                raise ConfigError(f"distribute.cpu_devices={cpus}: TensorFlow's devices were already created in "
                                  "this process", "run it as its own `cloudmask train` process")
        else:
            devices = [d.name for d in tf.config.list_logical_devices("GPU")]
        if mode == "auto" and (len(devices) < 2 or _accumulating(cfg, len(devices))):
            return contextlib.nullcontext(), 1, None
        strategy = tf.distribute.MirroredStrategy(devices or None)
        return strategy.scope(), strategy.num_replicas_in_sync, "mirrored"
    import jax
    import keras

    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if len(gpus) < 2 or _accumulating(cfg, len(gpus)):
        return contextlib.nullcontext(), 1, None
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=gpus))
    return contextlib.nullcontext(), len(gpus), "data_parallel"


def _accumulating(cfg, devices: int) -> bool:
    """Gradient accumulation cannot run under tf.distribute: say so and stay on one device."""
    if cfg.accumulation_steps > 1:
        import logging

        logging.getLogger("cloudmask").warning(
            "%d devices visible but train.micro_batch_size is set: training on one device (drop "
            "train.micro_batch_size to use all of them)", devices)
        return True
    return False


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
    if name == "torch":
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
