"""Inference and scoring on the test files. The metric is the one of the reference's v1.2 variants (UVA's
v1.2 of January 2023 and NYU's published runs; spec §2.3, §5) — the v1.1 code (mlcommons/science a11f727)
computes no test accuracy, it only writes masks: 63 overlapping patches per image -> predict -> stitch ->
p > 0.5 -> pixel accuracy over all 1.8 M pixels (borders included); ``avg_accuracy`` is the unweighted mean over
files (config/ledger.py, "test metric").

Faster than the reference without changing a number: test files are read ahead in threads, several images go
through one predict call, and masks are written as gzip'd uint8 (optionally float16 probabilities) instead of
v1.1's float64 mask array per image (14.4 MB; v1.2 and NYU's code also stored the patches, ≈ 149 MB).
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from .. import fileio
from ..cli.progress import Progress
from ..dataset import preprocess
from ..dataset.preprocess import Geometry
from ..errors import DataError
from ..training import runtime

log = logging.getLogger(__name__)


@dataclass
class TestImages:
    """The test files to score: ``load(path)`` -> (63 test patches float32, full-size uint8 label (H, W)),
    from the raw files (hdf5_source.py) or a patch store (store.py); ``root`` names them in the results."""

    __test__ = False  # not a pytest test class

    root: Path
    files: list[Path]
    load: Callable[[Path], tuple]
    cache: Any = None  # the cache.SplitCache the images are read through, if any

    def first(self, count: int | None) -> "TestImages":
        return TestImages(self.root, self.files[:count] if count else list(self.files), self.load, self.cache)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def in_memory(self) -> "TestImages":
        """The same images loaded now, so that scoring them times the model path alone."""
        loaded = {path: self.load(path) for path in self.files}
        return TestImages(self.root, list(self.files), loaded.__getitem__)


def _read_ahead(files, load, workers: int, depth: int):
    """Yield (path, result or DataError) in order while up to ``depth`` files load in the background."""
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="read-test") as pool:
        pending = []
        it = iter(files)
        for path in it:
            pending.append((path, pool.submit(load, path)))
            if len(pending) > depth:
                break
        while pending:
            path, fut = pending.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(load, nxt)))
            try:
                yield path, fut.result()
            except DataError as e:
                yield path, e


def write_mask(target: Path, probability: np.ndarray, predicted: np.ndarray, source: Path, accuracy: float,
               threshold: float, with_probability: bool) -> None:
    with fileio.atomic_path(target, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("mask", data=predicted.astype(np.uint8), compression="gzip", compression_opts=4,
                             chunks=True)
            if with_probability:
                f.create_dataset("probability", data=probability.astype(np.float16), compression="gzip",
                                 compression_opts=4, chunks=True)
            f.attrs["source"] = str(source)
            f.attrs["accuracy"] = accuracy
            f.attrs["threshold"] = threshold
            f.attrs["label"] = "1 = cloud (bayes > 0), 0 = clear"


def score(predicted: np.ndarray, truth: np.ndarray) -> dict:
    """Pixel counts and accuracy of a binary prediction against the binary truth (1 = cloud)."""
    p, t = predicted.astype(bool), truth.astype(bool)
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    tn = int(p.size - tp - fp - fn)
    return {"accuracy": (tp + tn) / p.size, "cloud_fraction": (tp + fn) / p.size,
            "predicted_cloud_fraction": (tp + fp) / p.size, "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def evaluate(model, images: TestImages, cfg, masks_dir: Path | None, stop_requested=lambda: False) -> dict | None:
    """Score ``model`` on ``images``; returns the ``test`` section of results.json plus timing, or None when
    ``stop_requested()`` turned true between two predict calls (a signal: the caller stops the run)."""
    geometry = Geometry.from_config(cfg)
    infer = cfg.infer
    threshold = infer.threshold
    n_patch = geometry.patches_per_test_image
    per_file, skipped = [], []
    if masks_dir is not None:
        masks_dir.mkdir(exist_ok=True)

    def flush(group):
        batch = np.concatenate([g[1][0] for g in group])
        probs = model.predict(batch, batch_size=infer.batch_size, verbose=0)
        for k, (path, (_, label)) in enumerate(group):
            probability = preprocess.stitch(np.asarray(probs[k * n_patch:(k + 1) * n_patch]), geometry)[..., 0]
            predicted = probability > threshold
            result = {"file": path.relative_to(images.root).as_posix(), **score(predicted, label)}
            per_file.append(result)
            if masks_dir is not None and infer.save_masks:
                write_mask(masks_dir / (path.stem + ".h5"), probability, predicted, path, result["accuracy"],
                           threshold, infer.save_probabilities)

    t0 = time.perf_counter()
    progress = Progress("inference", len(images.files), cfg.output.progress, unit="images", items_per_step=1,
                        interval_s=cfg.output.progress_interval_s)
    group = []
    for path, loaded in _read_ahead(images.files, images.load, runtime.read_threads(cfg.data.read_threads),
                                    infer.images_per_call):
        if isinstance(loaded, DataError):
            if not cfg.data.skip_bad:
                raise loaded
            log.warning("skipping bad test file: %s", loaded)
            skipped.append({"file": str(path), "problem": loaded.message})
            continue
        group.append((path, loaded))
        if len(group) == infer.images_per_call:
            if stop_requested():
                progress.close()
                return None
            flush(group)
            progress.update(len(per_file) + len(skipped))
            group = []
    if stop_requested():
        progress.close()
        return None
    if group:
        flush(group)
    progress.update(len(images.files))
    inference_s = time.perf_counter() - t0
    return _summary(per_file, skipped, threshold, inference_s)


def _summary(per_file: list[dict], skipped: list[dict], threshold: float, inference_s: float) -> dict:
    if not per_file:
        raise DataError("no test file could be scored", "check the test set with `cloudmask data verify`")
    accuracies = [r["accuracy"] for r in per_file]
    mean_cloud = float(np.mean([r["cloud_fraction"] for r in per_file]))
    return {
        "avg_accuracy": float(np.mean(accuracies)),
        "min_accuracy": float(np.min(accuracies)),
        "max_accuracy": float(np.max(accuracies)),
        "majority_baseline": max(mean_cloud, 1.0 - mean_cloud),
        "threshold": threshold,
        "files": len(per_file),
        "per_file": per_file,
        "skipped": skipped,
        "inference_s": inference_s,
        "time_per_inference_s": inference_s / len(per_file),
    }
