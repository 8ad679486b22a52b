"""Input pipelines side by side on the same synthetic files, loader only (no model), each in a fresh process.

    python scripts/measure/compare_pipelines.py [--files 8 32 64] [--threads 1 2] [--work DIR] [--json]

reference  the MLCommons reference's tf.data pipeline (mlcommons/science benchmarks/cloudmask/data_loader.py:
           shuffled file list -> interleave(from_generator over HDF5, cycle 2, 2 parallel calls) ->
           map(crop + extract_patches) -> unbatch -> cache() in RAM -> prefetch -> shuffle(32) -> batch(32))
off        this project's default path with data.cache=off: raw HDF5 every epoch (hdf5_source.PatchStream)
auto       the default, data.cache=auto: epoch 1 reads the HDF5 files and writes the patch cache, later epochs
           read the cache (cache.py); a fresh cache directory per measurement
store      a patch store from `cloudmask data prepare` (float16; StoreStream), for comparison

Our pipelines use data.read_threads=auto (the CPUs of this process). An epoch is one pass over all batches of
32 of the training part of the reference's 80/20 split. Prints patches/s per epoch, the ratios against the
reference and peak RSS (VmHWM); then, at the largest file count, how the cached epoch scales with --threads,
and files decoded per second by --threads threads reading through h5py (its global lock) or by file offset.
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
    from cloudmask.run.throughput import peak_rss_gib

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


def run_store(store_dir: str, threads: int) -> dict:
    from cloudmask.config import load_config
    from cloudmask.inputs import store
    from cloudmask.inputs.batches import StreamSettings

    st = store.open_store(store_dir, load_config())
    stream = store.StoreStream(st, "train", StreamSettings(BATCH, seed=1, shuffle=True, read_threads=threads))
    it = iter(stream)
    return _epochs(lambda: it, batches=stream.steps)


def run_streaming(files: list[str], cache_dir: str | None, threads: int) -> dict:
    from cloudmask.dataset import object_storage
    from cloudmask.dataset.preprocess import Geometry
    from cloudmask.inputs import cache, hdf5_source
    from cloudmask.inputs.batches import StreamSettings

    paths = [object_storage.location(f) for f in files]  # local paths or s3:// URLs (compare_storage.py)
    entry = cache.SplitCache(Path(cache_dir), paths, "patches", Geometry(), "fixed", 0.5, "training") \
        if cache_dir else None
    stream = hdf5_source.PatchStream(paths, hdf5_source.RawReading(Geometry()),
                                     StreamSettings(BATCH, seed=1, shuffle=True, read_threads=threads), cache=entry)
    it = iter(stream)
    out = _epochs(lambda: it, batches=stream.steps)
    out["cache"] = entry.state if entry else None
    stream.close()
    return out


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
    elif spec["pipeline"] == "decode":
        result = decode_rates(spec["files"], spec["threads"])
    elif spec["pipeline"] == "store":
        result = run_store(spec["store"], spec["threads"])
    else:
        result = run_streaming(spec["files"], spec.get("cache"), spec["threads"])
    print("RESULT " + json.dumps(result))


def measure(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{spec['pipeline']} failed:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1][7:])


def decode_rates(files: list[str], threads: list[int], rounds: int = 2) -> dict:
    """Files decoded per second (read + normalise + patch) by N threads, reading the datasets through h5py
    (one global lock) or by offset (data.read_arrays): what parallel decode gains from leaving the lock."""
    import concurrent.futures

    import h5py

    from cloudmask.dataset import preprocess
    from cloudmask.dataset.files import label_of, read_arrays
    from cloudmask.dataset.preprocess import Geometry

    g = Geometry()

    def through_h5py(path):
        with h5py.File(path, "r") as f:
            return {k: f[k][()].reshape(g.height, g.width, -1) for k in ("refs", "bts", "bayes")}

    def decode(read, path):
        a = read(path)
        return preprocess.fixed_train_patches(a["refs"], a["bts"], g), label_of(a["bayes"])

    out = {}
    for name, read in (("h5py", through_h5py), ("direct", lambda p: read_arrays(p, g))):
        for t in threads:
            with concurrent.futures.ThreadPoolExecutor(t) as pool:
                t0 = time.perf_counter()
                list(pool.map(lambda p: decode(read, p), files * rounds))
                out[f"{name} {t}"] = len(files) * rounds / (time.perf_counter() - t0)
    return out


def _subset(work: Path, n: int, master: Path, all_train: list[Path]) -> Path:
    from cloudmask.dataset.files import find_files

    root = work / f"subset-{n}"
    if not root.is_dir():
        for f in all_train[:n] + find_files(master / "inference"):
            rel = f.relative_to(master)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).symlink_to(f)
    return root


def _row(work: Path, n: int, master: Path, all_train: list[Path], threads: int) -> dict:
    import shutil

    from cloudmask.config import load_config
    from cloudmask.dataset.files import find_files, split_files
    from cloudmask.inputs import store

    root = _subset(work, n, master, all_train)
    store_dir = work / f"store-{n}"
    if not store_dir.is_dir():
        store.prepare(root, store_dir, load_config(), jobs=threads)
    cfg = load_config()
    train, _ = split_files(find_files(root / "training"), cfg.data.train_split, cfg.data.split_seed)
    files = [str(f) for f in train]
    cache_dir = work / f"cache-{n}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    print(f"{n} files: reference, off, auto, store ...", file=sys.stderr)
    row = {"files": len(files), "threads": threads,
           "reference": measure({"pipeline": "reference", "files": files}),
           "off": measure({"pipeline": "streaming", "files": files, "threads": threads}),
           "auto": measure({"pipeline": "streaming", "files": files, "threads": threads, "cache": str(cache_dir)}),
           "store": measure({"pipeline": "store", "store": str(store_dir), "threads": threads})}
    return row


def _rate(r: dict, epoch: int) -> float:
    return r["batches"] * BATCH / r[f"epoch{epoch}_s"]


def print_tables(rows: list[dict], scaling: dict, decode: dict) -> None:
    print("| training files | batches | reference e1 p/s | off e1 p/s | auto e1 p/s | auto/ref e1 | reference e2 p/s | "
          "off e2 p/s | auto e2 p/s | auto/ref e2 | store e2 p/s | peak RSS GiB ref / off / auto / store |")
    print("|" + "---|" * 12)
    for r in rows:
        ref, off, auto, st = r["reference"], r["off"], r["auto"], r["store"]
        rss = " / ".join(f"{x['peak_rss_gib']:.2f}" for x in (ref, off, auto, st))
        print(f"| {r['files']} | {auto['batches']} | {_rate(ref, 1):,.0f} | {_rate(off, 1):,.0f} | "
              f"{_rate(auto, 1):,.0f} | {_rate(auto, 1) / _rate(ref, 1):.1f}x | {_rate(ref, 2):,.0f} | "
              f"{_rate(off, 2):,.0f} | {_rate(auto, 2):,.0f} | {_rate(auto, 2) / _rate(ref, 2):.1f}x | "
              f"{_rate(st, 2):,.0f} | {rss} |")
    if scaling:
        print()
        print("| read_threads | cached epoch (2) patches/s | cached epoch (3) patches/s |")
        print("|---|---|---|")
        for t, r in scaling.items():
            print(f"| {t} | {_rate(r, 2):,.0f} | {_rate(r, 3):,.0f} |")
    if decode:
        print()
        print("| decode (read + normalise + patch), files/s | " + " | ".join(decode) + " |")
        print("|---|" + "---|" * len(decode))
        print("| | " + " | ".join(f"{v:.1f}" for v in decode.values()) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, nargs="+", default=[8, 32, 64], help="training files per comparison")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2],
                        help="read_threads for the cached-epoch scaling table (largest --files)")
    parser.add_argument("--work", help="work directory (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="also print the raw measurements as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0

    from cloudmask.dataset.files import find_files, split_files
    from cloudmask.dataset.synth import synthesize
    from cloudmask.training import runtime

    work = Path(args.work or tempfile.mkdtemp(prefix="cloudmask-compare-"))
    n_max = max(args.files)
    master = work / f"synthetic-{n_max}"
    if not master.is_dir():
        print(f"synthesizing {n_max} files into {master} ...", file=sys.stderr)
        synthesize(master, n_train=n_max, n_test=1, seed=3)
    all_train = find_files(master / "training")
    threads = runtime.read_threads("auto")
    rows = [_row(work, n, master, all_train, threads) for n in args.files]
    cache_dir = work / f"cache-{n_max}"  # complete after the largest row's auto measurement
    files = [str(f) for f in split_files(find_files(work / f"subset-{n_max}" / "training"))[0]]
    scaling = {t: measure({"pipeline": "streaming", "files": files, "threads": t, "cache": str(cache_dir)})
               for t in args.threads}
    decode = measure({"pipeline": "decode", "files": files[:16], "threads": args.threads}) if args.threads else {}
    print_tables(rows, scaling, decode)
    if args.json:
        print(json.dumps({"rows": rows, "scaling": scaling, "decode": decode}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
