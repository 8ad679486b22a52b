"""The cluster: several cooperating processes ("workers") training one model with TensorFlow's
MultiWorkerMirroredStrategy, and the collectives they share.

* ``connect`` finds the cluster — ``TF_CONFIG`` when set, else the tasks of an ``srun`` step (more than one),
  else this process alone — and starts the strategy. SLURM's variables are turned into ``TF_CONFIG`` here rather
  than by TensorFlow's SlurmClusterResolver, which cannot describe CPU-only nodes (it divides by the GPUs per
  task) and rewrites ``CUDA_VISIBLE_DEVICES``.
* ``Cluster.exchange`` gives every worker every worker's small JSON value (over the strategy's own collectives,
  so no second communication channel is needed); ``Cluster.settle`` makes a failure on one worker a failure on
  all, so no worker is left waiting in a collective for one that has already given up.

The training loop the workers run together is worker_loop.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
from dataclasses import dataclass, field

import numpy as np

from ..errors import CloudmaskError, ConfigError

log = logging.getLogger(__name__)

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
