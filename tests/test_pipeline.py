import numpy as np
import pytest

from cloudmask.dataset import preprocess
from cloudmask.dataset.files import find_files, read_sample
from cloudmask.dataset.preprocess import Geometry
from cloudmask.errors import DataError
from cloudmask.inputs import hdf5_source
from cloudmask.inputs.batches import StreamSettings


def _stream(files, geometry=Geometry(), skip_bad=False, **kw):
    args = dict(batch_size=8, seed=3, shuffle=True, window_files=2, read_threads=2)
    args.update(kw)
    return hdf5_source.PatchStream(files, hdf5_source.RawReading(geometry, skip_bad=skip_bad), StreamSettings(**args))


def _epoch(stream, epoch_index=0):
    it = iter(stream)
    batches = []
    for _ in range(stream.steps * (epoch_index + 1)):
        batches.append(next(it))
    return batches[-stream.steps:]


def test_batches_are_normalised_reference_patches(dataset):
    files = find_files(dataset / "training")[:2]
    stream = _stream(files, shuffle=False, batch_size=20)
    assert stream.steps == 2
    x, y = next(iter(stream))
    s = read_sample(files[0])
    expected = preprocess.train_patches(preprocess.normalise(s.image, "fixed"))
    np.testing.assert_array_equal(x, expected)
    np.testing.assert_array_equal(y, preprocess.train_patches(s.label).astype(np.float32))
    assert x.dtype == np.float32 and y.dtype == np.float32


def test_every_patch_once_per_epoch_and_a_new_order_every_epoch(dataset):
    files = find_files(dataset / "training")  # 5 files = 100 patches
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
    files = find_files(dataset / "training")
    a = _epoch(_stream(files), epoch_index=1)
    resumed = _stream(files, start_epoch=1)
    b = [next(iter_) for iter_ in [iter(resumed)] for _ in range(resumed.steps)]
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    c = _epoch(_stream(files, seed=4), epoch_index=1)
    assert not np.array_equal(a[0][0], c[0][0])


def test_remainder_is_dropped_and_validation_repeats_identically(dataset):
    files = find_files(dataset / "training")[:3]  # 60 patches
    stream = _stream(files, batch_size=16, shuffle=False)
    assert stream.steps == 3  # 48 used, 12 dropped
    it = iter(stream)
    first = [next(it)[0] for _ in range(3)]
    second = [next(it)[0] for _ in range(3)]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_too_few_patches_for_a_batch(dataset):
    with pytest.raises(DataError, match="fewer than one batch"):
        _stream(find_files(dataset / "training")[:1], batch_size=32)


def test_a_bad_file_mid_stream_raises_or_is_skipped(dataset_copy):
    files = find_files(dataset_copy / "training")
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
    files = find_files(dataset_copy / "training")
    with open(files[0], "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match="not a readable HDF5 file"):
        hdf5_source.screen_files(files, Geometry(), skip_bad=False, what="training")
    assert hdf5_source.screen_files(files, Geometry(), skip_bad=True, what="training") == files[1:]


def test_memory_stays_bounded_with_more_files(dataset, tmp_path):
    """The stream holds a window of files, not the dataset: reading 3x the files must not grow RSS ~3x."""
    import os

    import psutil

    files = find_files(dataset / "training")
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


def _independent(path, normalisation="fixed"):
    """The reference's recipe, read through h5py alone: concat refs+bts as float32, fill, normalise, crop."""
    import h5py

    with h5py.File(path, "r") as f:
        refs, bts, bayes = f["refs"][()], f["bts"][()], f["bayes"][()]
    image = np.concatenate([refs, bts], axis=-1, dtype=np.float32)
    for c in range(image.shape[-1]):
        bad = ~np.isfinite(image[..., c])
        image[..., c][bad] = image[..., c][~bad].min()
    label = (np.nan_to_num(bayes.reshape(*bayes.shape[:2], 1).astype(np.float64)) > 0).astype(np.uint8)
    return preprocess.normalise(image, normalisation), label


@pytest.mark.parametrize("layout", ["float64-refs", "chunked-gzip", "big-endian", "nan-pixels", "zscore"])
def test_every_read_path_gives_the_bits_of_the_reference_recipe(dataset_copy, layout):
    """Direct offset reads (contiguous datasets) and h5py reads (chunked/compressed), the one-pass fixed
    normalisation and the general path agree bit for bit with an independent h5py implementation."""
    import h5py

    path = find_files(dataset_copy / "training")[0]
    with h5py.File(path, "r+") as f:
        arrays = {k: f[k][()] for k in ("refs", "bts", "bayes")}
        if layout == "nan-pixels":
            arrays["refs"][5, 7, 2] = np.nan
            arrays["bts"][100:110, 200, 0] = np.inf
        for key, value in arrays.items():
            del f[key]
            if layout == "float64-refs" and key == "refs":
                f.create_dataset(key, data=value.astype(np.float64))
            elif layout == "chunked-gzip":
                f.create_dataset(key, data=value, chunks=True, compression="gzip")
            elif layout == "big-endian":
                f.create_dataset(key, data=value.astype(value.dtype.newbyteorder(">")))
            else:
                f.create_dataset(key, data=value)
    normalisation = "zscore" if layout == "zscore" else "fixed"
    image, label = _independent(path, normalisation)
    x, y = hdf5_source.load_train_patches(path, Geometry(), normalisation, 0.5)
    assert x.dtype == np.float32 and np.array_equal(x.view(np.uint32), preprocess.train_patches(image).view(np.uint32))
    assert np.array_equal(y, preprocess.train_patches(label))
    full, full_label = hdf5_source.load_normalised_image(path, Geometry(), normalisation, 0.5)
    assert np.array_equal(full.view(np.uint32), image.view(np.uint32)) and np.array_equal(full_label, label[..., 0])


def test_contiguous_datasets_are_read_by_offset_not_through_h5py(dataset, monkeypatch):
    """The released layout (contiguous, uncompressed) must take the direct reads: h5py's global lock would
    serialise the reader threads."""
    import h5py

    def refuse(self, *args):
        raise AssertionError("data read through h5py")

    monkeypatch.setattr(h5py.Dataset, "__getitem__", refuse)
    path = find_files(dataset / "training")[0]
    x, y = hdf5_source.load_train_patches(path, Geometry(), "fixed", 0.5)
    assert x.shape == (20, 256, 256, 9) and y.shape == (20, 256, 256, 1)
