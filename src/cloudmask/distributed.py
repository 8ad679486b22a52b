"""Several cooperating processes ("workers") training one model: TensorFlow's MultiWorkerMirroredStrategy.

* ``connect`` finds the cluster — ``TF_CONFIG`` when set, else the tasks of an ``srun`` step (more than one),
  else this process alone — and starts the strategy. SLURM's variables are turned into ``TF_CONFIG`` here rather
  than by TensorFlow's SlurmClusterResolver, which cannot describe CPU-only nodes (it divides by the GPUs per
  task) and rewrites ``CUDA_VISIBLE_DEVICES``.
* ``Cluster.exchange`` gives every worker every worker's small JSON value (over the strategy's own collectives,
  so no second communication channel is needed); ``Cluster.settle`` makes a failure on one worker a failure on
  all, so no worker is left waiting in a collective for one that has already given up.
* ``fit`` is the training loop. Keras 3's ``Model.fit`` cannot run under this strategy (keras-team/keras#20585),
  so the loop is written out: same loss (mean binary cross-entropy over the global batch), same accuracy, same
  callback order as ``fit``, gradients all-reduced by the Keras optimizer. Each worker feeds only its own rows
  of every global batch (``StoreStream(shard=...)``); metrics are sums all-reduced with the gradients' step.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import CloudmaskError, ConfigError

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------- the cluster


def slurm_tf_config(cfg, environ=os.environ, hostnames=None) -> dict | None:
    """TF_CONFIG for the tasks of the current srun step (None outside a step or with a single task).

    Workers are numbered like SLURM's ranks under block distribution: the tasks of the first node, then the
    next node's. Each task listens on ``port + local task id`` of its node."""
    tasks = int(environ.get("SLURM_STEP_NUM_TASKS") or 0)
    if tasks < 2 or "SLURM_PROCID" not in environ:
        return None
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
    hosts = (hostnames or _scontrol_hostnames)(nodelist)
    per_node = tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE", ""), len(hosts))
    if sum(per_node) != tasks:
        raise ConfigError(f"SLURM_STEP_TASKS_PER_NODE={environ.get('SLURM_STEP_TASKS_PER_NODE')!r} does not add up "
                          f"to SLURM_STEP_NUM_TASKS={tasks}", "launch with srun inside an allocation")
    port = cfg.distribute.port
    if port == "auto":  # a job-specific range, so two jobs sharing a node do not collide
        port = 20000 + (int(environ.get("SLURM_JOB_ID", "0") or 0) % 4000) * 8
    workers = [f"{host}:{port + local}" for host, n in zip(hosts, per_node) for local in range(n)]
    rank = int(environ["SLURM_PROCID"])
    mine = f"{environ.get('SLURMD_NODENAME', socket.gethostname())}:{port + int(environ.get('SLURM_LOCALID', 0))}"
    if workers[rank] != mine:
        raise ConfigError(f"srun task {rank} runs as {mine}, but block distribution would place it at "
                          f"{workers[rank]}", "launch with `srun --distribution=block`")
    return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": rank}}


def tasks_per_node(spec: str, nodes: int) -> list[int]:
    """SLURM's compressed task counts ("2(x3),1") as a list with one entry per node."""
    counts = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ConfigError(f"SLURM_STEP_TASKS_PER_NODE={spec!r} cannot be read", "launch with srun")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if len(counts) != nodes:
        raise ConfigError(f"SLURM_STEP_TASKS_PER_NODE={spec!r} names {len(counts)} nodes, the step has {nodes}",
                          "launch with srun inside an allocation")
    return counts


def _scontrol_hostnames(nodelist: str) -> list[str]:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise ConfigError(f"cannot expand the SLURM node list {nodelist!r} with scontrol ({e})",
                          "run inside a SLURM allocation with scontrol on PATH, or set TF_CONFIG") from None
    return out.split()


def read_tf_config(text: str) -> dict:
    """Validated TF_CONFIG: only ``worker`` tasks (worker 0 is the chief)."""
    hint = 'e.g. {"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": {"type": "worker", "index": 0}}'
    try:
        tree = json.loads(text)
        workers = tree["cluster"]["worker"]
        task_type, index = tree["task"]["type"], tree["task"]["index"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"TF_CONFIG cannot be read ({type(e).__name__}: {e})", hint) from None
    if set(tree["cluster"]) != {"worker"} or task_type != "worker":
        raise ConfigError(f"TF_CONFIG has task types {sorted(tree['cluster'])}; only 'worker' is supported "
                          "(worker 0 acts as the chief)", hint)
    if not (isinstance(workers, list) and workers and all(isinstance(w, str) and ":" in w for w in workers)):
        raise ConfigError("TF_CONFIG cluster.worker must be a list of host:port", hint)
    if not (isinstance(index, int) and 0 <= index < len(workers)):
        raise ConfigError(f"TF_CONFIG task.index={index!r} is not one of the {len(workers)} workers", hint)
    return tree


@dataclass
class Cluster:
    """This process's place among the workers, and the collectives they share."""

    strategy: object
    rank: int
    workers: int
    source: str  # "TF_CONFIG", "SLURM" or "single"
    addresses: list[str] = field(default_factory=list)
    _fns: dict = field(default_factory=dict, repr=False)

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    @property
    def local_replicas(self) -> int:
        return self.replicas // self.workers

    def allreduce(self, values) -> np.ndarray:
        """Element-wise float64 sum of ``values`` over the workers (each worker's vector counted once)."""
        import tensorflow as tf

        vec = np.asarray(values, np.float64).ravel()
        if self.workers == 1:
            return vec
        if "allreduce" not in self._fns:
            local = self.local_replicas

            def contribute(v):
                ctx = tf.distribute.get_replica_context()
                first = tf.equal(tf.math.floormod(ctx.replica_id_in_sync_group, local), 0)
                return tf.where(first, v, tf.zeros_like(v))

            @tf.function(reduce_retracing=True)
            def reduce(v):
                per_replica = self.strategy.run(contribute, args=(v,))
                return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

            self._fns["allreduce"] = reduce
        try:
            return self._fns["allreduce"](tf.constant(vec)).numpy()
        except tf.errors.OpError as e:
            raise lost_contact(e) from None

    def exchange(self, value) -> list:
        """Every worker's JSON-serialisable ``value``, in rank order, on every worker."""
        blob = np.frombuffer(json.dumps(value).encode(), np.uint8)
        sizes = np.zeros(self.workers)
        sizes[self.rank] = len(blob)
        sizes = self.allreduce(sizes).astype(int)
        start = int(sizes[: self.rank].sum())
        slots = np.zeros(int(sizes.sum()))
        slots[start:start + len(blob)] = blob
        joined = self.allreduce(slots).astype(np.uint8).tobytes()
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        return [json.loads(joined[bounds[i]:bounds[i + 1]]) for i in range(self.workers)]

    def settle(self, action):
        """``action()`` on every worker; when it fails on any, every worker raises that worker's error."""
        result, error = None, None
        try:
            result = action()
        except CloudmaskError as e:
            error = e
        reports = self.exchange(None if error is None else [error.message, error.hint])
        if error is not None:
            raise error
        for rank, report in enumerate(reports):
            if report is not None:
                raise CloudmaskError(f"worker {rank} stopped: {report[0]}", report[1])
        return result


def lost_contact(error) -> CloudmaskError:
    return CloudmaskError(f"lost contact with the other workers ({type(error).__name__}: "
                          f"{str(error).splitlines()[0][:200]})",
                          "another worker failed or was killed: see its output; a run with checkpoints can be "
                          "continued with --resume")


def connect(cfg, environ=os.environ) -> Cluster:
    """The cluster this process belongs to, with the strategy started. Must run before TensorFlow creates its
    devices (first thing in a run)."""
    from .runtime import backend

    if backend() != "tensorflow":
        raise ConfigError(f"distribute.strategy=multi_worker needs the TensorFlow backend (KERAS_BACKEND is "
                          f"{backend()})", "set KERAS_BACKEND=tensorflow, or train on one node with "
                          "distribute.strategy=auto")
    source = "TF_CONFIG"
    text = environ.get("TF_CONFIG")
    if text:
        tree = read_tf_config(text)
    else:
        tree = slurm_tf_config(cfg, environ)
        if tree is not None:
            source = "SLURM"
            os.environ["TF_CONFIG"] = json.dumps(tree)
    if tree is None:
        source, workers, rank = "single", [], 0
    else:
        workers, rank = tree["cluster"]["worker"], tree["task"]["index"]
    import tensorflow as tf

    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=cfg.distribute.timeout_s)
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except (tf.errors.OpError, RuntimeError, ValueError) as e:
        where = workers[rank] if workers else "this process"
        raise ConfigError(f"cannot start worker {rank} at {where} ({type(e).__name__}: {str(e).splitlines()[0]})",
                          "check that the port is free and the hosts resolve; set distribute.port") from None
    cluster = Cluster(strategy, rank, max(1, len(workers)), source, list(workers))
    if cluster.workers > 1:
        log.info("worker %d of %d (%s, %s), %d replicas in all", rank, cluster.workers, source,
                 workers[rank], cluster.replicas)
    return cluster


def describe_workers(reports: list[dict]) -> dict:
    """Nodes and accelerators per node from every worker's {"host", "devices"} (one entry per worker)."""
    per_host: dict[str, int] = {}
    for r in reports:
        per_host[r["host"]] = per_host.get(r["host"], 0) + len(r["devices"])
    return {"workers": len(reports), "nodes": len(per_host),
            "accelerators_per_node": max(per_host.values()) if per_host else 0,
            "hosts": sorted(per_host)}


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


# --------------------------------------------------------------------------------------------- training


class StopTraining(Exception):
    """Every worker agreed to stop at this step (a signal reached at least one of them)."""


@dataclass
class LoopResult:
    epochs_done: int
    stopped: bool  # by a signal
    train_s: float  # this worker's time in training steps (all epochs of this attempt)
    samples: int  # this worker's training patches in this attempt


def make_steps(cluster: Cluster, model, global_batch: int, image: tuple[int, int]):
    """(train_step(x, y, stop) -> [loss sum, correct pixels, pixels, stop votes], val_step(x, y) -> the first
    three), summed over every worker; x, y are this worker's rows of a global batch of ``global_batch``."""
    import keras
    import tensorflow as tf

    strategy = cluster.strategy
    local = cluster.local_replicas
    pixels = float(global_batch * image[0] * image[1])
    optimizer = model.optimizer

    def scores(y, p):
        per_pixel = keras.losses.binary_crossentropy(y, p)
        correct = tf.cast(tf.equal(tf.cast(p > 0.5, y.dtype), y), tf.float32)
        return tf.reduce_sum(per_pixel), tf.reduce_sum(correct), tf.cast(tf.size(per_pixel), tf.float32)

    def train_replica(x, y, stop):
        with tf.GradientTape() as tape:
            p = model(x, training=True)
            loss_sum, correct, count = scores(y, p)
            # each replica's share of the global mean: the all-reduced (summed) gradients are the global batch's
            scaled = optimizer.scale_loss(loss_sum / pixels)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return tf.stack([loss_sum, correct, count, stop / local])

    def val_replica(x, y):
        return tf.stack(scores(y, model(x, training=False)))

    @tf.function
    def train_fn(x, y, stop):
        out = strategy.run(train_replica, args=(x, y, stop))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, out, axis=None)

    @tf.function
    def val_fn(x, y):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(val_replica, args=(x, y)), axis=None)

    def distribute(x, y):
        # this worker's rows, split again over its local replicas (one per GPU of the task)
        xs, ys = np.array_split(x, local), np.array_split(y, local)
        pick = lambda parts: strategy.experimental_distribute_values_from_function(  # noqa: E731
            lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group % local]))
        return pick(xs), pick(ys)

    def train_step(x, y, stop: bool = False) -> np.ndarray:
        return train_fn(*distribute(x, y), tf.constant(1.0 if stop else 0.0)).numpy()

    def val_step(x, y) -> np.ndarray:
        return val_fn(*distribute(x, y)).numpy()

    return train_step, val_step


def fit(cluster: Cluster, model, train_stream, val_stream, callbacks, epochs: int, start: int,
        global_batch: int, stop_requested) -> LoopResult:
    """Train from epoch ``start`` to ``epochs`` on every worker in step; ``callbacks`` see what Keras ``fit``
    would show them (batch and epoch logs with loss, accuracy, val_loss, val_accuracy).

    ``stop_requested()`` is polled before every step; the workers stop together at the first step where any of
    them asks (``StopTraining``), so none waits for a partner that has left."""
    import tensorflow as tf

    train_step, val_step = make_steps(cluster, model, global_batch, train_stream.x.shape[1:3])
    callbacks.on_train_begin()
    logs: dict = {}
    train_s, samples, epoch = 0.0, 0, start
    train_it, val_it = iter(train_stream), iter(val_stream)
    try:
        for epoch in range(start, epochs):
            callbacks.on_epoch_begin(epoch)
            sums = np.zeros(3)
            t0 = time.perf_counter()
            for step in range(train_stream.steps):
                callbacks.on_train_batch_begin(step)
                x, y = next(train_it)
                out = train_step(x, y, stop_requested())
                if out[3] > 0:
                    raise StopTraining()
                sums += out[:3]
                samples += len(x)
                callbacks.on_train_batch_end(step, {"loss": sums[0] / sums[2], "accuracy": sums[1] / sums[2]})
            train_s += time.perf_counter() - t0
            logs = {"loss": float(sums[0] / sums[2]), "accuracy": float(sums[1] / sums[2])}
            callbacks.on_test_begin()
            vsums = np.zeros(3)
            for step in range(val_stream.steps):
                callbacks.on_test_batch_begin(step)
                vsums += val_step(*next(val_it))
                callbacks.on_test_batch_end(step, {"loss": vsums[0] / vsums[2], "accuracy": vsums[1] / vsums[2]})
            val_logs = {"loss": float(vsums[0] / vsums[2]), "accuracy": float(vsums[1] / vsums[2])}
            callbacks.on_test_end(val_logs)
            logs.update({f"val_{k}": v for k, v in val_logs.items()})
            callbacks.on_epoch_end(epoch, logs)
            # identical logs give identical decisions, but a stop must never be one worker's alone
            if cluster.allreduce([float(bool(model.stop_training))])[0] > 0:
                model.stop_training = True
                epoch += 1
                break
        else:
            epoch = epochs
    except StopTraining:
        return LoopResult(epoch, True, train_s, samples)
    except tf.errors.OpError as e:
        raise lost_contact(e) from None
    callbacks.on_train_end(logs)
    return LoopResult(epoch, False, train_s, samples)
