"""What a run trains, validates and tests on: the batch streams (batches.py) of the training and validation files
and the test images, from the raw HDF5 files (pipeline.py) or a patch store (store.py), staged to node-local
disk first when asked."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import fileio
from ..dataset import checksums, object_storage
from ..dataset.files import find_files, resolve_layout, split_files, stage_dataset
from ..dataset.preprocess import Geometry
from ..inference.evaluate import TestImages
from ..training import runtime
from . import cache, hdf5_source, store
from .batches import BatchStream, StreamSettings


@dataclass
class RunInputs:
    train_files: list[Path]
    val_files: list[Path]
    train_stream: BatchStream
    val_stream: BatchStream
    test: TestImages
    source: str  # "streaming-hdf5" or "patch-store" (results.json input_pipeline)
    layout: str  # the dataset layout's name, or "patch store"
    dataset_root: Path | None = None
    dataset_digest: str | None = None  # sha256 of the dataset's MANIFEST.sha256
    facts: dict = field(default_factory=dict)  # paths and counts for the manifest
    caches: dict = field(default_factory=dict)  # split -> cache.SplitCache (raw files with data.cache on)
    read_threads: int = 1

    @property
    def train_patches(self) -> int:
        return self.train_stream.patches

    def cache_report(self) -> dict:
        """results.json ``input_cache``: where each split's patches came from (None for a patch store)."""
        if self.source != "streaming-hdf5":
            return None
        return {"read_threads": self.read_threads, **{split: c.report() for split, c in self.caches.items()}}

    def close(self) -> None:
        """Publish nothing half-made: a cache entry still being built is removed (cache.py)."""
        for c in self.caches.values():
            c.close()

    @property
    def val_patches(self) -> int:
        return self.val_stream.patches


def check(cfg) -> None:
    """Fail now, before a run directory exists, if the data the config names cannot be opened."""
    if cfg.data.store:
        store.open_store(cfg.data.store, cfg)
        return
    resolve_layout(cfg.data.root, cfg.data.train_dir, cfg.data.test_dir, need_test=cfg.infer.enabled)
    if cfg.data.cache not in ("auto", "off"):  # asked for by name: a directory that cannot be made is an error
        root = cache.cache_root(cfg.data.cache)
        with fileio.writing(root):
            root.mkdir(parents=True, exist_ok=True)


def open_inputs(cfg, start_epoch: int = 0, shard: tuple[int, int] = (0, 1), stage_to=None,
                staged: Callable = lambda copy: copy()[0]) -> RunInputs:
    """The run's inputs. ``stage_to``: copy the dataset there first, through ``staged(copy)``, which runs
    ``copy() -> (staged thing, data.Staging)`` as the run's timed and logged staging step."""
    if cfg.data.store:
        return _from_store(cfg, start_epoch, shard, stage_to, staged)
    return _from_raw(cfg, start_epoch, stage_to, staged)


def stream_settings(cfg, training: bool, threads: int, start_epoch: int = 0,
                    shard: tuple[int, int] = (0, 1)) -> StreamSettings:
    """A split's stream settings from ``start_epoch``: the training split in the configured order; validation in
    the reference order too when that is the order (the reference shuffles its validation set the same way),
    else in file order."""
    shuffled = training or cfg.train.shuffle == "reference"
    order = dict(order=cfg.train.shuffle, window_files=cfg.train.shuffle_buffer_files,
                 buffer=cfg.train.shuffle_buffer) if shuffled else {}
    return StreamSettings(cfg.train.batch_size, cfg.seed, shuffled, micro_batches=cfg.accumulation_steps,
                          shard=shard, read_threads=threads, start_epoch=start_epoch, **order)


def _from_store(cfg, start_epoch: int, shard: tuple[int, int], stage_to, staged) -> RunInputs:
    """Streams over a patch store (split and screened when it was prepared); with ``shard`` each worker reads
    only its rows of every batch."""
    path = object_storage.location(cfg.data.store)
    if stage_to:
        path = staged(lambda: store.stage_store(store.open_store(path, cfg).path, stage_to))
    st = store.open_store(path, cfg)
    threads = max(2, runtime.read_threads(cfg.data.read_threads))
    train = store.StoreStream(st, "train", stream_settings(cfg, True, threads, start_epoch, shard), cfg.data.resident)
    val = store.StoreStream(st, "val", stream_settings(cfg, False, threads, start_epoch, shard), cfg.data.resident)
    train_files, val_files = [Path(f) for f in st.files("train")], [Path(f) for f in st.files("val")]
    facts = {"store": str(st.path), "source": st.meta["source"]["root"], "train_files": len(train_files),
             "val_files": len(val_files)}
    return RunInputs(train_files, val_files, train, val, store.store_test_images(st), "patch-store", "patch store",
                     st.path, st.meta["source"].get("manifest_sha256"), facts, read_threads=threads)


def _from_raw(cfg, start_epoch: int, stage_to, staged) -> RunInputs:
    """Sorted files, the reference's file split, header screening, and the two streams."""
    layout = resolve_layout(cfg.data.root, cfg.data.train_dir, cfg.data.test_dir, need_test=cfg.infer.enabled)
    if stage_to:
        layout = staged(lambda: stage_dataset(layout, stage_to))
    reading = hdf5_source.RawReading.from_config(cfg)
    files = find_files(layout.train_dir)
    train_files, val_files = split_files(files, cfg.data.train_split, cfg.data.split_seed)
    # Screen after splitting, so skipping a bad file never changes which files are validation files.
    train_files = hdf5_source.screen_files(train_files, reading.geometry, cfg.data.skip_bad, "training")
    val_files = hdf5_source.screen_files(val_files, reading.geometry, cfg.data.skip_bad, "validation")
    threads = runtime.read_threads(cfg.data.read_threads)
    caches = {"train": split_cache(cfg, train_files, "patches", "training"),
              "val": split_cache(cfg, val_files, "patches", "validation")}
    train = hdf5_source.PatchStream(train_files, reading, stream_settings(cfg, True, threads, start_epoch),
                                    "training", caches["train"])
    val = hdf5_source.PatchStream(val_files, reading, stream_settings(cfg, False, threads, start_epoch),
                                  "validation", caches["val"])
    root = layout.train_dir.parent if layout.naming != "explicit" else None
    facts = {"train_dir": str(layout.train_dir), "test_dir": str(layout.test_dir),
             "train_files": len(train_files), "val_files": len(val_files)}
    test_files = find_files(layout.test_dir)[:cfg.infer.max_files] if cfg.infer.enabled else []
    test = raw_test_images(cfg, layout.test_dir, test_files)
    caches["test"] = test.cache
    return RunInputs(train_files, val_files, train, val, test, "streaming-hdf5", layout.naming, root,
                     checksums.checksums_digest(root) if root else None, facts,
                     {k: c for k, c in caches.items() if c is not None}, threads)


def split_cache(cfg, files: list[Path], kind: str, what: str) -> cache.SplitCache | None:
    """The cache entry of ``files`` under ``data.cache`` (None when off or there are no files)."""
    root = cache.cache_root(cfg.data.cache)
    if root is None or not files:
        return None
    return cache.SplitCache(root, files, kind, Geometry.from_config(cfg), cfg.data.normalisation,
                            cfg.data.min_finite_fraction, what)


def raw_test_images(cfg, test_dir: Path, files: list[Path]) -> TestImages:
    """The test images of ``files``, through their cache entry (``.cache``) when data.cache is on. Their headers
    are screened now, with the training files', so a bad test file stops the run before training, not after."""
    reading = hdf5_source.RawReading.from_config(cfg)
    if files:
        files = hdf5_source.screen_files(files, reading.geometry, cfg.data.skip_bad, "test")
    return hdf5_source.hdf5_test_images(test_dir, files, reading, split_cache(cfg, files, "images", "test"))
