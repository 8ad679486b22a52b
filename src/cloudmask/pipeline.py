"""Streaming input pipeline over the raw HDF5 files, backend-neutral (plain numpy batches; Keras wraps it in
tf.data with prefetching on the TensorFlow backend).

Memory is bounded by the shuffle window (``train.shuffle_buffer_files`` files of patches) plus the files being
read ahead, whatever the number of files: the reference instead caches every patch in RAM (~51 GB).

Order: every epoch permutes the file order with a generator seeded by (seed, epoch), reads the files in windows,
and shuffles the patches of each window together; so the order changes every epoch (the reference's cache
replays the first epoch's order) and is the same on every run with the same seed, also after ``--resume``.
Each epoch yields exactly ``steps`` batches (the remainder is dropped, as the reference's
``drop_remainder=True``); validation batches are the same, in file order, every epoch.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from . import data, preprocess
from .errors import DataError
from .preprocess import Geometry

log = logging.getLogger(__name__)


def load_train_patches(path: Path, geometry: Geometry, normalisation: str,
                       min_finite_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """One file -> (patches float32 (n, P, P, 9), labels uint8 (n, P, P, 1)), normalised as the reference does
    (whole image first, then crop)."""
    sample = data.read_sample(path, geometry, min_finite_fraction)
    image = preprocess.normalise(sample.image, normalisation)
    return preprocess.train_patches(image, geometry), preprocess.train_patches(sample.label, geometry)


def quick_check(path: Path, geometry: Geometry) -> str | None:
    """Header-only check (keys, shapes, dtypes) so a bad file is found before training starts, in milliseconds."""
    try:
        with h5py.File(path, "r") as f:
            for key, channels in data.KEYS.items():
                if key not in f or not isinstance(f[key], h5py.Dataset):
                    return f"missing dataset '{key}'"
                shape = f[key].shape
                if key == "bayes" and len(shape) == 2:
                    shape = (*shape, 1)
                if shape != (geometry.height, geometry.width, channels):
                    return f"'{key}' has shape {f[key].shape}, expected ({geometry.height}, {geometry.width}, " \
                           f"{channels})"
                if f[key].dtype.kind not in "fiub":
                    return f"'{key}' has dtype {f[key].dtype}"
    except OSError as e:
        return f"not a readable HDF5 file ({data._h5_reason(e)})"
    return None


def screen_files(files: list[Path], geometry: Geometry, skip_bad: bool, what: str) -> list[Path]:
    """Drop (skip_bad) or reject files whose headers are bad."""
    good = []
    for path in files:
        problem = quick_check(path, geometry)
        if problem is None:
            good.append(path)
        elif skip_bad:
            log.warning("skipping bad %s file %s: %s", what, path, problem)
        else:
            raise DataError(f"{path}: {problem}", "re-download or remove it, or pass --skip-bad")
    if not good:
        raise DataError(f"no usable {what} files left", "check the dataset with `cloudmask data verify`")
    return good


class PatchStream:
    """Endless iterator of (x float32 (b,P,P,9), y float32 (b,P,P,1)) batches, ``steps`` per epoch.

    With ``micro_batches`` = k > 1 every batch of ``batch_size`` is yielded as k consecutive slices (for gradient
    accumulation): the sequence of patches is the same as without, and ``steps`` counts the slices.
    """

    def __init__(self, files: list[Path], geometry: Geometry, normalisation: str, batch_size: int, seed: int,
                 shuffle: bool, window_files: int = 8, read_threads: int = 2, min_finite_fraction: float = 0.5,
                 skip_bad: bool = False, start_epoch: int = 0, what: str = "training", micro_batches: int = 1):
        self.files = list(files)
        self.geometry = geometry
        self.normalisation = normalisation
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.window_files = window_files if shuffle else 1
        self.read_threads = read_threads
        self.min_finite_fraction = min_finite_fraction
        self.skip_bad = skip_bad
        self.epoch = start_epoch
        self.what = what
        self.bad: dict[Path, str] = {}
        self.error: DataError | None = None  # kept: Keras/tf.data re-wrap exceptions raised inside generators
        self.micro_batches = micro_batches
        self.patches = len(self.files) * geometry.patches_per_train_image
        self.batches = self.patches // batch_size
        self.steps = self.batches * micro_batches
        if self.batches == 0:
            raise DataError(f"{len(self.files)} {what} file(s) give {self.patches} patches, fewer than one batch of "
                            f"{batch_size}", "add files, or lower train.batch_size")

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        pool = concurrent.futures.ThreadPoolExecutor(self.read_threads, thread_name_prefix=f"read-{self.what}")
        try:
            while True:
                yield from self._epoch(pool, self.epoch)
                self.epoch += 1
        except DataError as e:
            self.error = e
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def file_order(self, epoch: int) -> list[Path]:
        if not self.shuffle:
            return list(self.files)
        rng = np.random.default_rng([self.seed, epoch])
        return [self.files[i] for i in rng.permutation(len(self.files))]

    def _load(self, path: Path):
        if path in self.bad:
            return None
        try:
            return load_train_patches(path, self.geometry, self.normalisation, self.min_finite_fraction)
        except DataError as e:
            if not self.skip_bad:
                raise
            self.bad[path] = e.message
            log.warning("skipping bad %s file: %s", self.what, e)
            return None

    def _epoch(self, pool, epoch: int):
        order = self.file_order(epoch)
        n = len(order)
        # One pass over the epoch's files; only if files were skipped as bad does the epoch continue into a
        # second pass, so that it still yields its full number of steps.
        loads = (pool.submit(self._load, p) for p in itertools.chain(order, itertools.cycle(order)))
        pending = list(itertools.islice(loads, self.read_threads + 1))
        rng = np.random.default_rng([self.seed, epoch, 1])
        carry_x = carry_y = None
        produced = consumed = 0
        while produced < self.batches:
            if len(self.bad) == n:
                raise DataError(f"every {self.what} file is bad", "check the dataset with `cloudmask data verify`")
            want = self.window_files if consumed >= n else min(self.window_files, n - consumed)
            window = []
            taken = 0
            while taken < want:
                result = pending.pop(0).result()
                pending.append(next(loads))
                consumed += 1
                taken += 1
                if result is not None:
                    window.append(result)
            if not window:
                continue
            xs = [w[0] for w in window] + ([carry_x] if carry_x is not None else [])
            ys = [w[1] for w in window] + ([carry_y] if carry_y is not None else [])
            x, y = np.concatenate(xs), np.concatenate(ys)
            if self.shuffle:
                perm = rng.permutation(len(x))
                x, y = x[perm], y[perm]
            n_full = min(len(x) // self.batch_size, self.batches - produced)
            micro = self.batch_size // self.micro_batches
            for b in range(n_full * self.micro_batches):
                sl = slice(b * micro, (b + 1) * micro)
                yield x[sl], y[sl].astype(np.float32)
            produced += n_full
            rest = slice(n_full * self.batch_size, None)
            carry_x, carry_y = (x[rest], y[rest]) if len(x[rest]) else (None, None)
        for fut in pending:
            fut.cancel()


def load_test_image(path: Path, geometry: Geometry, normalisation: str, min_finite_fraction: float):
    """One test file -> (test patches float32 (63, P, P, 9), full-size uint8 label (H, W))."""
    sample = data.read_sample(path, geometry, min_finite_fraction)
    image = preprocess.normalise(sample.image, normalisation)
    return preprocess.test_patches(image, geometry), sample.label[..., 0]
