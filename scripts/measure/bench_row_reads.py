"""Ways to gather one shuffled batch of rows out of a patch-cache array, loader only, in one process.

    python scripts/measure/bench_row_reads.py CACHE_ENTRY/x.npy [--threads 1 2] [--batch 32] [--reps 3]

preadv     one preadv per row into the batch, split over threads (rows.RowFile without its checksums)
preadv+crc what cache.py and store.py do since #34: the same, then each row's CRC-32 checked (row_files.py)
mmap       np.take from a read-only memory map of the file (its pages stay mapped: RSS grows to the file size)
mmap-drop  the same, then madvise(MADV_DONTNEED) on the rows read, which keeps RSS flat
ram        np.take from a copy of the whole array in process memory (the reference's in-RAM replay, in numpy)

Prints patches/s and the process RSS after each method. Warm the page cache first (`cat FILE > /dev/null`): the
question is the cost of the copy, not of the disk.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import mmap
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from cloudmask.inputs.row_files import RowFile  # noqa: E402


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 2**20


def methods(path: Path):
    """name -> (function reading rows into an out array of raw bytes), in the order they run."""
    rows_file = RowFile.open(path, checked=False)
    n, size, offset = len(rows_file), rows_file.row_bytes, rows_file.offset
    crc = [zlib.crc32(rows_file.read([r]).view(np.uint8)) for r in range(n)]
    f = open(path, "rb")
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    as_rows = np.frombuffer(mapped, np.uint8, count=n * size, offset=offset).reshape(n, size)

    def preadv(rows, out):
        for k, r in enumerate(rows):
            os.preadv(rows_file.fd, [memoryview(out[k])], offset + int(r) * size)

    def mmap_take(rows, out):
        np.take(as_rows, rows, axis=0, out=out)

    def mmap_drop(rows, out):
        np.take(as_rows, rows, axis=0, out=out)
        for r in rows:
            start = (offset + int(r) * size) // mmap.PAGESIZE * mmap.PAGESIZE
            mapped.madvise(mmap.MADV_DONTNEED, start, min(offset + (int(r) + 1) * size, len(mapped)) - start)

    def preadv_crc(rows, out):
        preadv(rows, out)
        for k, r in enumerate(rows):
            if zlib.crc32(out[k]) != crc[r]:
                raise SystemExit(f"{path}: row {r} changed during the measurement")

    yield "preadv", preadv, n, size
    yield "preadv+crc", preadv_crc, n, size
    yield "mmap", mmap_take, n, size
    yield "mmap-drop", mmap_drop, n, size
    in_ram = np.array(as_rows)
    yield "ram", lambda rows, out: np.take(in_ram, rows, axis=0, out=out), n, size


def rate(read, n: int, size: int, threads: int, batch: int, reps: int) -> float:
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    order = np.random.default_rng(0).permutation(n)

    def one_batch(rows):
        out = np.empty((len(rows), size), np.uint8)
        parts = [p for p in np.array_split(np.arange(len(rows)), threads) if len(p)]
        list(pool.map(lambda p: read(rows[p], out[p[0]:p[-1] + 1]), parts))

    one_batch(order[:batch])
    start, done = time.perf_counter(), 0
    for _ in range(reps):
        for i in range(0, n - batch + 1, batch):
            one_batch(order[i:i + batch])
            done += batch
    pool.shutdown()
    return done / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("array", type=Path, help="x.npy of a patch cache entry (or any 2-D+ .npy)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print("| threads | method | patches/s | RSS after (GiB) |\n|---|---|---|---|")
    for threads in args.threads:
        for name, read, n, size in methods(args.array):
            r = rate(read, n, size, threads, args.batch, args.reps)
            print(f"| {threads} | {name} | {r:,.0f} | {_rss_gib():.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
