"""Data and patch stores on object storage (remote.py, zarr_arrays.py) against a real S3 API: a moto server on
localhost holding the session's synthetic dataset in a public bucket (read without signing, as the real
dataset's bucket is) and in a private one. Training and inference from ``s3://`` must match the local copy,
a Zarr store must give the batches of the local stores, every failure must be one line, and no secret may
reach a file of a run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ALL_TEST_FILES, TINY, assert_clean_error, run_cli

from cloudmask.config import load_config
from cloudmask.dataset import object_storage
from cloudmask.errors import ConfigError, DataError
from cloudmask.inputs import store, zarr_arrays
from cloudmask.inputs.batches import StreamSettings

pytest.importorskip("s3fs")
pytest.importorskip("upath")

PUBLIC, PRIVATE = "open-data", "closed-data"
HISTORY = ("loss", "accuracy", "val_loss", "val_accuracy")
SETS = [a for kv in [*TINY, "data.cache=off"] for a in ("--set", kv)]
NO_AWS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(dataset, tmp_path_factory):
    """The endpoint URL of a moto S3 server with the dataset at s3://open-data/ds (public-read) and
    s3://closed-data/ds (private). The client environment has no credentials and no instance metadata."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    admin = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="admin",
                         aws_secret_access_key="admin")
    for bucket, acl in ((PUBLIC, "public-read"), (PRIVATE, "private")):
        admin.create_bucket(Bucket=bucket, ACL=acl)
        for path in dataset.rglob("*"):
            if path.is_file():
                admin.upload_file(str(path), bucket, f"ds/{path.relative_to(dataset).as_posix()}",
                                  ExtraArgs={"ACL": acl})
    saved = {k: os.environ.pop(k) for k in NO_AWS if k in os.environ}
    nowhere = str(tmp_path_factory.mktemp("aws") / "none")
    env = {"AWS_ENDPOINT_URL": url, "AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": nowhere,
           "AWS_CONFIG_FILE": nowhere}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # for the CLI runs (they inherit it) and the in-process reads
    object_storage.configure(load_config().data.remote)
    yield admin
    for k, v in before.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    os.environ.update(saved)
    server.stop()


def objects(admin, bucket: str) -> dict[str, str]:
    pages = admin.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def _scores(test: dict) -> tuple:
    return test["per_file"], test["avg_accuracy"]  # per file: accuracy and confusion counts (no timings)


@pytest.mark.slow  # two trainings and an inference; training from S3 runs by default in
# test_credentials_never_reach_a_file_of_the_run
def test_training_and_inference_from_s3_match_the_local_copy(s3, dataset, tmp_path):
    before = objects(s3, PUBLIC)
    runs = {}
    for name, source in (("s3", f"s3://{PUBLIC}/ds"), ("local", str(dataset))):
        done = run_cli("train", "--data", source, "--out", str(tmp_path / name), *SETS, "--set", ALL_TEST_FILES)
        assert done.returncode == 0, done.stderr
        runs[name] = results(tmp_path / name)
    for key in HISTORY:  # same files, same split, same seed: the same run, bit for bit
        assert runs["s3"]["history"][key] == runs["local"]["history"][key], key
    assert runs["s3"]["history"]["loss"][1] < runs["s3"]["history"]["loss"][0]
    assert _scores(runs["s3"]["test"]) == _scores(runs["local"]["test"])
    assert len(runs["s3"]["test"]["per_file"]) == 2
    config = (tmp_path / "s3" / "config.yaml").read_text()
    assert f"root: s3://{PUBLIC}/ds" in config

    # inference of the trained model, reading the test files from the URL in the run's config
    done = run_cli("infer", str(tmp_path / "s3"), "--out", str(tmp_path / "infer"), "--set", "data.cache=off")
    assert done.returncode == 0, done.stderr
    assert _scores(results(tmp_path / "infer")["test"]) == _scores(runs["s3"]["test"])
    assert objects(s3, PUBLIC) == before  # training and inference wrote nothing to the bucket


def test_verify_lists_the_bucket_like_a_directory(s3, dataset):
    done = run_cli("data", "verify", f"s3://{PUBLIC}/ds", "-q")
    assert done.returncode == 0, done.stderr
    assert "ok: 7 good files" in done.stdout and f"dataset s3://{PUBLIC}/ds" in done.stdout


@pytest.fixture(scope="module")
def zarr_stores(s3, dataset, prepared, tmp_path_factory):
    """The dataset prepared as a Zarr store locally and on S3 (written with credentials), with the .npy store."""
    pytest.importorskip("zarr")
    local = tmp_path_factory.mktemp("zarr") / "store"
    done = run_cli("data", "prepare", str(dataset), str(local), "--format", "zarr", "-q")
    assert done.returncode == 0, done.stderr
    url = f"s3://{PRIVATE}/store"
    done = run_cli("data", "prepare", f"s3://{PUBLIC}/ds", url, "-q",
                   env={"AWS_ACCESS_KEY_ID": "writer", "AWS_SECRET_ACCESS_KEY": "writer"})
    assert done.returncode == 0, done.stderr
    assert "float16 zarr" in done.stdout  # zarr is the default on object storage
    return {"npy": prepared, "zarr": local, "s3": url}


def _batches(path, split: str, n: int = 4) -> list:
    cfg = load_config(overrides=["data.remote.anonymous=false"])  # the private bucket: any key is accepted
    os.environ.update(AWS_ACCESS_KEY_ID="reader", AWS_SECRET_ACCESS_KEY="reader")
    try:
        st = store.open_store(path, cfg)
        stream = store.StoreStream(st, split, StreamSettings(batch_size=8, seed=3, shuffle=True, order="global",
                                                             read_threads=2))
        out = [b for _, b in zip(range(n), iter(stream))]
        stream.close()
        images = store.store_test_images(st)
        out.append([images.load(p)[1] for p in images.files])
    finally:
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ.pop(k)
    return out


def test_a_zarr_store_on_s3_gives_the_batches_of_the_local_stores(zarr_stores, s3):
    keys = objects(s3, PRIVATE)
    assert f"store/{store.META}" in keys and "store/train_x/zarr.json" in keys
    # one shard object per source file: 4 training files -> 4 objects holding 4 x 20 patches
    assert len([k for k in keys if k.startswith("store/train_x/c/")]) == 4
    for split in ("train", "val"):
        want = _batches(zarr_stores["npy"], split)
        for name in ("zarr", "s3"):
            got = _batches(zarr_stores[name], split)
            for (wx, wy), (gx, gy) in zip(want[:-1], got[:-1]):
                np.testing.assert_array_equal(gx, wx, err_msg=f"{name} {split}")
                np.testing.assert_array_equal(gy, wy, err_msg=f"{name} {split}")
            for w, g in zip(want[-1], got[-1]):
                np.testing.assert_array_equal(g, w)


@pytest.mark.slow  # two training runs; the batches themselves are compared in the default suite above
def test_training_from_the_s3_zarr_store_matches_the_npy_store(zarr_stores, tmp_path):
    env = {"AWS_ACCESS_KEY_ID": "reader", "AWS_SECRET_ACCESS_KEY": "reader"}
    runs = {}
    for name in ("npy", "s3"):
        done = run_cli("train", "--store", str(zarr_stores[name]), "--out", str(tmp_path / name), *SETS, env=env)
        assert done.returncode == 0, done.stderr
        runs[name] = results(tmp_path / name)
    for key in HISTORY:
        assert runs["s3"]["history"][key] == runs["npy"]["history"][key], key
    log = (tmp_path / "s3" / "console.log").read_text()
    assert "Zarr store read through the CPU: the store is on object storage" in log


def test_an_incomplete_or_existing_store_is_refused(zarr_stores, s3, dataset, tmp_path):
    # a store whose writing stopped has its arrays but no store.json: it is never opened
    for key in objects(s3, PRIVATE):
        if key.startswith("store/") and not key.endswith(store.META):
            body = s3.get_object(Bucket=PRIVATE, Key=key)["Body"].read()
            s3.put_object(Bucket=PRIVATE, Key="half/" + key.removeprefix("store/"), Body=body)
    env = {"AWS_ACCESS_KEY_ID": "reader", "AWS_SECRET_ACCESS_KEY": "reader"}
    done = run_cli("train", "--store", f"s3://{PRIVATE}/half", *SETS, env=env)
    assert_clean_error(done, f"s3://{PRIVATE}/half: not a patch store (no store.json)", "incomplete")
    done = run_cli("data", "prepare", str(dataset), zarr_stores["s3"], "-q", env=env)
    assert_clean_error(done, "already exists")
    done = run_cli("data", "prepare", str(dataset), f"s3://{PRIVATE}/npy", "--format", "npy", "-q", env=env)
    assert_clean_error(done, "needs a file system", "--format zarr")


@pytest.mark.slow  # a real Ctrl-C in the middle of writing a store to S3
def test_an_interrupted_store_write_leaves_no_store(s3, dataset, tmp_path):
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "w", "AWS_SECRET_ACCESS_KEY": "w", "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "cloudmask", "data", "prepare", str(dataset),
                             f"s3://{PRIVATE}/cut", "-q", "--jobs", "1"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(k.startswith("cut/train_x/c/") for k in objects(s3, PRIVATE)):  # the first shard is written
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert not [k for k in objects(s3, PRIVATE) if k.startswith("cut/")]  # what it wrote is removed
    done = run_cli("train", "--store", f"s3://{PRIVATE}/cut", *SETS, env={k: env[k] for k in NO_AWS[:2]},
                   cwd=tmp_path)
    assert_clean_error(done, "not a patch store")


@pytest.mark.parametrize("url, sets, needles", [
    ("s3://no-such-bucket/ds", [], ["s3://no-such-bucket/ds: no such bucket"]),
    (f"s3://{PUBLIC}/nothing-here", [], [f"s3://{PUBLIC}/nothing-here: dataset directory does not exist"]),
    (f"s3://{PRIVATE}/ds", [], ["access denied to an unsigned request", "the bucket is not public",
                                "AWS_ACCESS_KEY_ID"]),
    (f"s3://{PUBLIC}/ds", ["data.remote.endpoint_url=http://127.0.0.1:9", "data.remote.retries=2"],
     ["did not answer after 2 attempts", "data.remote.retries"]),
])
def test_storage_failures_are_one_line(s3, url, sets, needles, tmp_path):
    args = [a for kv in sets for a in ("--set", kv)]
    for command in (["data", "verify", url], ["train", "--data", url, *SETS]):
        done = run_cli(*command, *args, timeout=120, cwd=tmp_path)  # a failed run's directory stays in tmp_path
        assert_clean_error(done, *needles)


def test_a_missing_store_prefix_is_one_line(s3, tmp_path):
    assert_clean_error(run_cli("train", "--store", f"s3://{PUBLIC}/no-store", *SETS, cwd=tmp_path),
                       f"s3://{PUBLIC}/no-store: not a patch store (no store.json)")


def test_credentials_never_reach_a_file_of_the_run(s3, tmp_path):
    """Keys given in the URL and in the environment: none of them is written anywhere in the run directory."""
    key, secret, env_secret = "AKIAURLKEY0001", "url-secret-9f3c", "env-secret-77ab"
    run = tmp_path / "run"
    done = run_cli("train", "--data", f"s3://{key}:{secret}@{PRIVATE}/ds", "--out", str(run), *SETS,
                   "--set", "train.epochs=1", env={"AWS_SECRET_ACCESS_KEY": env_secret, "AWS_ACCESS_KEY_ID": "E"})
    assert done.returncode == 0, done.stderr  # the URL's key read the private bucket
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {"config.yaml", "manifest.json", "results.json", "mlperf.log", "console.log"} <= {p.name for p in files}
    for path in files:
        content = path.read_bytes()
        for needle in (key, secret, env_secret):
            assert needle.encode() not in content, f"{needle} in {path}"
    assert secret not in done.stdout + done.stderr
    assert f"root: s3://{PRIVATE}/ds" in (run / "config.yaml").read_text()
    # an error about such a URL names it without the secret
    done = run_cli("data", "verify", f"s3://{key}:{secret}@no-such-bucket/ds")
    assert_clean_error(done, "s3://no-such-bucket/ds")
    assert secret not in done.stderr


def test_urls_lose_their_credentials_but_keep_them_for_the_process():
    url = object_storage.take_credentials("s3://AK:se%2Fcret@bucket/prefix/x")
    assert url == "s3://bucket/prefix/x"
    assert object_storage.storage_options(url)["secret"] == "se/cret" and object_storage.storage_options(url)["key"] == "AK"
    assert object_storage.redact("failed: s3://AK:se@bucket/x and gs://u@b/y") == "failed: s3://bucket/x and gs://b/y"
    assert object_storage.take_credentials("/data/x@y") == "/data/x@y" and not object_storage.is_url("file:///data")
    cfg = load_config(overrides=["data.root=s3://K2:S2@b2/ds"])
    assert cfg.data.root == "s3://b2/ds" and "S2" not in cfg.to_yaml()


@pytest.mark.parametrize("override, needle", [
    ("data.remote.anonymous=maybe", "data.remote.anonymous"),
    ("data.remote.retries=0", "data.remote.retries"),
])
def test_bad_remote_settings_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(overrides=[override])


def test_without_the_cloud_packages_a_url_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "upath", None)  # what an install without the cloud extra has
    with pytest.raises(DataError, match=r"cloudmask-bench\[cloud\]"):
        object_storage.location("s3://bucket/ds")


def test_kvikio_is_used_only_where_it_can_be(tmp_path):
    pytest.importorskip("zarr")
    assert "object storage" in zarr_arrays.kvikio_reason(object_storage.location("s3://b/store"), "jax")
    assert "backend is tensorflow" in zarr_arrays.kvikio_reason(tmp_path, "tensorflow")
    reason = zarr_arrays.kvikio_reason(tmp_path, "jax")  # this machine: no kvikIO (or no GPU)
    assert reason and ("kvikIO is not installed" in reason or reason == "no GPU")


@pytest.mark.slow  # two worker processes: about a minute on 2 cores
def test_two_workers_read_their_shards_from_one_s3_store(zarr_stores, tmp_path):
    from test_distributed import SETS as WORKER_SETS
    from test_distributed import TOLERANCE, workers

    env = {"AWS_ACCESS_KEY_ID": "reader", "AWS_SECRET_ACCESS_KEY": "reader"}
    (tmp_path / "two").mkdir()
    done = workers(2, "train", "--store", zarr_stores["s3"], "--out", str(tmp_path / "two" / "run"),
                   tmp=tmp_path / "two", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    two = results(tmp_path / "two" / "run")
    plain = run_cli("train", "--store", str(zarr_stores["zarr"]), "--out", str(tmp_path / "plain"),
                    *(a for kv in WORKER_SETS[:-1] for a in ("--set", kv)))
    assert plain.returncode == 0, plain.stderr
    one = results(tmp_path / "plain")
    for key in HISTORY:
        np.testing.assert_allclose(two["history"][key], one["history"][key], atol=TOLERANCE, rtol=0, err_msg=key)
    d = two["distributed"]
    assert (d["workers"], [w["patches"] for w in d["per_worker"]]) == (2, [80, 80])  # half of every batch each
    assert two["staging"] == [] and two["input_pipeline"] == "patch-store"  # read in place, no staged copy
    assert "Zarr store read through the CPU" in (tmp_path / "two" / "logs" / "worker-1.log").read_text() \
        or "Zarr store read through the CPU" in (tmp_path / "two" / "run" / "console.log").read_text()
