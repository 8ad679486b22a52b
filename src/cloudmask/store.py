"""The patch store: the dataset converted once (``cloudmask data prepare``) into memory-mappable arrays, so
training reads ready patches instead of re-parsing 163 GB of HDF5 every epoch.

Layout of a store directory (one directory: stage it to node-local disk with a single copy)::

    store.json     format, normalisation, geometry, file split, file lists, source manifest digest, counts
    train_x.npy    (N, P, P, 9) float16   normalised, cropped training patches, file after file, row-major
    train_y.npy    (N, P, P, 1) uint8     their labels (1 = cloud)
    val_x.npy      (V, P, P, 9) float16   validation patches (the reference's file split)
    val_y.npy      (V, P, P, 1) uint8
    test_x.npy     (M, H, W, 9) float16   normalised full test images
    test_y.npy     (M, H, W)    uint8     their labels

``.npy`` arrays are contiguous per patch (1.2 MB at the default size), so a patch is one read. Readers use
``os.pread`` from a thread pool (it releases the GIL, unlike copying out of a memory map), so reads run in
parallel and memory stays at a few batches whatever the dataset size. ``store.json`` is written last and the
directory is built under a temporary name, so a half-written store is never used.

float16 keeps ~3 significant digits: the normalised inputs (about -3..3) change by at most ~1e-3, which moves
training losses in the third or fourth decimal (tests/test_store.py states the tolerance).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from . import data, fileio, preprocess
from .errors import DataError
from .preprocess import N_CHANNELS, Geometry

log = logging.getLogger(__name__)

FORMAT = 1
META = "store.json"
ARRAYS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


# ------------------------------------------------------------------------------------------------ prepare


def _geometry_dict(g: Geometry) -> dict:
    return {"height": g.height, "width": g.width, "patch_size": g.patch, "overlap": g.overlap}


def _geometry(meta: dict) -> Geometry:
    m = meta["geometry"]
    return Geometry(m["height"], m["width"], m["patch_size"], m["overlap"])


def prepare(raw_root: str | os.PathLike, store_dir: str | os.PathLike, cfg, jobs: int = 2, progress=None) -> dict:
    """Convert the dataset at ``raw_root`` into a store at ``store_dir`` (which must not exist)."""
    from . import pipeline

    store_dir = Path(store_dir)
    if store_dir.exists():
        raise DataError(f"{store_dir}: already exists", "choose a new store directory (stores are never overwritten)")
    g = Geometry.from_config(cfg)
    layout = data.resolve_layout(str(raw_root))
    files = data.find_files(layout.train_dir)
    train_files, val_files = data.split_files(files, cfg.data.train_split, cfg.data.split_seed)
    test_files = data.find_files(layout.test_dir)
    for what, group in (("training", train_files), ("validation", val_files), ("test", test_files)):
        pipeline.screen_files(group, g, skip_bad=False, what=what)
    per = g.patches_per_train_image
    shapes = {"train_x": ((len(train_files) * per, g.patch, g.patch, N_CHANNELS), np.float16),
              "train_y": ((len(train_files) * per, g.patch, g.patch, 1), np.uint8),
              "val_x": ((len(val_files) * per, g.patch, g.patch, N_CHANNELS), np.float16),
              "val_y": ((len(val_files) * per, g.patch, g.patch, 1), np.uint8),
              "test_x": ((len(test_files), g.height, g.width, N_CHANNELS), np.float16),
              "test_y": ((len(test_files), g.height, g.width), np.uint8)}
    store_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = store_dir.with_name(f".{store_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        arrays = {k: np.lib.format.open_memmap(tmp / f"{k}.npy", "w+", dtype, shape) for k, (shape, dtype) in
                  shapes.items()}
        jobs_list = ([("train", i, f) for i, f in enumerate(train_files)] + [("val", i, f) for i, f in
                     enumerate(val_files)] + [("test", i, f) for i, f in enumerate(test_files)])

        def convert(job):
            split, i, path = job
            sample = data.read_sample(path, g, cfg.data.min_finite_fraction)
            image = preprocess.normalise(sample.image, cfg.data.normalisation)
            if split == "test":
                arrays["test_x"][i] = image.astype(np.float16)
                arrays["test_y"][i] = sample.label[..., 0]
            else:
                arrays[f"{split}_x"][i * per:(i + 1) * per] = preprocess.train_patches(image, g).astype(np.float16)
                arrays[f"{split}_y"][i * per:(i + 1) * per] = preprocess.train_patches(sample.label, g)
            return path

        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            for n, _ in enumerate(pool.map(convert, jobs_list), 1):
                if progress:
                    progress(n, len(jobs_list))
        for a in arrays.values():
            a.flush()
        arrays.clear()
        train_root = layout.train_dir.parent if layout.naming != "explicit" else None
        meta = {"format": FORMAT, "normalisation": cfg.data.normalisation, "dtype": "float16",
                "geometry": _geometry_dict(g),
                "split": {"train_split": cfg.data.train_split, "split_seed": cfg.data.split_seed},
                "min_finite_fraction": cfg.data.min_finite_fraction,
                "source": {"root": str(Path(raw_root).resolve()), "naming": layout.naming,
                           "manifest_sha256": data.manifest_digest(train_root) if train_root else None},
                "files": {"train": [p.relative_to(layout.train_dir).as_posix() for p in train_files],
                          "val": [p.relative_to(layout.train_dir).as_posix() for p in val_files],
                          "test": [p.relative_to(layout.test_dir).as_posix() for p in test_files]},
                "counts": {k: shapes[k][0][0] for k in ("train_x", "val_x", "test_x")},
                "prepare_s": round(time.perf_counter() - t0, 3)}
        fileio.write_json(tmp / META, meta)
        tmp.rename(store_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


# ------------------------------------------------------------------------------------------------- open


class ArrayFile:
    """A ``.npy`` array read by rows with ``os.pread`` (thread-safe, GIL released during the read)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._open_header(path)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable array ({e})", "copy or prepare the store again") from None
        self.fd = os.open(path, os.O_RDONLY)

    def _open_header(self, path: Path) -> None:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran:
            raise DataError(f"{path}: Fortran-ordered array", "prepare the store again")
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.row_bytes = int(np.prod(shape[1:])) * self.dtype.itemsize
        expected = self.offset + self.row_bytes * shape[0]
        if path.stat().st_size < expected:
            raise DataError(f"{path}: truncated ({path.stat().st_size} of {expected} bytes)",
                            "copy or prepare the store again")

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, rows, out: np.ndarray | None = None) -> np.ndarray:
        rows = np.asarray(rows)
        out = np.empty((len(rows), *self.shape[1:]), self.dtype) if out is None else out
        view = out.reshape(len(rows), -1).view(np.uint8)
        for k, r in enumerate(rows):
            buf = os.pread(self.fd, self.row_bytes, self.offset + int(r) * self.row_bytes)
            view[k] = np.frombuffer(buf, np.uint8)
        return out

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Store:
    path: Path
    meta: dict

    def array(self, name: str) -> ArrayFile:
        return ArrayFile(self.path / f"{name}.npy")

    def files(self, split: str) -> list[str]:
        return list(self.meta["files"][split])


def open_store(path: str | os.PathLike, cfg) -> Store:
    """Open a store and check it matches the run's config (geometry, normalisation, split)."""
    path = Path(path).expanduser()
    meta_file = path / META
    if not meta_file.is_file():
        hint = "it is incomplete: prepare it again" if path.is_dir() else "check the path"
        raise DataError(f"{path}: not a patch store (no {META})", f"{hint} (`cloudmask data prepare RAW STORE`)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{meta_file}: unreadable ({e})", "prepare the store again") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: store format {meta.get('format')}, this version reads {FORMAT}",
                        "prepare the store again with this version")
    g = Geometry.from_config(cfg)
    wanted = {"normalisation": cfg.data.normalisation,
              "geometry": _geometry_dict(g),
              "split": {"train_split": cfg.data.train_split, "split_seed": cfg.data.split_seed}}
    for key, value in wanted.items():
        if meta.get(key) != value:
            raise DataError(f"{path}: prepared with {key} {meta.get(key)}, the config asks for {value}",
                            "prepare a store with this config, or train from the raw files")
    for name in ARRAYS:
        if not (path / f"{name}.npy").is_file():
            raise DataError(f"{path / (name + '.npy')}: missing", "copy or prepare the store again")
        ArrayFile(path / f"{name}.npy").close()  # header and size: a truncated copy fails here, before any run
    return Store(path, meta)


# ------------------------------------------------------------------------------------------------ reading


def window_order(n_files: int, per_file: int, batch_size: int, batches: int, seed: int, epoch: int,
                 window_files: int) -> np.ndarray:
    """The patch order of the streaming pipeline (pipeline.PatchStream with shuffle, no bad files), as indices
    into the file-major patch array: the same seeded file permutation, windows and in-window shuffles."""
    files = np.random.default_rng([seed, epoch]).permutation(n_files)
    rng = np.random.default_rng([seed, epoch, 1])
    out, carry, produced, consumed = [], np.empty(0, np.int64), 0, 0
    while produced < batches:
        want = window_files if consumed >= n_files else min(window_files, n_files - consumed)
        window = [files[(consumed + k) % n_files] for k in range(want)]
        consumed += want
        idx = np.concatenate([np.arange(f * per_file, (f + 1) * per_file) for f in window] + [carry])
        idx = idx[rng.permutation(len(idx))]
        n_full = min(len(idx) // batch_size, batches - produced)
        out.append(idx[: n_full * batch_size])
        produced += n_full
        carry = idx[n_full * batch_size:]
    return np.concatenate(out)


class StoreStream:
    """Endless (x float16, y float32) batches from a store split, ``steps`` per epoch: the same interface and,
    with ``order="window"``, the same patch order as pipeline.PatchStream on the raw files. ``order="global"``
    draws a fresh permutation of all patches every epoch (a deliberate deviation: statistically better).

    ``shard=(index, count)``: one of ``count`` workers training together; every global batch is cut into
    ``count`` equal row ranges and only range ``index`` is read, so the workers read disjoint rows and together
    see exactly the batches one worker would."""

    def __init__(self, store: Store, split: str, batch_size: int, seed: int, shuffle: bool, order: str = "window",
                 window_files: int = 8, read_threads: int = 4, start_epoch: int = 0, micro_batches: int = 1,
                 prefetch: int = 2, resident: str = "none", shard: tuple[int, int] = (0, 1)):
        self.x, self.y = store.array(f"{split}_x"), store.array(f"{split}_y")
        self.per_file = _geometry(store.meta).patches_per_train_image
        self.n_files = len(store.files(split))
        self.batch_size, self.seed, self.shuffle, self.order = batch_size, seed, shuffle, order
        self.window_files, self.read_threads, self.prefetch = window_files, read_threads, prefetch
        self.epoch, self.micro_batches = start_epoch, micro_batches
        self.patches = len(self.x)
        self.batches = self.patches // batch_size
        self.steps = self.batches * micro_batches
        self.error: DataError | None = None
        self.what = split
        self.resident = resident
        self.shard = shard
        self._resident = None
        if resident in ("host", "device"):  # the whole split in RAM as float16 (18 GB for the full training set)
            self._resident = (self.x.read(np.arange(self.patches)), self.y.read(np.arange(self.patches)))
        self._device = None
        if self.batches == 0:
            raise DataError(f"the store's {split} split has {self.patches} patches, fewer than one batch of "
                            f"{batch_size}", "lower train.batch_size")

    def epoch_order(self, epoch: int) -> np.ndarray:
        n = self.batches * self.batch_size
        if not self.shuffle:
            return np.arange(n)
        if self.order == "global":
            return np.random.default_rng([self.seed, epoch, 2]).permutation(self.patches)[:n]
        return window_order(self.n_files, self.per_file, self.batch_size, self.batches, self.seed, epoch,
                            self.window_files)

    def _device_arrays(self):
        """The split as backend tensors on the default device (the GPU when there is one), made once."""
        if self._device is None:
            import keras

            x, y = self._resident
            self._device = (keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y))
            self._resident = None  # the host copy is no longer needed
        return self._device

    def _read(self, rows: np.ndarray):
        # x stays float16: the model casts it on the device (half the bytes to move, no host-side conversion)
        if self.resident == "device":
            import keras

            x, y = self._device_arrays()
            return keras.ops.take(x, rows, axis=0), keras.ops.cast(keras.ops.take(y, rows, axis=0), "float32")
        if self._resident is not None:
            return self._resident[0][rows], self._resident[1][rows].astype(np.float32)
        # split one batch over the threads: each reads a slice of rows with its own preads
        parts = np.array_split(np.arange(len(rows)), max(1, min(self.read_threads, len(rows))))
        x = np.empty((len(rows), *self.x.shape[1:]), np.float16)
        y = np.empty((len(rows), *self.y.shape[1:]), np.uint8)
        list(self._pool.map(lambda p: (self.x.read(rows[p], x[p[0]:p[-1] + 1]),
                                       self.y.read(rows[p], y[p[0]:p[-1] + 1])), [p for p in parts if len(p)]))
        return x, y.astype(np.float32)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        self._pool = concurrent.futures.ThreadPoolExecutor(self.read_threads, thread_name_prefix=f"store-{self.what}")
        loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"prefetch-{self.what}")
        micro = self.batch_size // self.micro_batches
        try:
            while True:
                order = self.epoch_order(self.epoch).reshape(self.batches, self.shard[1], -1)[:, self.shard[0]]
                pending = [loader.submit(self._read, order[b]) for b in range(min(self.prefetch, self.batches))]
                for b in range(self.batches):
                    x, y = pending.pop(0).result()
                    if b + len(pending) + 1 < self.batches:
                        pending.append(loader.submit(self._read, order[b + len(pending) + 1]))
                    for m in range(self.micro_batches):
                        yield x[m * micro:(m + 1) * micro], y[m * micro:(m + 1) * micro]
                self.epoch += 1
        finally:
            loader.shutdown(wait=False, cancel_futures=True)
            self._pool.shutdown(wait=False, cancel_futures=True)


def test_loader(store: Store):
    """(files, load) for evaluate(): file paths named like the raw test files, loaded from test_x/test_y."""
    x, y = store.array("test_x"), store.array("test_y")
    names = store.files("test")
    index = {name: i for i, name in enumerate(names)}
    g = _geometry(store.meta)
    root = store.path / "test"

    def load(path: Path):
        i = index[path.relative_to(root).as_posix()]
        image = x.read([i])[0].astype(np.float32)
        return preprocess.test_patches(image, g), y.read([i])[0]

    return root, [root / n for n in names], load


def stage(path: Path, dest: str | os.PathLike) -> tuple[Path, "data.Staging"]:
    """Copy a store to node-local disk (``dest``/<store name>), keeping files already there with the same size
    and time stamp; ``store.json`` is copied last, so an interrupted copy is never opened as a store."""
    t0 = time.perf_counter()
    target = Path(dest).expanduser() / path.name
    files = copied = size = 0
    try:
        for name in [f"{a}.npy" for a in ARRAYS] + [META]:
            files += 1
            size += (path / name).stat().st_size
            copied += fileio.copy_if_changed(path / name, target / name)
    except OSError as e:
        raise DataError(f"{target}: cannot stage the store there ({e.strerror or e})",
                        "free space on the node-local disk or stage elsewhere (--stage-to DIR)") from None
    return target, data.Staging(target, files, copied, size, time.perf_counter() - t0)
