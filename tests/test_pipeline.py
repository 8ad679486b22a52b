import numpy as np
import pytest

from cloudmask import data, pipeline, preprocess
from cloudmask.errors import DataError
from cloudmask.preprocess import Geometry


def _stream(files, **kw):
    args = dict(geometry=Geometry(), normalisation="fixed", batch_size=8, seed=3, shuffle=True, window_files=2,
                read_threads=2)
    args.update(kw)
    return pipeline.PatchStream(files, **args)


def _epoch(stream, epoch_index=0):
    it = iter(stream)
    batches = []
    for _ in range(stream.steps * (epoch_index + 1)):
        batches.append(next(it))
    return batches[-stream.steps:]


def test_batches_are_normalised_reference_patches(dataset):
    files = data.find_files(dataset / "training")[:2]
    stream = _stream(files, shuffle=False, batch_size=20)
    assert stream.steps == 2
    x, y = next(iter(stream))
    s = data.read_sample(files[0])
    expected = preprocess.train_patches(preprocess.normalise(s.image, "fixed"))
    np.testing.assert_array_equal(x, expected)
    np.testing.assert_array_equal(y, preprocess.train_patches(s.label).astype(np.float32))
    assert x.dtype == np.float32 and y.dtype == np.float32


def test_every_patch_once_per_epoch_and_a_new_order_every_epoch(dataset):
    files = data.find_files(dataset / "training")  # 5 files = 100 patches
    stream = _stream(files, batch_size=10)
    assert stream.steps == 10
    it = iter(stream)
    epochs = [[next(it) for _ in range(10)] for _ in range(2)]
    keys = [np.concatenate([x[:, 128, 128, :].round(5) for x, _ in e]) for e in epochs]
    # the same 100 patches each epoch (a patch is identified by its centre pixel vector) ...
    assert sorted(map(tuple, keys[0])) == sorted(map(tuple, keys[1]))
    assert len(set(map(tuple, keys[0]))) == 100
    # ... in a different order
    assert not np.array_equal(keys[0], keys[1])


def test_same_seed_same_order_and_resume_reproduces_the_epoch(dataset):
    files = data.find_files(dataset / "training")
    a = _epoch(_stream(files), epoch_index=1)
    resumed = _stream(files, start_epoch=1)
    b = [next(iter_) for iter_ in [iter(resumed)] for _ in range(resumed.steps)]
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    c = _epoch(_stream(files, seed=4), epoch_index=1)
    assert not np.array_equal(a[0][0], c[0][0])


def test_remainder_is_dropped_and_validation_repeats_identically(dataset):
    files = data.find_files(dataset / "training")[:3]  # 60 patches
    stream = _stream(files, batch_size=16, shuffle=False)
    assert stream.steps == 3  # 48 used, 12 dropped
    it = iter(stream)
    first = [next(it)[0] for _ in range(3)]
    second = [next(it)[0] for _ in range(3)]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_too_few_patches_for_a_batch(dataset):
    with pytest.raises(DataError, match="fewer than one batch"):
        _stream(data.find_files(dataset / "training")[:1], batch_size=32)


def test_a_bad_file_mid_stream_raises_or_is_skipped(dataset_copy):
    files = data.find_files(dataset_copy / "training")
    with open(files[1], "r+b") as f:
        f.truncate(5000)
    strict = _stream(files, shuffle=False)
    it = iter(strict)
    with pytest.raises(DataError, match=str(files[1])):
        for _ in range(strict.steps):
            next(it)
    assert strict.error is not None
    lenient = _stream(files, shuffle=False, skip_bad=True)
    it = iter(lenient)
    batches = [next(it) for _ in range(lenient.steps)]  # still a full epoch
    assert len(batches) == lenient.steps and files[1] in lenient.bad


def test_screen_files_catches_header_problems(dataset_copy):
    files = data.find_files(dataset_copy / "training")
    with open(files[0], "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match="not a readable HDF5 file"):
        pipeline.screen_files(files, Geometry(), skip_bad=False, what="training")
    assert pipeline.screen_files(files, Geometry(), skip_bad=True, what="training") == files[1:]


def test_memory_stays_bounded_with_more_files(dataset, tmp_path):
    """The stream holds a window of files, not the dataset: reading 3x the files must not grow RSS ~3x."""
    import os

    import psutil

    files = data.find_files(dataset / "training")
    many = files * 6  # 30 file reads per epoch
    stream = _stream(many, batch_size=20, window_files=2)
    proc = psutil.Process(os.getpid())
    it = iter(stream)
    next(it)
    base = proc.memory_info().rss
    peak = base
    for _ in range(stream.steps - 1):
        next(it)
        peak = max(peak, proc.memory_info().rss)
    # ~30 files x 20 patches x 2.4 MB would be ~1.4 GB if cached; the window is ~0.1 GB
    assert peak - base < 600e6, (base, peak)
