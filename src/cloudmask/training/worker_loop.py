"""The multi-worker training loop. Keras 3's ``Model.fit`` cannot run under MultiWorkerMirroredStrategy
(keras-team/keras#20585), so the loop is written out: same loss (mean binary cross-entropy over the global
batch), same accuracy, same callback order as ``fit``, gradients all-reduced by the Keras optimizer. Each worker
feeds only its own rows of every global batch (a sharded batch stream); metrics are sums all-reduced with the
gradients' step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .cluster import Cluster, lost_contact


class StopTraining(Exception):
    """Every worker agreed to stop at this step (a signal reached at least one of them)."""


@dataclass(frozen=True)
class Epochs:
    """The epochs a fit runs: from ``start`` up to ``end`` (Keras's initial_epoch and epochs), ``steps`` training
    steps each (None: the training stream's own; a throughput measurement sets it)."""

    end: int
    start: int = 0
    steps: int | None = None


@dataclass(frozen=True)
class Workers:
    """Training as one of several workers: the cluster, the global batch they share, and the stop request this
    worker polls (the workers stop together at the first step where any of them asks)."""

    cluster: Cluster
    global_batch: int
    stop_requested: Callable[[], bool] = lambda: False


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


def fit(model, train_stream, val_stream, callbacks, epochs: Epochs, workers: Workers) -> LoopResult:
    """Train ``epochs`` on every worker in step; ``callbacks`` see what Keras ``fit`` would show them (batch and
    epoch logs with loss, accuracy, val_loss, val_accuracy). ``val_stream`` None skips validation.

    ``workers.stop_requested()`` is polled before every step; the workers stop together at the first step where
    any of them asks (``StopTraining``), so none waits for a partner that has left."""
    import tensorflow as tf

    cluster, start = workers.cluster, epochs.start
    train_step, val_step = make_steps(cluster, model, workers.global_batch, (train_stream.patch, train_stream.patch))
    callbacks.on_train_begin()
    logs: dict = {}
    train_s, samples, epoch = 0.0, 0, start
    train_it = iter(train_stream)
    val_it = iter(val_stream) if val_stream is not None else None
    try:
        for epoch in range(start, epochs.end):
            callbacks.on_epoch_begin(epoch)
            sums = np.zeros(3)
            t0 = time.perf_counter()
            for step in range(epochs.steps or train_stream.steps):
                callbacks.on_train_batch_begin(step)
                x, y = next(train_it)
                out = train_step(x, y, workers.stop_requested())
                if out[3] > 0:
                    raise StopTraining()
                sums += out[:3]
                samples += len(x)
                callbacks.on_train_batch_end(step, {"loss": sums[0] / sums[2], "accuracy": sums[1] / sums[2]})
            train_s += time.perf_counter() - t0
            logs = {"loss": float(sums[0] / sums[2]), "accuracy": float(sums[1] / sums[2])}
            if val_it is not None:
                logs.update(_validate(val_it, val_stream.steps, val_step, callbacks))
            callbacks.on_epoch_end(epoch, logs)
            # identical logs give identical decisions, but a stop must never be one worker's alone
            if cluster.allreduce([float(bool(model.stop_training))])[0] > 0:
                model.stop_training = True
                epoch += 1
                break
        else:
            epoch = epochs.end
    except StopTraining:
        return LoopResult(epoch, True, train_s, samples)
    except tf.errors.OpError as e:
        raise lost_contact(e) from None
    callbacks.on_train_end(logs)
    return LoopResult(epoch, False, train_s, samples)


def _validate(batches, steps: int, val_step, callbacks) -> dict:
    """One pass over the validation batches: the stream's next epoch, in step with the one trained (as Keras's
    ValidationPasses follows it)."""
    callbacks.on_test_begin()
    sums = np.zeros(3)
    for step in range(steps):
        callbacks.on_test_batch_begin(step)
        sums += val_step(*next(batches))
        callbacks.on_test_batch_end(step, {"loss": sums[0] / sums[2], "accuracy": sums[1] / sums[2]})
    logs = {"loss": float(sums[0] / sums[2]), "accuracy": float(sums[1] / sums[2])}
    callbacks.on_test_end(logs)
    return {f"val_{k}": v for k, v in logs.items()}
