"""Synthetic SLSTR files: layout, names, file format, determinism, physics and learnability."""

from __future__ import annotations

import datetime as dt
import re

import h5py
import numpy as np
import pytest

from cloudmask.dataset import synth
from cloudmask.errors import DataError

H, W = 120, 150  # small images keep the file-level tests fast; physics uses larger ones
NAME = re.compile(r"^S3A_SL_1_RBT____(\d{8}T\d{6})_(\d{8}T\d{6})_(\d{8}T\d{6})_.*\.hdf$")


def read(path):
    with h5py.File(path, "r") as f:
        return {key: f[key][()] for key in ("refs", "bts", "bayes")}, dict(f.attrs)


def scene(seed: int, index: int, day: bool, height: int = 240, width: int = 300):
    return synth.synth_image(np.random.default_rng([seed, index]), day, height, width)


def interior(bts: np.ndarray) -> np.ndarray:
    """Pixels outside the zero borders (a real brightness temperature is never 0 K)."""
    return bts[..., 1] > 0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    calls = []
    paths = synth.synthesize(out, n_train=5, n_test=3, seed=7, progress=lambda *a: calls.append(a),
                             height=H, width=W)
    return out, paths, calls


# ------------------------------------------------------------------------------------------ layout, names


def test_layout_order_and_progress(dataset):
    out, paths, calls = dataset
    assert len(paths) == 8 and all(p.is_file() for p in paths)
    order = []
    for path in paths:
        _, attrs = read(path)
        directory = {"train": "training", "test": "inference"}[attrs["split"]]
        assert path.parent == out / directory / attrs["daynight"]
        order.append((attrs["split"], int(attrs["index"])))
    assert order == [("train", i) for i in range(5)] + [("test", i) for i in range(3)]
    for split in ("training", "inference"):  # both kinds in every split of two or more files
        assert {p.parent.name for p in paths if p.parent.parent.name == split} == {"day", "night"}
    assert calls == [(i, 8, p) for i, p in enumerate(paths, 1)]


def test_names_are_realistic_and_unique():
    names, starts = set(), set()
    for split, month in (("train", "201909"), ("test", "201910")):
        for day in (True, False):
            for index in range(4000):
                name = synth.file_name(split, index, day)
                match = NAME.match(name)
                assert match, name
                start, stop, created = (dt.datetime.strptime(t, "%Y%m%dT%H%M%S") for t in match.groups())
                assert start.strftime("%Y%m") == month
                assert start.hour in ((9, 10, 11) if day else (20, 21, 22))
                assert stop - start == dt.timedelta(minutes=3) and created > stop
                names.add(name)
                starts.add(start)
    assert len(names) == len(starts) == 2 * 2 * 4000  # every file is a different acquisition
    assert synth.file_name("train", 12, True) == synth.file_name("train", 12, True)


def test_day_fraction():
    days = [synth.is_day(3, "train", i) for i in range(2000)]
    assert 0.51 < np.mean(days) < 0.59
    assert all(synth.is_day(s, split, 0) != synth.is_day(s, split, 1) for s in range(20) for split in synth.SPLITS)


# ---------------------------------------------------------------------------------------------- contents


def test_keys_shapes_dtypes_ranges_attributes(dataset):
    _, paths, _ = dataset
    for path in paths:
        with h5py.File(path, "r") as f:
            assert set(f) == {"refs", "bts", "bayes"}
            for key, channels, dtype in (("refs", 6, np.float32), ("bts", 3, np.float32), ("bayes", 1, np.uint8)):
                ds = f[key]
                assert ds.shape == (H, W, channels) and ds.dtype == dtype
                assert ds.chunks is None and ds.compression is None  # contiguous, uncompressed
            attrs = dict(f.attrs)
        arrays, _ = read(path)
        assert attrs["synthetic"] and attrs["generator"] == synth.GENERATOR and attrs["seed"] == 7
        assert attrs["daynight"] == path.parent.name
        refs, bts, bayes = arrays["refs"], arrays["bts"], arrays["bayes"]
        assert refs.min() >= 0 and refs.max() <= 1
        assert np.all((bts == 0) | ((bts >= 180) & (bts <= 330)))
        assert set(np.unique(bayes)) <= {0, 1, 3, 7, 15}  # nested bits: thicker cloud sets more of them


def test_thick_clouds_set_more_bits():
    _, _, bayes = scene(1, 0, True)
    values = set(np.unique(bayes))
    assert {0, 1, 15} <= values and len(values) >= 4


def test_zero_borders(dataset):
    _, paths, _ = dataset
    for path in paths:
        arrays, _ = read(path)
        blank = (arrays["bts"] == 0).all(-1)
        assert blank[:, 0].all() and blank[:, -1].all()
        rows, cols = np.flatnonzero(~blank.all(1)), np.flatnonzero(~blank.all(0))
        inside = np.zeros_like(blank)
        inside[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
        assert np.array_equal(~blank, inside)  # the non-zero part is one rectangle
        assert not arrays["refs"][blank].any() and not arrays["bayes"][blank].any()


def test_full_size_border_widths():
    refs, bts, bayes = synth.synth_image(np.random.default_rng(0), True)
    assert refs.shape == (1200, 1500, 6) and bts.shape == (1200, 1500, 3) and bayes.shape == (1200, 1500, 1)
    kept_rows, kept_cols = np.flatnonzero(interior(bts).any(1)), np.flatnonzero(interior(bts).any(0))
    left, right = kept_cols[0], 1499 - kept_cols[-1]
    top, bottom = kept_rows[0], 1199 - kept_rows[-1]
    assert 20 <= left <= 100 and 20 <= right <= 100 and 0 <= top <= 40 and 0 <= bottom <= 40


# ------------------------------------------------------------------------------------------- determinism


def test_deterministic_and_independent_of_dataset_size(dataset, tmp_path):
    _, paths, _ = dataset
    again = synth.synthesize(tmp_path / "again", n_train=5, n_test=3, seed=7, height=H, width=W)
    assert [p.name for p in again] == [p.name for p in paths]
    for a, b in zip(paths, again):
        assert all(np.array_equal(x, y) for x, y in zip(read(a)[0].values(), read(b)[0].values()))

    # The files of a smaller dataset are the first files of each split of the larger one.
    smaller = synth.synthesize(tmp_path / "smaller", n_train=2, n_test=1, seed=7, height=H, width=W)
    assert len(smaller) == 3
    for path, match in zip(smaller, paths[:2] + paths[5:6]):
        assert path.name == match.name
        assert all(np.array_equal(x, y) for x, y in zip(read(path)[0].values(), read(match)[0].values()))

    other = synth.synthesize(tmp_path / "other", n_train=1, n_test=0, seed=8, height=H, width=W)
    assert not np.array_equal(read(other[0])[0]["bts"], read(paths[0])[0]["bts"])


# ----------------------------------------------------------------------------------------------- physics


@pytest.mark.parametrize("day", [True, False])
def test_clouds_are_cold_and_bright_by_day(day):
    fractions = []
    for index in range(6):
        refs, bts, bayes = scene(2, index, day)
        cloud = bayes[..., 0] > 0
        clear = ~cloud & interior(bts)
        fractions.append(cloud.sum() / interior(bts).sum())
        assert bts[..., 1][cloud].mean() < bts[..., 1][clear].mean() - 5
        if day:
            visible = refs[..., :3]
            assert visible[cloud].mean() > 1.5 * visible[clear].mean() and visible[cloud].mean() > 0.08
        else:
            assert refs.max() <= 0.005
    assert max(fractions) - min(fractions) > 0.2


def best_single_channel_accuracy(x: np.ndarray, label: np.ndarray) -> float:
    best = 0.0
    for channel in x.T:
        for threshold in np.quantile(channel, np.linspace(0.01, 0.99, 99)):
            above = np.mean((channel > threshold) == label)
            best = max(best, above, 1 - above)
    return best


def pixel_features(refs, bts):
    """Normalised channels of the benchmark, BTs relative to the warmest (clearest) part of the image, and the
    split-window difference S8 - S9: a per-pixel rule can then carry over between files."""
    inside = interior(bts)
    clear_reference = np.percentile(bts[..., 1][inside], 95)
    x = np.concatenate([refs[inside] - 0.5, (bts[inside] - clear_reference) / 22,
                        (bts[..., 1:2] - bts[..., 2:3])[inside] / 5], axis=1)
    return np.concatenate([x, np.ones((len(x), 1))], axis=1), inside


def fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """Logistic regression by Newton steps (each a least-squares solve), lightly ridge-regularised."""
    w = np.zeros(x.shape[1])
    for _ in range(15):
        p = 1 / (1 + np.exp(-np.clip(x @ w, -30, 30)))
        hessian = (x * (p * (1 - p))[:, None]).T @ x + ridge * len(x) * np.eye(x.shape[1])
        w += np.linalg.solve(hessian, x.T @ (y - p) - ridge * len(x) * w)
    return w


@pytest.mark.parametrize("day", [True, False])
def test_learnable_but_not_trivial(day):
    """A per-pixel rule fitted on three files clearly beats the majority class on two others, but is not
    perfect; no single channel threshold reproduces the label even within one file."""
    def labelled(indices):
        xs, ys, channels = [], [], []
        for index in indices:
            refs, bts, bayes = scene(4, index, day)
            x, inside = pixel_features(refs, bts)
            xs.append(x)
            ys.append((bayes[..., 0] > 0)[inside])
            channels.append(np.concatenate([refs, bts], -1)[inside])
        return np.concatenate(xs), np.concatenate(ys), channels[0], ys[0]

    x_fit, y_fit, _, _ = labelled([0, 1, 2])
    x_eval, y_eval, one_file, one_label = labelled([3, 4])
    w = fit_logistic(x_fit, y_fit.astype(float))
    accuracy = np.mean((x_eval @ w > 0) == y_eval)
    majority = max(y_eval.mean(), 1 - y_eval.mean())
    single = best_single_channel_accuracy(one_file, one_label)
    assert majority + 0.1 < accuracy < 0.99, (accuracy, majority)
    assert single < 0.97, single


# ------------------------------------------------------------------------------------------ safe writing


def test_refuses_existing_dataset(tmp_path):
    (tmp_path / "training" / "day").mkdir(parents=True)
    (tmp_path / "training" / "day" / "S3A_old.hdf").write_bytes(b"")
    with pytest.raises(DataError, match="already holds a dataset"):
        synth.synthesize(tmp_path, 1, 1, seed=0, height=H, width=W)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["S3A_old.hdf"]


def test_no_partial_files_after_failure(tmp_path, monkeypatch):
    real_create = h5py.Group.create_dataset

    def fail_on_bts(self, name, *args, **kwargs):
        if name == "bts":
            raise OSError("disk full")
        return real_create(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", fail_on_bts)
    with pytest.raises(OSError, match="disk full"):
        synth.synthesize(tmp_path / "out", 2, 0, seed=0, height=H, width=W)
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


def test_no_temporary_files_remain(dataset):
    out, paths, _ = dataset
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) == len(paths) and all(NAME.match(p.name) for p in files)
