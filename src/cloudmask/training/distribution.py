"""How a run spreads over devices and workers: one resolved plan, computed and validated once at the start of a
run and consumed by training and the throughput mode.

``train.batch_size`` is global (split over the replicas) unless ``distribute.per_replica_batch``. The batch
rules (micro-batches divide the batch, no gradient accumulation under data parallelism, the per-step batch
splits over the replicas) live in ``check_batch`` alone: config validation calls it with what a config file
can know, ``resolve`` again with the replicas the devices give.

Strategies: TensorFlow MirroredStrategy over the visible GPUs (or ``distribute.cpu_devices`` logical CPUs), the
global batch split evenly and gradients all-reduced; JAX keras.distribution.DataParallel over the GPUs;
MultiWorkerMirroredStrategy over every worker's devices (cluster.py) for ``multi_worker``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError

log = logging.getLogger(__name__)

DATA_PARALLEL = ("mirrored", "multi_worker", "data_parallel")  # replicas that run every step together


@dataclass(frozen=True)
class DistributionPlan:
    strategy: str | None  # mirrored | data_parallel | multi_worker | None (one device)
    replicas: int
    global_batch: int  # patches per update over every replica
    step_batch: int  # patches per forward/backward pass over every replica (< global_batch when accumulating)
    accumulation_steps: int
    shard: tuple[int, int]  # (this worker, workers): the rows of every global batch this process reads
    scope: Callable[[], contextlib.AbstractContextManager]  # where variables must be created

    @property
    def per_replica_batch(self) -> int:
        return self.step_batch // self.replicas


def check_batch(batch: int, micro: int | None, strategy: str | None, replicas: int | None = None,
                where: str = "") -> None:
    """Every batch rule; ``replicas`` None checks what is known before the devices are (a config file)."""
    if micro is not None and (micro > batch or batch % micro):
        raise ConfigError(f"{where}train.micro_batch_size={micro} must divide train.batch_size={batch}",
                          "e.g. 8 or 16 for a batch of 32")
    if micro is not None and micro < batch and strategy in DATA_PARALLEL:
        # Keras's gradient accumulation synchronises inside a conditional, which tf.distribute rejects
        raise ConfigError(f"{where}train.micro_batch_size={micro} (gradient accumulation) does not work with "
                          f"distribute.strategy={strategy}", "set train.micro_batch_size=null: each replica "
                          "already gets batch_size / replicas, or set distribute.strategy=none")
    step = micro or batch
    if replicas is not None and step % replicas:
        raise ConfigError(f"{where}train.batch_size {step} (per step) does not split over {replicas} replicas",
                          f"use a multiple of {replicas}")


def resolve(cfg, cluster=None):
    """(config with the global batch, DistributionPlan) for this process. Must run before the framework creates
    its devices (first thing in a run)."""
    if cluster is not None:
        strategy, replicas, scope = "multi_worker", cluster.replicas, cluster.strategy.scope
    else:
        strategy, replicas, scope = _one_node(cfg)
    check_batch(cfg.train.batch_size, cfg.train.micro_batch_size, strategy, replicas)
    cfg = cfg.for_replicas(replicas)
    plan = DistributionPlan(strategy, replicas, cfg.train.batch_size,
                            cfg.train.micro_batch_size or cfg.train.batch_size, cfg.accumulation_steps,
                            (cluster.rank, cluster.workers) if cluster is not None else (0, 1), scope)
    if replicas > 1:
        log.info("data parallel over %d replicas: global batch %d, %d per replica", replicas, plan.global_batch,
                 plan.global_batch // replicas)
    return cfg, plan


def _one_node(cfg):
    """(strategy name or None, replicas, scope) over this process's own devices."""
    from .runtime import backend

    mode, name = cfg.distribute.strategy, backend()
    if mode == "none" or name not in ("tensorflow", "jax"):
        return None, 1, contextlib.nullcontext
    if name == "jax":
        return _jax_data_parallel(cfg)
    import tensorflow as tf

    devices = _tf_cpu_devices(tf, cfg.distribute.cpu_devices) if cfg.distribute.cpu_devices else \
        [d.name for d in tf.config.list_logical_devices("GPU")]
    if mode == "auto" and (len(devices) < 2 or _accumulating(cfg, len(devices))):
        return None, 1, contextlib.nullcontext
    strategy = tf.distribute.MirroredStrategy(devices or None)
    return "mirrored", strategy.num_replicas_in_sync, strategy.scope


def _tf_cpu_devices(tf, count: int) -> list[str]:
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        pass  # already initialised: fine if an earlier run of this process made the same split
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:count]
    if len(devices) < count:
        raise ConfigError(f"distribute.cpu_devices={count}: TensorFlow's devices were already created in "
                          "this process", "run it as its own `cloudmask train` process")
    return devices


def _jax_data_parallel(cfg):
    import jax
    import keras

    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if len(gpus) < 2 or _accumulating(cfg, len(gpus)):
        return None, 1, contextlib.nullcontext
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=gpus))
    return "data_parallel", len(gpus), contextlib.nullcontext


def _accumulating(cfg, devices: int) -> bool:
    """Gradient accumulation cannot run under tf.distribute: say so and stay on one device."""
    if cfg.accumulation_steps > 1:
        log.warning("%d devices visible but train.micro_batch_size is set: training on one device (drop "
                    "train.micro_batch_size to use all of them)", devices)
        return True
    return False
