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
    *.crc32.npy    a CRC-32 per row of each array, checked on every read (row_files.py)

``.npy`` arrays are contiguous per patch (1.2 MB at the default size), so a patch is one read. Readers use
``os.preadv`` from a thread pool (rows.py: it releases the GIL, unlike copying out of a memory map), so reads run in
parallel and memory stays at a few batches whatever the dataset size. ``store.json`` is written last and the
directory is built under a temporary name, so a half-written store is never used.

float16 keeps ~3 significant digits: the normalised inputs (about -3..3) change by at most ~1e-3, which moves
training losses in the third or fourth decimal (tests/test_store.py states the tolerance).

The same arrays can be written in Zarr v3 instead (``--format zarr``, zarr_arrays.py), on a local disk or on
object storage (``s3://bucket/prefix``): then the store is read in place by every worker, and ``store.json``
(``"arrays": "zarr"``) is still written last, so a store whose writing stopped is refused.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import fileio
from ..dataset import checksums, object_storage, preprocess
from ..dataset.files import Staging, find_files, resolve_layout, split_files
from ..dataset.preprocess import N_CHANNELS, Geometry
from ..errors import DataError
from ..inference.evaluate import TestImages
from . import hdf5_source, row_files, zarr_arrays
from .batches import BatchStream, PatchReader, StreamSettings
from .row_files import RowFile, read_batch

log = logging.getLogger(__name__)

FORMAT = 2  # 2: CRC-32 sidecars
META = "store.json"
ARRAYS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
ARRAY_FORMATS = ("npy", "zarr")


# ------------------------------------------------------------------------------------------------ prepare


def _geometry_dict(g: Geometry) -> dict:
    return {"height": g.height, "width": g.width, "patch_size": g.patch, "overlap": g.overlap}


def _geometry(meta: dict) -> Geometry:
    m = meta["geometry"]
    return Geometry(m["height"], m["width"], m["patch_size"], m["overlap"])


def prepare(raw_root: str | os.PathLike, store_dir: str | os.PathLike, cfg, jobs: int = 2, progress=None,
            array_format: str = "auto") -> dict:
    """Convert the dataset at ``raw_root`` into a store at ``store_dir`` (which must not exist). ``array_format``:
    npy | zarr | auto (zarr on object storage, npy on a file system: the faster there, docs/performance.md)."""
    store_dir = object_storage.location(store_dir)
    if array_format == "auto":
        array_format = "zarr" if object_storage.is_remote(store_dir) else "npy"
    if array_format == "npy" and object_storage.is_remote(store_dir):
        raise DataError(f"{store_dir}: an .npy store needs a file system", "use --format zarr for object storage")
    with object_storage.errors(store_dir):
        if store_dir.exists():
            raise DataError(f"{store_dir}: already exists",
                            "choose a new store directory (stores are never overwritten)")
    g = Geometry.from_config(cfg)
    layout = resolve_layout(raw_root)
    train_files, val_files = split_files(find_files(layout.train_dir), cfg.data.train_split,
                                              cfg.data.split_seed)
    splits = {"train": train_files, "val": val_files, "test": find_files(layout.test_dir)}
    for what, group in zip(("training", "validation", "test"), splits.values()):
        hdf5_source.screen_files(group, g, skip_bad=False, what=what)
    t0 = time.perf_counter()
    if object_storage.is_remote(store_dir):
        return _prepare_in_place(store_dir, splits, g, cfg, raw_root, layout, jobs, progress, t0)
    try:
        with fileio.atomic_dir(store_dir) as tmp:
            counts = _convert(splits, g, cfg, tmp, jobs, progress, array_format)
            meta = _metadata(cfg, g, raw_root, layout, splits, counts, time.perf_counter() - t0, array_format)
            fileio.write_json(tmp / META, meta)  # last: a store without it is never opened
    except FileExistsError:
        raise DataError(f"{store_dir}: appeared while it was being prepared",
                        "another process prepares the same store; use its store or choose a new directory") from None
    return meta


def _prepare_in_place(store_dir, splits, g: Geometry, cfg, raw_root, layout, jobs: int, progress, t0) -> dict:
    """Object storage has no rename: the arrays are written where they stay and ``store.json`` is put last, as
    one object, so a reader sees either no store or a whole one. A failed write removes what it wrote."""
    try:
        counts = _convert(splits, g, cfg, store_dir, jobs, progress, "zarr")
        meta = _metadata(cfg, g, raw_root, layout, splits, counts, time.perf_counter() - t0, "zarr")
        with object_storage.errors(store_dir):
            (store_dir / META).write_text(json.dumps(meta, indent=2))
    except BaseException:
        with contextlib.suppress(Exception):
            store_dir.fs.rm(store_dir.path, recursive=True)
        raise
    return meta


def _convert(splits: dict[str, list[Path]], g: Geometry, cfg, out: Path, jobs: int, progress,
             array_format: str) -> dict[str, int]:
    """Every file of every split into ``out``'s arrays, ``jobs`` files at a time; the arrays' row counts."""
    per = g.patches_per_train_image
    rows = {"train": len(splits["train"]) * per, "val": len(splits["val"]) * per, "test": len(splits["test"])}
    shapes = {"train_x": ((rows["train"], g.patch, g.patch, N_CHANNELS), np.float16),
              "train_y": ((rows["train"], g.patch, g.patch, 1), np.uint8),
              "val_x": ((rows["val"], g.patch, g.patch, N_CHANNELS), np.float16),
              "val_y": ((rows["val"], g.patch, g.patch, 1), np.uint8),
              "test_x": ((rows["test"], g.height, g.width, N_CHANNELS), np.float16),
              "test_y": ((rows["test"], g.height, g.width), np.uint8)}
    if array_format == "zarr":  # one shard per source file (zarr_arrays.py)
        arrays = zarr_arrays.create(out, shapes, {k: 1 if k.startswith("test") else per for k in shapes})
    else:
        arrays = {k: np.lib.format.open_memmap(out / f"{k}.npy", "w+", dtype, shape) for k, (shape, dtype) in
                  shapes.items()}
    jobs_list = [(split, i, path) for split, files in splits.items() for i, path in enumerate(files)]

    def convert(job):  # the raw pipeline's own loaders, so a store holds what streaming would train on
        split, i, path = job
        if split == "test":
            image, label = hdf5_source.load_normalised_image(path, g, cfg.data.normalisation,
                                                          cfg.data.min_finite_fraction)
            arrays["test_x"][i], arrays["test_y"][i] = image.astype(np.float16), label
        else:
            x, y = hdf5_source.load_train_patches(path, g, cfg.data.normalisation, cfg.data.min_finite_fraction)
            arrays[f"{split}_x"][i * per:(i + 1) * per] = x.astype(np.float16)
            arrays[f"{split}_y"][i * per:(i + 1) * per] = y

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for n, _ in enumerate(pool.map(convert, jobs_list), 1):
            if progress:
                progress(n, len(jobs_list))
    for name, a in arrays.items():
        if hasattr(a, "flush"):
            a.flush()
            row_files.seal(out / f"{name}.npy")
    return {f"{split}_x": n for split, n in rows.items()}


def _metadata(cfg, g: Geometry, raw_root, layout, splits: dict[str, list[Path]], counts: dict, seconds: float,
              array_format: str) -> dict:
    train_root = layout.train_dir.parent if layout.naming != "explicit" else None
    raw_root = object_storage.location(raw_root)
    relative = {"train": layout.train_dir, "val": layout.train_dir, "test": layout.test_dir}
    return {"format": FORMAT, "arrays": array_format, "normalisation": cfg.data.normalisation, "dtype": "float16",
            "geometry": _geometry_dict(g),
            "split": {"train_split": cfg.data.train_split, "split_seed": cfg.data.split_seed},
            "min_finite_fraction": cfg.data.min_finite_fraction,
            "source": {"root": str(raw_root if object_storage.is_remote(raw_root) else raw_root.resolve()),
                       "naming": layout.naming,
                       "manifest_sha256": checksums.checksums_digest(train_root) if train_root else None},
            "files": {split: [p.relative_to(relative[split]).as_posix() for p in files]
                      for split, files in splits.items()},
            "counts": counts,
            "prepare_s": round(seconds, 3)}


def replicate(src: str | os.PathLike, dst: str | os.PathLike, n_files: dict[str, int], progress=None) -> dict:
    """A store of ``n_files[split]`` files per split made of repeated copies of ``src``'s files: the full dataset's
    size (memory, epoch time, energy) without its 180 GB. The patches repeat, so its accuracies mean little.
    Copies are named ``<stem>-copyNNNN<suffix>`` so masks and logs stay one per file."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    meta = _load_meta(src)
    if _array_format(meta) != "npy":
        raise DataError(f"{src}: replicate copies .npy stores", "prepare the source with --format npy")
    if dst.exists():
        raise DataError(f"{dst}: already exists", "choose a new store directory (stores are never overwritten)")
    for split in n_files:
        if not meta["files"][split]:
            raise DataError(f"{src}: no {split} files to replicate", "prepare the source store from more files")
    patches = _geometry(meta).patches_per_train_image
    per = {"train": patches, "val": patches, "test": 1}
    sources = {name: np.load(src / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
    done, total = 0, sum(n_files.values())
    with fileio.atomic_dir(dst) as tmp:
        for split, n in n_files.items():
            k, r = len(meta["files"][split]), per[split]
            for part in ("x", "y"):
                a = sources[f"{split}_{part}"]
                out = np.lib.format.open_memmap(tmp / f"{split}_{part}.npy", "w+", a.dtype, (n * r, *a.shape[1:]))
                for i in range(n):
                    j = i % k
                    out[i * r:(i + 1) * r] = a[j * r:(j + 1) * r]
                out.flush()
                del out
                crc = np.load(row_files.checksum_path(src / f"{split}_{part}.npy"))  # the copies' rows are the same
                np.save(row_files.checksum_path(tmp / f"{split}_{part}.npy"), np.resize(crc[:k * r], n * r))
            done += n
            if progress:
                progress(done, total)
        files = {s: _copies(names, n_files.get(s)) for s, names in meta["files"].items()}
        meta = {**meta, "files": files, "counts": {f"{s}_x": len(names) * per[s] for s, names in files.items()},
                "replicated_from": {"store": str(src.resolve()),
                                    "files": {s: len(v) for s, v in meta["files"].items()}}}
        fileio.write_json(tmp / META, meta)
    return meta


def _copies(names: list[str], n: int | None) -> list[str]:
    """``n`` unique names cycling over ``names`` (``names`` itself when n is None)."""
    if n is None:
        return list(names)
    out = []
    for i in range(n):
        path = Path(names[i % len(names)])
        out.append(path.with_name(f"{path.stem}-copy{i // len(names):04d}{path.suffix}").as_posix())
    return out


# ------------------------------------------------------------------------------------------------- open


@dataclass
class Store:
    path: Path  # or a remote path (remote.py)
    meta: dict
    _zarr: dict | None = None

    @property
    def array_format(self) -> str:
        return _array_format(self.meta)

    def array(self, name: str):
        """Array ``name`` by row: a rows.RowFile (.npy) or a zarr_arrays.ZarrRows."""
        if self.array_format == "zarr":
            if self._zarr is None:
                self._zarr = zarr_arrays.open_arrays(self.path, ARRAYS, self.row_counts())
            return self._zarr[name]
        return RowFile.open(self.path / f"{name}.npy", fix="copy or prepare the store again")

    def row_counts(self) -> dict[str, int]:
        """Rows of every array: store.json's counts (of the x arrays; each y has as many)."""
        return {name: self.meta["counts"][name[:-1] + "x"] for name in ARRAYS}

    def files(self, split: str) -> list[str]:
        return list(self.meta["files"][split])


def _array_format(meta: dict) -> str:
    return meta.get("arrays", "npy")  # stores written before Zarr existed hold .npy arrays


def _load_meta(path: Path) -> dict:
    meta_file = path / META
    with object_storage.errors(path):
        found = meta_file.is_file()
        if not found:
            hint = "it is incomplete: prepare it again" if path.is_dir() else "check the path"
            raise DataError(f"{path}: not a patch store (no {META})",
                            f"{hint} (`cloudmask data prepare RAW STORE`)")
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as e:
            if isinstance(e, OSError) and object_storage.is_remote(path):
                raise  # said by remote.errors
            raise DataError(f"{meta_file}: unreadable ({e})", "prepare the store again") from None
    if meta.get("format") != FORMAT or _array_format(meta) not in ARRAY_FORMATS:
        raise DataError(f"{path}: store format {meta.get('format')} ({_array_format(meta)} arrays), this version "
                        f"reads {FORMAT} (.npy or Zarr)", "prepare the store again with this version")
    files, counts = meta.get("files"), meta.get("counts")
    if not all(isinstance(files, dict) and isinstance(files.get(s), list) and isinstance(counts, dict)
               and isinstance(counts.get(f"{s}_x"), int) for s in ("train", "val", "test")):
        raise DataError(f"{meta_file}: no file list or row count for every split", "prepare the store again")
    return meta


def open_store(path: str | os.PathLike, cfg) -> Store:
    """Open a store and check it matches the run's config (geometry, normalisation, split)."""
    path = object_storage.location(path)
    meta = _load_meta(path)
    g = Geometry.from_config(cfg)
    wanted = {"normalisation": cfg.data.normalisation,
              "geometry": _geometry_dict(g),
              "split": {"train_split": cfg.data.train_split, "split_seed": cfg.data.split_seed}}
    for key, value in wanted.items():
        if meta.get(key) != value:
            raise DataError(f"{path}: prepared with {key} {meta.get(key)}, the config asks for {value}",
                            "prepare a store with this config, or train from the raw files")
    store = Store(path, meta)
    if store.array_format == "zarr":
        store.array("train_x")  # opens and checks every array
        return store
    per = {"train": g.patches_per_train_image, "val": g.patches_per_train_image, "test": 1}
    for name in ARRAYS:
        if not (path / f"{name}.npy").is_file():
            raise DataError(f"{path / (name + '.npy')}: missing", "copy or prepare the store again")
        array = store.array(name)  # header, size and checksums: a damaged copy fails here, before any run
        array.close()
        split = name.split("_")[0]
        listed = len(store.files(split)) * per[split]
        if not len(array) == store.row_counts()[name] == listed:
            raise DataError(f"{path / (name + '.npy')}: {len(array)} rows, but {META} counts "
                            f"{store.row_counts()[name]} and lists {len(store.files(split))} {split} files "
                            f"({listed} rows)", "the store was altered: copy or prepare it again")
    return store


# ------------------------------------------------------------------------------------------------ reading


_kvikio_said: set = set()


def _kvikio_usable(store: Store) -> bool:
    """Whether a Zarr store is read through kvikIO; the reason why not is logged once per store."""
    import keras

    reason = zarr_arrays.kvikio_reason(store.path, keras.config.backend())
    if str(store.path) not in _kvikio_said:
        _kvikio_said.add(str(store.path))
        if reason:
            log.info("Zarr store read through the CPU: %s", reason)
        else:
            log.info("Zarr store read with kvikIO into GPU memory")
    return reason is None


class StoreSplit:
    """The patches of one split of a store as a patch source (batches.py). ``resident``: ``host`` reads the whole
    split into RAM once (float16: 18 GB for the full training set), ``device`` then moves it into the
    accelerator's memory, so batches are gathered there; ``none`` reads every batch with ``pread``."""

    def __init__(self, store: Store, split: str, read_threads: int = 4, resident: str = "none"):
        self.x, self.y = store.array(f"{split}_x"), store.array(f"{split}_y")
        self.n_files = len(store.files(split))
        self.per_file = _geometry(store.meta).patches_per_train_image
        self.patch = _geometry(store.meta).patch
        self.read_threads, self.resident, self.what = read_threads, resident, split
        self._host = None
        self._device = None
        self.on_device = store.array_format == "zarr" and resident == "none" and _kvikio_usable(store)
        if self.on_device:
            self.x, self.y = (zarr_arrays.DeviceRows.open(store.path, f"{split}_{p}") for p in ("x", "y"))
        if resident in ("host", "device"):
            every = np.arange(len(self.x))
            self._host = (self.x.read(every), self.y.read(every))

    def reader(self) -> "_StoreReader":
        return _StoreReader(self)

    def device_arrays(self):
        """The split as backend tensors on the default device (the GPU when there is one), made once."""
        if self._device is None:
            import keras

            x, y = self._host
            self._device = (keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y))
            self._host = None  # the host copy is no longer needed
        return self._device


class _StoreReader(PatchReader):
    def __init__(self, source: StoreSplit):
        self.source = source
        self.pool = concurrent.futures.ThreadPoolExecutor(source.read_threads,
                                                          thread_name_prefix=f"store-{source.what}")

    def read(self, rows: np.ndarray):
        # x stays float16: the model casts it on the device (half the bytes to move, no host-side conversion)
        src = self.source
        if src.resident == "device":
            import keras

            x, y = src.device_arrays()
            return keras.ops.take(x, rows, axis=0), keras.ops.cast(keras.ops.take(y, rows, axis=0), "float32")
        if src.resident == "host":
            return src._host[0][rows], src._host[1][rows].astype(np.float32)
        if src.on_device:  # kvikIO: straight into GPU memory
            import keras

            return src.x.read(rows), keras.ops.cast(src.y.read(rows), "float32")
        x, y = read_batch([src.x, src.y], rows, self.pool, src.read_threads)  # the threads read parts at once
        return x, y.astype(np.float32)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class StoreStream(BatchStream):
    """Endless (x float16, y float32) batches from a store split, in the batch order of the raw stream
    (``order="window"``) or a fresh permutation of all patches every epoch (``order="global"``, a deliberate
    deviation: statistically better). ``shard``: this worker's rows of every batch (batches.py)."""

    def __init__(self, store: Store, split: str, settings: StreamSettings, resident: str = "none"):
        super().__init__(StoreSplit(store, split, settings.read_threads, resident), settings, split)


def store_test_images(store: Store) -> TestImages:
    """The store's test images for evaluate(), named like the raw test files, loaded from test_x/test_y."""
    x, y = store.array("test_x"), store.array("test_y")
    names = store.files("test")
    index = {name: i for i, name in enumerate(names)}
    g = _geometry(store.meta)
    root = store.path / "test"

    def load(path: Path):
        i = index[path.relative_to(root).as_posix()]
        image = x.read([i])[0].astype(np.float32)
        return preprocess.test_patches(image, g), y.read([i])[0]

    return TestImages(root, [root / n for n in names], load)


def stage_store(path: Path, dest: str | os.PathLike) -> tuple[Path, "Staging"]:
    """Copy a store (from a file system or object storage) to node-local disk (``dest``/<store name>), keeping
    files already there with the same size and time stamp; ``store.json`` is copied last, so an interrupted
    copy is never opened as a store."""
    t0 = time.perf_counter()
    target = Path(dest).expanduser() / path.name
    files = copied = size = 0
    with object_storage.errors(path):
        names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != META]
    try:
        for name in sorted(names) + [META]:
            files += 1
            with object_storage.errors(path / name):
                size += (path / name).stat().st_size
                copied += fileio.copy_if_changed(path / name, target / name)
    except OSError as e:
        raise DataError(f"{target}: cannot stage the store there ({e.strerror or e})",
                        "free space on the node-local disk or stage elsewhere (--stage-to DIR)") from None
    return target, Staging(target, files, copied, size, time.perf_counter() - t0)
