"""The raw HDF5 files as a patch source: header screening, reading and normalising one file as the reference
does, and ``PatchStream``, the batch stream (batches.py, backend-neutral numpy batches) over them.

Memory is bounded by the shuffle window (``train.shuffle_buffer_files`` files of patches) plus the files being
read ahead, whatever the number of files: the reference instead caches every patch in RAM (~51 GB).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from ..dataset import object_storage, preprocess
from ..dataset.files import KEYS, _h5_reason, all_finite, label_of, open_hdf5, read_arrays, sample_of
from ..dataset.preprocess import Geometry
from ..errors import DataError
from ..inference.evaluate import TestImages
from .batches import BatchStream, PatchReader, StreamSettings
from .cache import SplitCache
from .row_files import DamagedRows, read_batch

log = logging.getLogger(__name__)


def load_train_patches(path: Path, geometry: Geometry, normalisation: str,
                       min_finite_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """One file -> (patches float32 (n, P, P, 9), labels uint8 (n, P, P, 1)), normalised as the reference does
    (whole image first, then crop). A finite file with the fixed normalisation takes the one-pass route, with
    the same bits (tests/test_pipeline.py)."""
    arrays = read_arrays(path, geometry, _buffers())
    if normalisation == "fixed" and all_finite(arrays):
        label = preprocess.train_patches(label_of(arrays["bayes"]), geometry)
        # the buffers are this thread's scratch: nothing read into them outlives this call
        return preprocess.fixed_train_patches(arrays["refs"], arrays["bts"], geometry, overwrite_input=True), label
    sample = sample_of(path, arrays, min_finite_fraction)
    image = preprocess.normalise(sample.image, normalisation)
    return preprocess.train_patches(image, geometry), preprocess.train_patches(sample.label, geometry)


def load_normalised_image(path: Path, geometry: Geometry, normalisation: str,
                          min_finite_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """One file -> (normalised image float32 (H, W, 9), label uint8 (H, W)), for inference."""
    arrays = read_arrays(path, geometry, _buffers())
    if normalisation == "fixed" and all_finite(arrays):
        image = np.empty((geometry.height, geometry.width, preprocess.N_CHANNELS), np.float32)
        preprocess.normalise_fixed_into(arrays["refs"], arrays["bts"], image)
        return image, label_of(arrays["bayes"])[..., 0]
    sample = sample_of(path, arrays, min_finite_fraction)
    return preprocess.normalise(sample.image, normalisation), sample.label[..., 0]


_scratch = threading.local()


def _buffers() -> dict:
    """This thread's read buffers (data.read_arrays), reused file after file."""
    if not hasattr(_scratch, "buffers"):
        _scratch.buffers = {}
    return _scratch.buffers


def quick_check(path: Path, geometry: Geometry) -> str | None:
    """Header-only check (keys, shapes, dtypes) so a bad file is found before training starts, in milliseconds."""
    try:
        with open_hdf5(path) as f:
            for key, channels in KEYS.items():
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
        return f"not a readable HDF5 file ({_h5_reason(e)})"
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


@dataclass(frozen=True)
class RawReading:
    """How a raw file becomes patches: the geometry, the normalisation, the finite-value screen, and whether a
    bad file is skipped (True) or an error."""

    geometry: Geometry
    normalisation: str = "fixed"
    min_finite_fraction: float = 0.5
    skip_bad: bool = False

    @classmethod
    def from_config(cls, cfg) -> "RawReading":
        return cls(Geometry.from_config(cfg), cfg.data.normalisation, cfg.data.min_finite_fraction, cfg.data.skip_bad)


class RawFiles:
    """The training patches of a list of HDF5 files, ``per_file`` of each, loaded a whole file at a time. A file
    that turns out to be bad is remembered in ``bad`` (with ``skip_bad``; otherwise its DataError is raised).
    ``cache`` (cache.SplitCache of these files): served from it once complete, filled while it is not."""

    def __init__(self, files: list[Path], reading: RawReading, read_threads: int = 2, what: str = "training",
                 cache: SplitCache | None = None):
        self.files = list(files)
        self.cache = cache
        self.reading, self.read_threads, self.what = reading, read_threads, what
        self.n_files = len(self.files)
        self.per_file, self.patch = reading.geometry.patches_per_train_image, reading.geometry.patch
        self.bad: dict[Path, str] = {}

    def load(self, index: int):
        """(patches, labels) of file ``index``, or None for a bad file when bad files are skipped."""
        path = self.files[index]
        if path in self.bad:
            return None
        cached = self.cache.get(index) if self.cache is not None else None
        if cached is not None:
            return cached
        try:
            r = self.reading
            patches = load_train_patches(path, r.geometry, r.normalisation, r.min_finite_fraction)
        except DataError as e:
            if self.cache is not None:
                self.cache.abandon(f"{path} is bad")
            # the store failed, not the file: never a reason to skip it
            if not self.reading.skip_bad or isinstance(e, object_storage.StorageError):
                raise
            self.bad[path] = e.message
            log.warning("skipping bad %s file: %s", self.what, e)
            return None
        if self.cache is not None:
            self.cache.put(index, *patches)
        return patches

    def complete_cache(self) -> None:
        """Read the files the first epoch did not need (the dropped remainder), so its cache is complete."""
        for index in self.cache.missing() if self.cache is not None else []:
            self.load(index)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def reader(self) -> "_RawReader":
        return _RawReader(self)


class _RawReader(PatchReader):
    """Reads the epoch's files ``read_threads`` at a time ahead of the batch order, and keeps the loaded files
    whose patches are still to be served. An epoch that starts with the files' cache complete reads every
    batch's patches straight from it instead, split over the threads (no per-file copy)."""

    def __init__(self, source: RawFiles):
        self.source = source
        self.pool = concurrent.futures.ThreadPoolExecutor(source.read_threads,
                                                          thread_name_prefix=f"read-{source.what}")
        self.pending: deque = deque()
        self.loaded: dict[int, tuple] = {}
        self.files: Iterator[int] = iter(())
        self.cached = False

    def start_epoch(self, files: Iterator[int]) -> None:
        self._cancel()
        self.loaded.clear()
        self.files = files
        self.cached = self.source.cache is not None and self.source.cache.complete
        for _ in range(0 if self.cached else self.source.read_threads + 1):
            self._submit()

    def _submit(self) -> None:
        index = next(self.files)
        self.pending.append((index, self.pool.submit(self.source.load, index)))

    def usable(self, file: int) -> bool:
        if self.cached:
            return True  # a complete cache holds every file: none was bad
        index, future = self.pending.popleft()
        assert index == file, (index, file)  # the batch order asks in the order of file_sequence
        self._submit()
        result = future.result()
        if result is not None:
            self.loaded[file] = result
        return result is not None

    def read(self, patches: np.ndarray):
        if self.cached:
            return self._read_cached(patches)
        return self._read_loaded(patches)

    def _read_loaded(self, patches: np.ndarray):
        per = self.source.per_file
        first_x, first_y = self.loaded[int(patches[0]) // per]
        x = np.empty((len(patches), *first_x.shape[1:]), first_x.dtype)
        y = np.empty((len(patches), *first_y.shape[1:]), np.float32)
        for k, p in enumerate(patches):
            fx, fy = self.loaded[int(p) // per]
            x[k], y[k] = fx[p % per], fy[p % per]
        return x, y

    def _read_cached(self, patches: np.ndarray):
        cache = self.source.cache
        if cache.complete:
            try:
                x, y = read_batch(cache.row_files(), patches, self.pool, self.source.read_threads)
                return x, y.astype(np.float32)
            except DamagedRows as e:
                cache.damaged(e)
        # the entry was found damaged this epoch: its files are read from HDF5 (kept while the order needs them)
        per = self.source.per_file
        for file in sorted({int(p) // per for p in patches} - set(self.loaded)):
            self.loaded[file] = self.source.load(file)
        return self._read_loaded(patches)

    def end_epoch(self) -> None:
        self.source.complete_cache()

    def release(self, keep: set[int]) -> None:
        for file in [f for f in self.loaded if f not in keep]:
            del self.loaded[file]

    def _cancel(self) -> None:
        while self.pending:
            self.pending.popleft()[1].cancel()

    def close(self) -> None:
        self._cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)


class PatchStream(BatchStream):
    """Endless (x float32 (b,P,P,9), y float32 (b,P,P,1)) batches of raw HDF5 files in the batch order."""

    def __init__(self, files: list[Path], reading: RawReading, settings: StreamSettings, what: str = "training",
                 cache: SplitCache | None = None):
        super().__init__(RawFiles(files, reading, settings.read_threads, what, cache), settings, what)

    @property
    def bad(self) -> dict[Path, str]:
        return self.source.bad


def hdf5_test_images(test_dir: Path, files: list[Path], reading: RawReading,
                     cache: SplitCache | None = None) -> TestImages:
    """Raw test files for evaluate(), read and normalised as the reference does; through ``cache`` (of exactly
    these files) when given."""
    index = {path: i for i, path in enumerate(files)}
    g = reading.geometry

    def load(path: Path):
        i = index.get(path)
        cached = cache.get(i) if cache is not None and i is not None else None
        if cached is None:
            cached = load_normalised_image(path, g, reading.normalisation, reading.min_finite_fraction)
            if cache is not None and i is not None:
                cache.put(i, *cached)
        return preprocess.test_patches(cached[0], g), cached[1]

    return TestImages(test_dir, files, load, cache)
