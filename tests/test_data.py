import os
import re
import socket
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import assert_clean_error, run_cli

from cloudmask.dataset.files import MANIFEST_NAME, find_files, read_sample, resolve_layout, split_files
from cloudmask.errors import DataError


def _first(root: Path, split="training") -> Path:
    return find_files(root / split)[0]


def _rewrite(path: Path, **changes):
    """Replace datasets of a real file (None deletes the key)."""
    with h5py.File(path, "r+") as f:
        for key, value in changes.items():
            del f[key]
            if value is not None:
                f.create_dataset(key, data=value)


# --------------------------------------------------------------------------------------------- discovery


def test_find_files_is_recursive_sorted_and_filtered(dataset):
    files = find_files(dataset / "training")
    assert len(files) == 5
    rel = [p.relative_to(dataset / "training").as_posix() for p in files]
    assert rel == sorted(rel)
    assert all(p.name.startswith("S3A") and p.suffix == ".hdf" for p in files)
    assert {p.parent.name for p in files} <= {"day", "night"}


def test_both_published_layouts(dataset, tmp_path):
    layout = resolve_layout(str(dataset))
    assert (layout.train_dir.name, layout.test_dir.name, layout.naming) == ("training", "inference", "training")
    old = tmp_path / "old"
    old.mkdir()
    (old / "one-day").symlink_to(dataset / "training")
    (old / "ssts").symlink_to(dataset / "inference")
    layout = resolve_layout(str(old))
    assert (layout.train_dir.name, layout.test_dir.name, layout.naming) == ("one-day", "ssts", "one-day")
    assert len(find_files(layout.train_dir)) == 5 and len(find_files(layout.test_dir)) == 2


def test_explicit_dirs_override_the_root(dataset):
    layout = resolve_layout(None, train_dir=str(dataset / "training"), test_dir=str(dataset / "inference"))
    assert layout.naming == "explicit" and layout.test_dir == dataset / "inference"


@pytest.mark.parametrize("setup, needle", [
    ("missing", "does not exist"),
    ("empty", "no training/ + inference/"),
    ("split_dir", "split directory"),
    ("both", "both"),
    ("no_files", "no S3A*.hdf files"),
])
def test_wrong_layouts_are_named(dataset, tmp_path, setup, needle):
    root = tmp_path / "ds"
    if setup == "empty":
        root.mkdir()
    elif setup == "split_dir":
        root = dataset / "training"
    elif setup == "both":
        root.mkdir()
        for name in ("training", "inference", "one-day", "ssts"):
            (root / name).mkdir()
    elif setup == "no_files":
        (root / "training" / "day").mkdir(parents=True)
        (root / "inference").mkdir()
        (root / "training" / "day" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=re.escape(needle)):
        resolve_layout(str(root))


# ------------------------------------------------------------------------------------------------ split


@pytest.mark.parametrize("n", [2, 3, 5, 10, 97, 970, 1070])
def test_split_is_identical_to_scikit_learn(n):
    from sklearn.model_selection import train_test_split

    files = [f"f{i:04d}" for i in range(n)]
    assert split_files(files, 0.8, 42) == tuple(map(list, train_test_split(files, train_size=0.8,
                                                                                 random_state=42)))
    assert split_files(files, 0.65, 7) == tuple(map(list, train_test_split(files, train_size=0.65,
                                                                                random_state=7)))


def test_split_of_970_files_gives_the_reference_counts():
    train, val = split_files(list(range(970)), 0.8, 42)
    assert (len(train), len(val)) == (776, 194)


def test_split_needs_two_files():
    with pytest.raises(DataError, match="cannot split 1"):
        split_files(["a"], 0.8, 42)


# ---------------------------------------------------------------------------------------------- reading


def test_read_sample(dataset):
    s = read_sample(_first(dataset))
    assert s.image.shape == (1200, 1500, 9) and s.image.dtype == np.float32
    assert s.label.shape == (1200, 1500, 1) and s.label.dtype == np.uint8
    assert set(np.unique(s.label)) <= {0, 1} and s.nonfinite == 0
    with h5py.File(_first(dataset)) as f:
        np.testing.assert_array_equal(s.image[..., :6], f["refs"][()])
        np.testing.assert_array_equal(s.image[..., 6:], f["bts"][()])
        np.testing.assert_array_equal(s.label[..., 0], (f["bayes"][()][..., 0] > 0))


def test_nonfinite_values_are_filled_with_the_channel_minimum(dataset_copy):
    path = _first(dataset_copy)
    with h5py.File(path) as f:
        bts = f["bts"][()]
    bts[600:610, 700:710, 1] = np.nan
    bts[0, 0, 2] = np.inf
    _rewrite(path, bts=bts)
    s = read_sample(path)
    assert s.nonfinite == 101 and np.all(np.isfinite(s.image))
    finite_min = np.nanmin(np.where(np.isfinite(bts[..., 1]), bts[..., 1], np.nan))
    assert np.all(s.image[600:610, 700:710, 7] == finite_min)


@pytest.mark.parametrize("damage, needle", [
    ("truncate", "not a readable HDF5 file"),
    ("not_hdf5", "not a readable HDF5 file"),
    ("missing_key", "missing dataset 'bts'"),
    ("wrong_shape", "'refs' has shape (600, 1500, 6)"),
    ("wrong_dtype", "'bayes' has dtype"),
    ("all_nan", "finite"),
])
def test_every_bad_file_gets_one_error_naming_it(dataset_copy, damage, needle):
    path = _first(dataset_copy)
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)
    elif damage == "not_hdf5":
        path.write_text("this is not an HDF5 file\n")
    elif damage == "missing_key":
        _rewrite(path, bts=None)
    elif damage == "wrong_shape":
        _rewrite(path, refs=np.zeros((600, 1500, 6), np.float32))
    elif damage == "wrong_dtype":
        _rewrite(path, bayes=np.full((1200, 1500, 1), b"x", dtype="S1"))
    elif damage == "all_nan":
        _rewrite(path, bts=np.full((1200, 1500, 3), np.nan, np.float32),
                 refs=np.full((1200, 1500, 6), np.nan, np.float32))
    with pytest.raises(DataError) as err:
        read_sample(path)
    assert str(path) in str(err.value) and needle in str(err.value)


# ----------------------------------------------------------------------------------------------- verify


def test_synth_then_verify_cli(tmp_path):
    out = tmp_path / "D"
    done = run_cli("data", "synth", "--out", str(out), "--train", "4", "--test", "2", "--seed", "1")
    assert done.returncode == 0, done.stderr
    done = run_cli("data", "verify", str(out))
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines() if line.split()}
    assert lines["train"][-1] == "4" and lines["test"][-1] == "2" and lines["total"][-1] == "6"
    assert "ok: 6 good files" in done.stdout


def test_verify_lists_every_bad_file_and_fails(dataset_copy):
    files = find_files(dataset_copy / "training")
    with open(files[0], "r+b") as f:
        f.truncate(1000)
    _rewrite(files[1], bayes=None)
    done = run_cli("data", "verify", str(dataset_copy))
    assert_clean_error(done, "2 of 7 files are bad")
    assert f"BAD  {files[0]}: not a readable HDF5 file" in done.stdout
    assert f"BAD  {files[1]}: missing dataset 'bayes'" in done.stdout
    done = run_cli("data", "verify", str(dataset_copy), "--skip-bad")
    assert done.returncode == 0 and "ok: 5 good files" in done.stdout


@pytest.mark.parametrize("target", ["missing", "empty", "split_dir"])
def test_verify_of_wrong_directories(dataset, tmp_path, target):
    path = {"missing": tmp_path / "nope", "empty": tmp_path, "split_dir": dataset / "training"}[target]
    done = run_cli("data", "verify", str(path))
    assert_clean_error(done, str(path))


def test_manifest_round_trip_and_detects_changes(dataset_copy):
    done = run_cli("data", "verify", str(dataset_copy), "--write-manifest")
    assert done.returncode == 0, done.stderr
    manifest = dataset_copy / MANIFEST_NAME
    lines = manifest.read_text().splitlines()
    assert len(lines) == 7 and all(len(line.split("  ")[0]) == 64 for line in lines)
    assert run_cli("data", "verify", str(dataset_copy), "--check-manifest").returncode == 0
    files = find_files(dataset_copy / "inference")
    with h5py.File(files[0], "r+") as f:
        f["refs"][0, 0, 0] = 0.5  # same size, different content
    files[1].unlink()
    done = run_cli("data", "verify", str(dataset_copy), "--check-manifest")
    assert_clean_error(done, "1 missing and 1 changed")
    assert f"CHANGED  {files[0].relative_to(dataset_copy).as_posix()}" in done.stdout
    assert f"MISSING  {files[1].relative_to(dataset_copy).as_posix()}" in done.stdout


# --------------------------------------------------------------------------------------------- download


def test_download_dry_run_prints_both_namings(tmp_path):
    done = run_cli("data", "download", str(tmp_path / "D"), "--dry-run")
    assert done.returncode == 0
    assert "s3 ls --no-sign-request --endpoint-url https://s3.echo.stfc.ac.uk" in done.stdout
    assert f"s3://sciml-datasets/es/cloud_slstr_ds1/training {tmp_path / 'D' / 'training'}" in done.stdout
    assert f"s3://sciml-datasets/es/cloud_slstr_ds1/inference {tmp_path / 'D' / 'inference'}" in done.stdout
    done = run_cli("data", "download", str(tmp_path / "D"), "--dry-run", "--naming", "one-day", "--only", "test")
    assert "cloud_slstr_ds1/ssts" in done.stdout and "one-day" not in done.stdout
    assert not (tmp_path / "D").exists()


def test_download_without_aws_is_a_clear_error(tmp_path):
    done = run_cli("data", "download", str(tmp_path / "D"), "--naming", "training",
                   env={"PATH": str(tmp_path)})  # no aws on this PATH
    assert_clean_error(done, "'aws'")
    assert "pip install awscli" in done.stderr


@pytest.fixture
def s3_server(dataset):
    """A real S3 API (moto server) holding a copy of the dataset under the STFC bucket's old prefix names."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x",
                      aws_secret_access_key="x")
    s3.create_bucket(Bucket="sciml-datasets")
    for local, remote in (("training", "one-day"), ("inference", "ssts")):
        for path in find_files(dataset / local):
            key = f"es/cloud_slstr_ds1/{remote}/{path.relative_to(dataset / local).as_posix()}"
            s3.upload_file(str(path), "sciml-datasets", key)
    yield url
    server.stop()


def test_download_syncs_resumes_and_detects_the_naming(s3_server, dataset, tmp_path):
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "AWS_EC2_METADATA_DISABLED": "true"}
    dest = tmp_path / "D"
    done = run_cli("data", "download", str(dest), "--endpoint", s3_server, env=env)
    assert done.returncode == 0, done.stderr
    assert "cloud_slstr_ds1/one-day" in done.stdout  # auto-detected the old naming
    assert len(find_files(dest / "one-day")) == 5 and len(find_files(dest / "ssts")) == 2
    # an interrupted download leaves files missing: re-running fetches just those
    victim = find_files(dest / "one-day")[2]
    victim.unlink()
    assert run_cli("data", "download", str(dest), "--endpoint", s3_server, env=env).returncode == 0
    assert victim.is_file()
    assert run_cli("data", "verify", str(dest)).returncode == 0
    original = find_files(dataset / "training")[2].read_bytes()
    assert victim.read_bytes() == original


def test_download_from_an_unreachable_endpoint_fails_cleanly(tmp_path):
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "AWS_MAX_ATTEMPTS": "1", "AWS_EC2_METADATA_DISABLED": "true"}
    done = run_cli("data", "download", str(tmp_path / "D"), "--endpoint", "http://127.0.0.1:9",
                   "--naming", "training", env=env, timeout=120)
    assert_clean_error(done, "failed with exit code")
