"""Which patches go into which batch, and the stream that serves them, for every patch source.

Patches of a split are numbered file-major: patch ``f * per_file + r`` is patch ``r`` of file ``f`` of the
split's file list. ``epoch_windows`` is the one definition of the batch order; both sources, the raw HDF5 files
(hdf5_source.py) and the patch store (store.py), are read through ``BatchStream`` in that order, so the same seed
gives the same batches from either (and from the patch cache).

* ``reference`` (the default): the reference's order (data_loader.py: ``shuffle(files)`` → patches file by file
  → ``cache()`` → ``shuffle(32)`` → ``batch(32, drop_remainder=True)``). The file order is drawn once and kept
  for every epoch, because the reference's ``cache()`` replays its first epoch; the patches then pass, file by
  file, through a shuffle buffer of ``buffer`` patches that draws every patch it gives out uniformly from what
  it holds, redrawn every epoch (tf.data's ``shuffle``, reshuffled each iteration). Validation goes through the
  same order, as the reference's does. Memory: the files with a patch still in the buffer (a few), whatever the
  number of files.
* ``window`` (the streaming order of earlier versions; a deviation): every epoch permutes the file order with a
  generator seeded by (seed, epoch), reads the files in windows of ``window_files`` and shuffles the patches of
  each window, with what the previous window left over, together. Validation is not shuffled.
* ``global`` (patch store only; a deviation): a fresh permutation of all patches every epoch.

Every order is the same on every run with the same seed, also after ``--resume``. Without shuffling the files
are read one at a time in their order, and the batches are the same every epoch. Every epoch yields exactly
``batches`` batches; the remainder is dropped, as the reference's ``drop_remainder=True``. A file the source
cannot read (``usable`` is False) contributes no patches; the epoch then reads on into the next pass over its
files until it is full.

``shard=(i, n)``: one of ``n`` workers training together; every batch is cut into ``n`` equal row ranges and
this worker feeds range ``i``. ``micro_batches=k``: every (sharded) batch is fed as ``k`` consecutive equal
slices (gradient accumulation); the sequence of patches is the same as without.
"""

from __future__ import annotations

import concurrent.futures
import itertools
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..errors import DataError


@dataclass(frozen=True)
class BatchOrder:
    n_files: int
    per_file: int
    batch_size: int
    seed: int
    shuffle: bool
    order: str = "reference"  # reference | window | global
    window_files: int = 8
    shard: tuple[int, int] = (0, 1)
    micro_batches: int = 1
    buffer: int = 32  # the reference order's shuffle buffer, in patches

    @property
    def patches(self) -> int:
        return self.n_files * self.per_file

    @property
    def batches(self) -> int:
        return self.patches // self.batch_size

    @property
    def steps(self) -> int:
        return self.batches * self.micro_batches


@dataclass(frozen=True)
class StreamSettings:
    """How one split is served: the settings of its batch order, the epoch it starts at, the reading threads and
    how many batches are assembled ahead."""

    batch_size: int
    seed: int
    shuffle: bool
    order: str = "reference"  # reference | window | global
    window_files: int = 8
    micro_batches: int = 1
    shard: tuple[int, int] = (0, 1)
    read_threads: int = 2
    prefetch: int = 2
    start_epoch: int = 0
    buffer: int = 32

    def batch_order(self, n_files: int, per_file: int) -> BatchOrder:
        return BatchOrder(n_files, per_file, self.batch_size, self.seed, self.shuffle, self.order,
                          self.window_files, self.shard, self.micro_batches, self.buffer)


@dataclass
class FileWindow:
    files: list[int]  # the files read for this window, in reading order (unusable ones included)
    steps: list[np.ndarray]  # the patch numbers this worker feeds at each step served after reading them
    keep: set[int]  # files whose patches later windows still use (the shuffled remainder)


def file_sequence(order: BatchOrder, epoch: int) -> Iterator[int]:
    """The files in the order an epoch reads them: the epoch's file order (the first epoch's, every epoch, in
    the reference order), then again as long as needed."""
    if order.shuffle:
        drawn = 0 if order.order == "reference" else epoch
        files = list(np.random.default_rng([order.seed, drawn]).permutation(order.n_files))
    else:
        files = list(range(order.n_files))
    return itertools.chain(files, itertools.cycle(files))


def _always(_file: int) -> bool:
    return True


def epoch_windows(order: BatchOrder, epoch: int, usable=_always) -> Iterator[FileWindow]:
    """The batches of one epoch, window by window. ``usable(file)`` is asked once for every file read, in the
    order of ``file_sequence``; the windows stop early only when no file is usable."""
    if order.shuffle and order.order == "global":
        perm = np.random.default_rng([order.seed, epoch, 2]).permutation(order.patches)
        yield FileWindow([], _steps(order, perm[: order.batches * order.batch_size]), set())
        return
    if order.shuffle and order.order == "reference":
        yield from _buffered_windows(order, epoch, usable)
        return
    reading = file_sequence(order, epoch)
    rng = np.random.default_rng([order.seed, epoch, 1])
    window = order.window_files if order.shuffle else 1
    carry = np.empty(0, np.int64)
    unusable: set[int] = set()
    produced = consumed = 0
    while produced < order.batches and len(unusable) < order.n_files:
        want = window if consumed >= order.n_files else min(window, order.n_files - consumed)
        read = [next(reading) for _ in range(want)]
        consumed += want
        good = []
        for f in read:
            if usable(f):
                good.append(f)
            else:
                unusable.add(f)
        if not good:
            continue
        per = order.per_file
        idx = np.concatenate([np.arange(f * per, (f + 1) * per) for f in good] + [carry])
        if order.shuffle:
            idx = idx[rng.permutation(len(idx))]
        full = min(len(idx) // order.batch_size, order.batches - produced)
        produced += full
        carry = idx[full * order.batch_size:]
        yield FileWindow(read, _steps(order, idx[: full * order.batch_size]), set((carry // per).tolist()))


def _buffered_windows(order: BatchOrder, epoch: int, usable) -> Iterator[FileWindow]:
    """The reference order, one window per usable file read: its patches go into the shuffle buffer, which
    gives out a uniformly drawn patch for every patch it takes in once full; the whole batches drawn so far are
    the window's steps. After the last file of the pass the buffer empties in random order."""
    rng = np.random.default_rng([order.seed, epoch, 3])
    reading = file_sequence(order, epoch)
    per, size = order.per_file, order.batch_size
    buffer: list[int] = []
    drawn: list[int] = []  # drawn from the buffer, not yet in a whole batch
    read: list[int] = []
    unusable: set[int] = set()
    produced = consumed = 0
    while produced < order.batches and len(unusable) < order.n_files:
        file = next(reading)
        consumed += 1
        read.append(file)
        if not usable(file):
            unusable.add(file)
            continue
        for patch in range(file * per, (file + 1) * per):
            if len(buffer) < order.buffer:
                buffer.append(patch)
            else:
                slot = int(rng.integers(len(buffer)))
                drawn.append(buffer[slot])
                buffer[slot] = patch
        last = consumed >= order.n_files and not unusable  # the input ends: the buffer empties
        while last and buffer:
            drawn.append(buffer.pop(int(rng.integers(len(buffer)))))
        full = min(len(drawn) // size, order.batches - produced)
        produced += full
        steps, drawn = np.asarray(drawn[: full * size], np.int64), drawn[full * size:]
        yield FileWindow(read, _steps(order, steps), {p // per for p in buffer + drawn})
        read = []
        if last:
            return


def _steps(order: BatchOrder, patches: np.ndarray) -> list[np.ndarray]:
    """Whole batches -> this worker's rows of each, as micro-batches."""
    rows = patches.reshape(-1, order.shard[1], order.batch_size // order.shard[1])[:, order.shard[0]]
    return [part for batch in rows for part in np.split(batch, order.micro_batches)]


def epoch_patches(order: BatchOrder, epoch: int) -> np.ndarray:
    """The patch numbers of one epoch's batches, whole and in order, when every file is usable."""
    whole = BatchOrder(order.n_files, order.per_file, order.batch_size, order.seed, order.shuffle, order.order,
                       order.window_files, buffer=order.buffer)
    return np.concatenate([s for w in epoch_windows(whole, epoch) for s in w.steps])


# ------------------------------------------------------------------------------------------------ serving


class PatchReader:
    """One iteration's access to a source. ``start_epoch`` announces the files the epoch will ask ``usable``
    about, in order (a reader may read them ahead); ``release`` says which files later windows still need."""

    def start_epoch(self, files: Iterator[int]) -> None:
        pass

    def usable(self, file: int) -> bool:
        return True

    def read(self, patches: np.ndarray) -> tuple:
        """(x (n, P, P, 9), y float32 (n, P, P, 1)) of the given patch numbers."""
        raise NotImplementedError

    def end_epoch(self) -> None:
        """Called when an epoch has served all its batches."""

    def release(self, keep: set[int]) -> None:
        pass

    def close(self) -> None:
        pass


class BatchStream:
    """Endless iterator of (x, y) batches of one split, ``steps`` per epoch, in ``BatchOrder``.

    ``source`` has ``n_files``, ``per_file``, ``patch`` and ``reader()``, which makes a ``PatchReader`` per
    iteration; ``settings.prefetch`` > 0 assembles that many batches ahead in a background thread (within an
    epoch). ``error`` keeps the DataError that ended an iteration (Keras and
    tf.data re-wrap exceptions raised in input generators)."""

    def __init__(self, source, settings: StreamSettings, what: str):
        order = settings.batch_order(source.n_files, source.per_file)
        if order.batches == 0:
            raise DataError(f"{order.n_files} {what} file(s) give {order.patches} patches, fewer than one batch "
                            f"of {order.batch_size}", "add files, or lower train.batch_size")
        self.source, self.order, self.what = source, order, what
        self.epoch, self.prefetch = settings.start_epoch, settings.prefetch
        self.patch = source.patch
        self.error: DataError | None = None

    @property
    def patches(self) -> int:
        return self.order.patches

    @property
    def batches(self) -> int:
        return self.order.batches

    @property
    def steps(self) -> int:
        return self.order.steps

    def close(self) -> None:
        """Release what the source holds beyond one iteration (a patch cache being built)."""
        if hasattr(self.source, "close"):
            self.source.close()

    def _epoch(self, reader: PatchReader, epoch: int):
        reader.start_epoch(file_sequence(self.order, epoch))
        served = 0
        for window in epoch_windows(self.order, epoch, reader.usable):
            for rows in window.steps:
                yield reader.read(rows)
                served += 1
            reader.release(window.keep)
        if served < self.order.steps:
            raise DataError(f"every {self.what} file is bad", "check the dataset with `cloudmask data verify`")
        reader.end_epoch()

    def __iter__(self):
        reader = self.source.reader()
        loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"batches-{self.what}") \
            if self.prefetch else None
        try:
            while True:
                batches = self._epoch(reader, self.epoch)
                yield from (_ahead(loader, batches, self.prefetch, self.order.steps) if loader else batches)
                for _ in batches:  # after _ahead's last item: the epoch's end (reader.end_epoch) still runs
                    pass
                self.epoch += 1
        except DataError as e:
            self.error = e
            raise
        finally:
            if loader is not None:
                loader.shutdown(wait=False, cancel_futures=True)
            reader.close()


def _ahead(loader, batches, depth: int, count: int):
    """``count`` items of the generator ``batches``, each made in ``loader`` up to ``depth`` items ahead."""
    pending = deque(loader.submit(next, batches) for _ in range(min(depth, count)))
    for i in range(count):
        item = pending.popleft().result()
        if i + len(pending) + 1 < count:
            pending.append(loader.submit(next, batches))
        yield item
