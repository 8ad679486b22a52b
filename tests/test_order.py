"""train.shuffle=reference against the reference's own pipeline (data_loader.py: shuffled files, patches file by
file, ``cache()``, ``shuffle(32)``, ``batch(32, drop_remainder=True)``), run through tf.data itself.

The two shuffles draw from different random generators, so the batches differ; their distributions must not.
Each run (one seed) gives three statistics of its epoch: the mean and the largest distance a patch moves from
its place in the stream, and the mean number of files a batch draws from. Runs are independent, so a
two-sample Kolmogorov-Smirnov test compares ours with tf.data's; each statistic is rejected at p < 0.001, so the
false-alarm rate of the test is at most 0.3 %. The same test rejects the `window` order (it can fail)."""

from __future__ import annotations

import numpy as np
import pytest

from cloudmask.inputs.batches import BatchStream, StreamSettings, epoch_windows, file_sequence

tf = pytest.importorskip("tensorflow")
stats = pytest.importorskip("scipy.stats")

N_FILES, PER, BATCH, BUFFER = 24, 20, 32, 32  # 480 patches, 15 batches
RUNS, ALPHA = 150, 1e-3


class PatchNumbers:
    """A patch source whose batches are the patch numbers themselves: what BatchStream serves, undisguised."""

    n_files, per_file, patch = N_FILES, PER, 1

    def reader(self):
        return self

    def start_epoch(self, files):
        pass

    def usable(self, file):
        return True

    def read(self, patches):
        return np.asarray(patches), None

    def end_epoch(self):
        pass

    def release(self, keep):
        pass

    def close(self):
        pass


def ours(seed: int, order: str = "reference", epochs: int = 1) -> list[np.ndarray]:
    """Per epoch: the stream position (file rank × PER + patch) of every patch served, in serving order."""
    settings = StreamSettings(BATCH, seed, True, order=order, buffer=BUFFER, window_files=4, prefetch=0)
    stream = BatchStream(PatchNumbers(), settings, "training")
    it = iter(stream)
    out = []
    for epoch in range(epochs):
        served = np.concatenate([next(it)[0] for _ in range(stream.steps)])
        reading = file_sequence(stream.order, epoch)
        files = [next(reading) for _ in range(N_FILES)]
        rank = np.empty(N_FILES, np.int64)
        rank[files] = np.arange(N_FILES)
        out.append(rank[served // PER] * PER + served % PER)
    return out


def reference(seed: int) -> np.ndarray:
    """The reference's order of one epoch in stream positions: tf.data's shuffle(32) over the file-major stream
    (the file order is the stream's: positions are what it reorders), whole batches of 32."""
    ds = tf.data.Dataset.range(N_FILES * PER).shuffle(BUFFER, seed=seed, reshuffle_each_iteration=True)
    return np.concatenate([b.numpy() for b in ds.batch(BATCH, drop_remainder=True)])


def statistics(positions: np.ndarray) -> tuple[float, float, float]:
    moved = np.arange(len(positions)) - positions
    files_per_batch = [len(set((b // PER).tolist())) for b in positions.reshape(-1, BATCH)]
    return float(np.abs(moved).mean()), float(moved.max()), float(np.mean(files_per_batch))


def p_values(a: list[tuple], b: list[tuple]) -> list[float]:
    return [stats.ks_2samp([x[i] for x in a], [x[i] for x in b]).pvalue for i in range(3)]


def test_the_reference_order_has_the_distribution_of_the_references_shuffle():
    theirs = [statistics(reference(seed)) for seed in range(RUNS)]
    mine = [statistics(ours(seed)[0]) for seed in range(1000, 1000 + RUNS)]
    assert min(p_values(theirs, mine)) > ALPHA, p_values(theirs, mine)
    window = [statistics(ours(seed, "window")[0]) for seed in range(1000, 1000 + RUNS)]
    assert min(p_values(theirs, window)) < ALPHA  # the test tells a different order apart


def test_every_epoch_keeps_the_first_epochs_file_order_and_draws_its_buffer_anew():
    settings = StreamSettings(BATCH, 7, True, buffer=BUFFER)
    order = settings.batch_order(N_FILES, PER)
    reads = [[f for w in epoch_windows(order, epoch) for f in w.files] for epoch in range(3)]
    assert reads[0] == reads[1] == reads[2] and sorted(reads[0]) == list(range(N_FILES))
    epochs = ours(7, epochs=3)
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    for positions in epochs:  # every patch at most once, the remainder dropped
        assert len(set(positions.tolist())) == len(positions) == (N_FILES * PER // BATCH) * BATCH


def test_the_references_cache_really_replays_the_first_epochs_file_order():
    """The premise, checked on tf.data: with cache() after the file shuffle (data_loader.py) the files reach
    the 32-patch shuffle in the same order every epoch; without it (no_cache) in a new order."""
    def pipeline(cache: bool):
        files = tf.data.Dataset.range(N_FILES).shuffle(N_FILES, seed=3)
        patches = files.flat_map(lambda f: tf.data.Dataset.range(f * PER, (f + 1) * PER))
        return (patches.cache() if cache else patches).shuffle(BUFFER, seed=4).batch(BATCH, drop_remainder=True)

    def file_ranks(ds) -> list[np.ndarray]:
        """Per epoch: the files ranked by the mean output position of their patches."""
        out = []
        for _ in range(2):
            served = np.concatenate([b.numpy() for b in ds])
            mean_position = [np.flatnonzero(served // PER == f).mean() for f in range(N_FILES)]
            out.append(stats.rankdata(mean_position))
        return out

    cached, uncached = file_ranks(pipeline(True)), file_ranks(pipeline(False))
    assert stats.spearmanr(*cached).statistic > 0.95  # the buffer only jitters neighbouring files
    assert stats.spearmanr(*uncached).statistic < 0.8
