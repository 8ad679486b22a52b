"""Where the data lives, loader only: epoch-1 patches/s from local disk and from an S3 server on localhost, for
the raw HDF5 files and for the patch store (.npy and Zarr), each measurement in a fresh process.

    python scripts/measure/compare_storage.py [--files 16] [--work DIR] [--json]

raw local      the HDF5 files on local disk, data.cache=off (hdf5_source.PatchStream; every epoch decodes them)
raw s3         the same files read from s3://bench/raw (each object fetched whole, remote.read_bytes)
npy local      a patch store of .npy arrays (`cloudmask data prepare`, the local default; rows.RowFile)
zarr local     the same store in Zarr v3 (`--format zarr`; one chunk per patch, one shard per source file)
zarr s3        that Zarr store written to s3://bench/store and read in place (what every worker of a job does)

The S3 server is moto (a Python server, from the test extra): it serves a few hundred MB/s at most, so the
s3 rows are a lower bound for a real object store; the ratio to local disk is what this script is for. Store
epochs use order=global and the ordinary read path (resident=none); an epoch is all batches of 32.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_pipelines as cp  # noqa: E402  (its fresh-process measurement and loaders)


def _server(work: Path, files: list[Path], root: Path) -> str:
    """A moto S3 server on a free port with ``root``'s files under s3://bench/raw; its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    url = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bench",
                          aws_secret_access_key="bench")
    client.create_bucket(Bucket="bench")
    for f in files:
        client.upload_file(str(f), "bench", f"raw/{f.relative_to(root).as_posix()}")
    return url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=16, help="training files (default 16)")
    parser.add_argument("--work", help="work directory (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="also print the raw measurements as JSON")
    args = parser.parse_args()

    from cloudmask.config import load_config
    from cloudmask.dataset.files import find_files, split_files
    from cloudmask.dataset.synth import synthesize
    from cloudmask.inputs import store
    from cloudmask.training import runtime

    work = Path(args.work or tempfile.mkdtemp(prefix="cloudmask-storage-"))
    root = work / f"synthetic-{args.files}"
    if not root.is_dir():
        print(f"synthesizing {args.files} files into {root} ...", file=sys.stderr)
        synthesize(root, n_train=args.files, n_test=1, seed=3)
    every = find_files(root / "training") + find_files(root / "inference")
    url = _server(work, every, root)
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_EC2_METADATA_DISABLED="true")  # the children inherit them
    cfg = load_config()
    threads = runtime.read_threads("auto")
    stores = {"npy local": work / "store-npy", "zarr local": work / "store-zarr", "zarr s3": "s3://bench/store"}
    for (name, dest), fmt in zip(stores.items(), ("npy", "zarr", "zarr")):
        if name.endswith("s3") or not Path(dest).is_dir():
            print(f"preparing {name} ...", file=sys.stderr)
            store.prepare(root, dest, cfg, jobs=threads, array_format=fmt)
    train, _ = split_files(find_files(root / "training"), cfg.data.train_split, cfg.data.split_seed)
    local = [str(f) for f in train]
    on_s3 = [f"s3://bench/raw/{f.relative_to(root).as_posix()}" for f in train]
    rows = {}
    for name, spec in (("raw local", {"pipeline": "streaming", "files": local}),
                       ("raw s3", {"pipeline": "streaming", "files": on_s3}),
                       *((name, {"pipeline": "store", "store": str(dest)}) for name, dest in stores.items())):
        print(f"{name} ...", file=sys.stderr)
        rows[name] = cp.measure({**spec, "threads": threads})
    print(f"| source ({len(train)} training files, read_threads {threads}) | batches | epoch 1 patches/s | "
          "vs local | epoch 2 patches/s | peak RSS GiB |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        base = rows["raw local" if name.startswith("raw") else "npy local"]
        print(f"| {name} | {r['batches']} | {cp._rate(r, 1):,.0f} | {cp._rate(r, 1) / cp._rate(base, 1):.2f}x | "
              f"{cp._rate(r, 2):,.0f} | {r['peak_rss_gib']:.2f} |")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
