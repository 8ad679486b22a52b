"""Input pipelines side by side on the same synthetic files: the reference's against the patch store's.

    python scripts/compare_pipelines.py [--files 4 8 16] [--work DIR] [--json]

reference  the MLCommons reference's tf.data pipeline (mlcommons/science benchmarks/cloudmask/data_loader.py,
           v1.1 at 30f2c3f; docs/dataset.md describes the patch geometry): shuffled file list ->
           interleave(from_generator over HDF5, cycle 2, 2 parallel calls) -> map(crop + extract_patches) ->
           unbatch -> cache() in RAM -> prefetch -> shuffle(32) -> batch(32)
store      this project's: `cloudmask data prepare` once, then StoreStream (window order, pread threads)
streaming  this project's raw-file pipeline without a store (pipeline.PatchStream), for reference

Each (pipeline, number of files) runs in a fresh process, so peak RSS is its own. An epoch is one pass over
all training batches of 32 without a model (the input pipeline alone: training compute is the same for both).
Prints a ratio table (Markdown) of first-epoch time, later-epoch time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 32


def _rss_gib() -> float:
    from cloudmask.throughput import peak_rss_gib

    return peak_rss_gib()


def run_reference(files: list[str]) -> dict:
    import h5py
    import numpy as np
    import tensorflow as tf

    def read(path):
        with h5py.File(path.decode() if isinstance(path, bytes) else path, "r") as f:
            refs, bts, bayes = f["refs"][...], f["bts"][...], f["bayes"][...]
        image = np.concatenate([refs - 0.5, (bts - 270.0) / 22.0], axis=-1).astype(np.float32)
        mask = (bayes > 0).astype(np.float32).reshape(*bayes.shape[:2], 1)
        yield image, mask

    sig = (tf.TensorSpec((1200, 1500, 9), tf.float32), tf.TensorSpec((1200, 1500, 1), tf.float32))

    def crop_patch(image, mask):
        def patches(a):
            a = a[88:1112, 110:1390][None]
            p = tf.image.extract_patches(a, [1, 256, 256, 1], [1, 256, 256, 1], [1, 1, 1, 1], "VALID")
            return tf.reshape(p, (-1, 256, 256, a.shape[-1]))
        return patches(image), patches(mask)

    ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=1)
    ds = ds.interleave(lambda p: tf.data.Dataset.from_generator(read, output_signature=sig, args=(p,)),
                       cycle_length=2, num_parallel_calls=2)
    ds = ds.map(crop_patch, num_parallel_calls=2).unbatch().cache().prefetch(BATCH).shuffle(BATCH)
    ds = ds.batch(BATCH, drop_remainder=True)
    return _epochs(lambda: iter(ds))


def run_store(store_dir: str) -> dict:
    from cloudmask import store
    from cloudmask.config import load_config

    st = store.open_store(store_dir, load_config())
    stream = store.StoreStream(st, "train", batch_size=BATCH, seed=1, shuffle=True, order="window",
                               read_threads=4)
    it = iter(stream)
    return _epochs(lambda: it, batches=stream.batches)


def run_streaming(files: list[str]) -> dict:
    from cloudmask import pipeline
    from cloudmask.preprocess import Geometry

    stream = pipeline.PatchStream([Path(f) for f in files], Geometry(), "fixed", BATCH, seed=1, shuffle=True)
    it = iter(stream)
    return _epochs(lambda: it, batches=stream.batches)


def _epochs(make_iter, batches: int | None = None) -> dict:
    out = {}
    for epoch in (1, 2, 3):
        it = make_iter()
        t0 = time.perf_counter()
        n = 0
        for _ in range(batches) if batches else iter(int, 1):
            try:
                next(it)
            except StopIteration:
                break
            n += 1
        out[f"epoch{epoch}_s"] = time.perf_counter() - t0
        out["batches"] = n
    out["peak_rss_gib"] = _rss_gib()
    return out


def child(args) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    spec = json.loads(args.child)
    if spec["pipeline"] == "reference":
        result = run_reference(spec["files"])
    elif spec["pipeline"] == "store":
        result = run_store(spec["store"])
    else:
        result = run_streaming(spec["files"])
    print("RESULT " + json.dumps(result))


def measure(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{spec['pipeline']} failed:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1][7:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, nargs="+", default=[4, 8, 16], help="training files per comparison")
    parser.add_argument("--work", help="work directory (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="also print the raw measurements as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0

    from cloudmask import data, store
    from cloudmask.config import load_config
    from cloudmask.synth import synthesize

    work = Path(args.work or tempfile.mkdtemp(prefix="cloudmask-compare-"))
    n_max = max(args.files)
    # n training files give int(0.8 n) after the reference split; synthesize enough for the largest
    master = work / f"synthetic-{n_max}"
    if not master.is_dir():
        print(f"synthesizing {n_max} files into {master} ...", file=sys.stderr)
        synthesize(master, n_train=n_max, n_test=1, seed=3)
    all_train = data.find_files(master / "training")
    rows = []
    for n in args.files:
        root = work / f"subset-{n}"
        if not root.is_dir():
            for f in all_train[:n] + data.find_files(master / "inference"):
                rel = f.relative_to(master)
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).symlink_to(f)
        store_dir = work / f"store-{n}"
        prepare_s = None
        if not store_dir.is_dir():
            t0 = time.perf_counter()
            store.prepare(root, store_dir, load_config(), jobs=2)
            prepare_s = time.perf_counter() - t0
        train_files = [str(root / "training" / f) for f in json.loads((store_dir / "store.json").read_text())
                       ["files"]["train"]]
        print(f"{n} files: measuring reference, store, streaming ...", file=sys.stderr)
        ref = measure({"pipeline": "reference", "files": train_files})
        ours = measure({"pipeline": "store", "store": str(store_dir)})
        stream = measure({"pipeline": "streaming", "files": train_files})
        rows.append({"files": len(train_files), "prepare_s": prepare_s, "reference": ref, "store": ours,
                     "streaming": stream})

    print("| training files | batches | reference epoch 1 s | store epoch 1 s | ratio | reference epoch 2 s | "
          "store epoch 2 s | ratio | streaming epoch 1 s | reference peak RSS GiB | store peak RSS GiB | "
          "streaming peak RSS GiB | store prepare s |")
    print("|" + "---|" * 13)
    for r in rows:
        a, b, c = r["reference"], r["store"], r["streaming"]
        prep = "-" if r["prepare_s"] is None else f"{r['prepare_s']:.1f}"
        print(f"| {r['files']} | {b['batches']} | {a['epoch1_s']:.2f} | {b['epoch1_s']:.2f} | "
              f"{a['epoch1_s'] / b['epoch1_s']:.1f}x | {a['epoch2_s']:.2f} | {b['epoch2_s']:.2f} | "
              f"{a['epoch2_s'] / b['epoch2_s']:.1f}x | {c['epoch1_s']:.2f} | {a['peak_rss_gib']:.2f} | "
              f"{b['peak_rss_gib']:.2f} | {c['peak_rss_gib']:.2f} | {prep} |")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
