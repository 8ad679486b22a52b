"""The patch cache (data.cache): the same bits as the raw files, shared between processes, never a damaged or
half-written entry used, and memory flat in the number of files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, assert_clean_error, run_cli

from cloudmask.dataset.files import find_files
from cloudmask.dataset.preprocess import Geometry
from cloudmask.inputs import cache, hdf5_source
from cloudmask.inputs.batches import StreamSettings
from cloudmask.inputs.hdf5_source import RawReading

G = Geometry()


def _train_files(dataset: Path) -> list[Path]:
    return find_files(dataset / "training")[:4]


def _fingerprint(arrays) -> tuple:
    """(dtype, shape, sha256 of the bytes) of each array: compared bit for bit without keeping the arrays."""
    return tuple((str(a.dtype), a.shape, hashlib.sha256(np.ascontiguousarray(a).view(np.uint8)).hexdigest())
                 for a in arrays)


def _batches(files, entry=None, epochs=2, geometry=G, seed=3) -> list[tuple]:
    """The fingerprint of every batch of ``epochs`` epochs (three epochs of real-size patches are ~0.6 GB)."""
    stream = hdf5_source.PatchStream(files, RawReading(geometry), StreamSettings(8, seed, True, window_files=3,
                                                                                  read_threads=2), cache=entry)
    it = iter(stream)
    out = [_fingerprint(next(it)) for _ in range(stream.steps * epochs)]
    stream.close()
    return out


def _same(a, b) -> bool:
    """Two lists of batches (arrays or fingerprints) hold the same bits."""
    def prints(items):
        return [item if isinstance(item[0], tuple) else _fingerprint(item) for item in items]

    return len(a) > 0 and prints(a) == prints(b)


def _entry(root: Path, files, kind="patches", what="training", geometry=G) -> cache.SplitCache:
    return cache.SplitCache(root, files, kind, geometry, "fixed", 0.5, what)


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_cached_batches_are_the_raw_batches_bit_for_bit(dataset, tmp_path):
    files = _train_files(dataset)
    raw = _batches(files, epochs=3)
    entry = _entry(tmp_path, files)
    assert entry.state == "building"
    cached = _batches(files, entry, epochs=3)  # epoch 1 from the files (writing), epochs 2-3 from the entry
    assert entry.state == "built"
    assert cached[0][0][0] == "float32" and _same(raw, cached)
    again = _entry(tmp_path, files)
    assert again.state == "reused" and _same(raw, _batches(files, again, epochs=3))
    assert [p.name for p in _entries(tmp_path)] == [entry.key]
    assert (tmp_path / entry.key / "x.npy").stat().st_size >= entry.layout.nbytes * 0.9


def test_an_epoch_that_drops_files_still_completes_the_entry(dataset, tmp_path):
    """4 files of 20 patches in one batch of 50: the epoch needs 3 files; the cache still gets all 4 by the
    epoch's end (from the read-ahead or, failing that, the epoch-end fill)."""
    files = _train_files(dataset)
    entry = _entry(tmp_path, files)
    stream = hdf5_source.PatchStream(files, RawReading(G), StreamSettings(50, 1, False, read_threads=1, prefetch=0),
                                     cache=entry)
    it = iter(stream)
    for _ in range(stream.steps + 1):
        next(it)
    assert entry.missing() == []
    entry.wait()
    assert entry.state == "built"
    stream.close()


def test_a_changed_file_makes_a_new_entry(dataset_copy, tmp_path):
    files = _train_files(dataset_copy)
    first = _entry(tmp_path / "cache", files)
    _batches(files, first, epochs=1)
    os.utime(files[0], ns=(time.time_ns(), time.time_ns()))  # touched: its contents may have changed
    second = _entry(tmp_path / "cache", files)
    assert second.key != first.key and second.state == "building"
    second.close()


def test_test_images_come_back_the_same_from_the_entry(dataset, tmp_path):
    files = find_files(dataset / "inference")
    entry = _entry(tmp_path, files, "images", "test")
    images = hdf5_source.hdf5_test_images(dataset / "inference", files, RawReading(G), entry)
    first = [images.load(p) for p in files]
    entry.wait()
    assert entry.state == "built"
    reused = _entry(tmp_path, files, "images", "test")
    again = hdf5_source.hdf5_test_images(dataset / "inference", files, RawReading(G), reused)
    plain = hdf5_source.hdf5_test_images(dataset / "inference", files, RawReading(G))
    assert reused.state == "reused"
    assert _same(first, [again.load(p) for p in files]) and _same(first, [plain.load(p) for p in files])


BUILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from cloudmask.dataset.files import find_files
    from cloudmask.dataset.preprocess import Geometry
    from cloudmask.inputs import cache, hdf5_source
    from cloudmask.inputs.batches import StreamSettings
    files = find_files(Path(sys.argv[1]) / "training")[:4]
    entry = cache.SplitCache(Path(sys.argv[2]), files, "patches", Geometry(), "fixed", 0.5, "training")
    print("STATE", entry.state, flush=True)
    if sys.argv[3] == "stall":  # write one file, then wait to be killed
        entry.put(0, *hdf5_source.load_train_patches(files[0], Geometry(), "fixed", 0.5))
        print("WROTE", flush=True)
        time.sleep(600)
    stream = hdf5_source.PatchStream(files, hdf5_source.RawReading(Geometry()), StreamSettings(8, 3, True),
                                     cache=entry)
    it = iter(stream)
    for _ in range(stream.steps * 2):
        next(it)
    entry.wait()  # publishing (fsync, rename) runs in the background; a loaded machine can still be in it
    print("END", entry.state, flush=True)
    stream.close()
""")


def _builder(dataset: Path, root: Path, how: str = "run") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUILD, str(dataset), str(root), how], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_an_entry_built_by_one_process_is_reused_by_the_next(dataset, tmp_path):
    out, err = _builder(dataset, tmp_path).communicate(timeout=300)
    assert "STATE building" in out and "END built" in out, err
    files = _train_files(dataset)
    entry = _entry(tmp_path, files)
    assert entry.state == "reused"
    assert _same(_batches(files), _batches(files, entry))


def test_two_processes_building_at_once_leave_one_valid_entry(dataset, tmp_path):
    procs = [_builder(dataset, tmp_path) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1] for r in results]
    ends = sorted(line.split()[1] for out, _ in results for line in out.splitlines() if line.startswith("END"))
    assert "built" in ends and set(ends) <= {"built", "reused", "streamed"}, results
    assert len(_entries(tmp_path)) == 1 and not list(tmp_path.glob(".*.tmp-*"))
    assert _entry(tmp_path, _train_files(dataset)).state == "reused"


def _damage_x(entry_dir: Path) -> None:
    with open(entry_dir / "x.npy", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)


@pytest.mark.parametrize("damage", [
    _damage_x,
    lambda d: (d / cache.ENTRY).write_text("{ not json"),
    lambda d: (d / "y.npy").unlink(),
    lambda d: (d / cache.ENTRY).write_text(json.dumps({"format": cache.FORMAT, "key": "another"})),
], ids=["truncated-array", "garbage-entry-json", "missing-array", "foreign-entry-json"])
def test_a_damaged_entry_is_rebuilt_with_a_warning_never_used(dataset, tmp_path, caplog, damage):
    files = _train_files(dataset)
    entry = _entry(tmp_path, files)
    _batches(files, entry, epochs=1)
    damage(tmp_path / entry.key)
    with caplog.at_level(logging.WARNING, logger='cloudmask.inputs.cache'):
        rebuilt = _entry(tmp_path, files)
    assert rebuilt.state == "building", "a damaged entry must not be read"
    assert any("damaged" in r.getMessage() and "building it again" in r.getMessage() for r in caplog.records)
    assert _same(_batches(files), _batches(files, rebuilt)) and rebuilt.state == "built"
    assert _entry(tmp_path, files).state == "reused"


def test_the_half_written_entry_of_a_killed_run_is_never_used(dataset, tmp_path, caplog):
    proc = _builder(dataset, tmp_path, "stall")
    assert proc.stdout.readline().strip() == "STATE building"
    assert proc.stdout.readline().strip() == "WROTE"
    proc.send_signal(signal.SIGKILL)  # no atexit, no cleanup: the partial entry stays on disk
    proc.wait(timeout=30)
    files = _train_files(dataset)
    assert list(tmp_path.glob(".*.tmp-*")) and not _entries(tmp_path)
    with caplog.at_level(logging.WARNING, logger='cloudmask.inputs.cache'):
        entry = _entry(tmp_path, files)
    assert any("partial patch cache" in r.getMessage() for r in caplog.records)
    assert entry.state == "building" and not [p for p in tmp_path.glob(".*.tmp-*") if str(os.getpid()) not in p.name]
    assert _same(_batches(files), _batches(files, entry)) and entry.state == "built"


def test_a_process_that_finds_the_lock_taken_streams_without_writing(dataset, tmp_path):
    files = _train_files(dataset)
    holder = _entry(tmp_path, files)
    other = _entry(tmp_path, files)
    assert holder.state == "building" and other.state == "streamed" and "another process" in other.reason
    assert _same(_batches(files), _batches(files, other))
    holder.close()
    assert not _entries(tmp_path) and not list(tmp_path.glob(".*.tmp-*"))


def test_a_bad_file_abandons_the_entry_and_the_run_goes_on(dataset_copy, tmp_path):
    files = _train_files(dataset_copy)
    files[1].write_bytes(files[1].read_bytes()[:5000])  # truncated after the screening a run does
    entry = _entry(tmp_path / "cache", files)
    stream = hdf5_source.PatchStream(files, RawReading(G, skip_bad=True), StreamSettings(8, 3, True), cache=entry)
    it = iter(stream)
    [next(it) for _ in range(stream.steps * 2)]
    assert entry.state == "abandoned" and "is bad" in entry.reason
    assert not _entries(tmp_path / "cache") and not list((tmp_path / "cache").glob(".*.tmp-*"))
    stream.close()


def test_no_room_means_streaming_with_a_warning(dataset, tmp_path, monkeypatch, caplog):
    files = _train_files(dataset)
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda _: type("U", (), {"free": 10 * 2**20})())
    with caplog.at_level(logging.WARNING, logger='cloudmask.inputs.cache'):
        entry = _entry(tmp_path, files)
    assert entry.state == "streamed" and "GiB needed" in entry.reason and "data.cache" in entry.reason
    assert any("not used" in r.getMessage() for r in caplog.records)
    assert _same(_batches(files, epochs=1), _batches(files, entry, epochs=1)) and not _entries(tmp_path)


RSS = textwrap.dedent("""
    import sys
    from pathlib import Path
    from cloudmask.dataset.files import find_files
    from cloudmask.dataset.preprocess import Geometry
    from cloudmask.inputs import cache, hdf5_source
    from cloudmask.inputs.batches import StreamSettings
    g = Geometry(320, 384, 64, 16)
    files = find_files(Path(sys.argv[1]) / "training")[: int(sys.argv[3])]
    entry = cache.SplitCache(Path(sys.argv[2]), files, "patches", g, "fixed", 0.5, "training")
    stream = hdf5_source.PatchStream(files, hdf5_source.RawReading(g), StreamSettings(32, 1, True), cache=entry)
    it = iter(stream)
    for _ in range(stream.steps * 3):
        next(it)
    entry.wait()  # the entry is published in the background (fsync, rename): seconds on a busy disk
    hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")]
    print("RESULT", entry.state, entry.layout.nbytes, int(hwm[0]) * 1024)  # VmHWM: not inherited, unlike ru_maxrss
""")


def test_peak_memory_is_flat_in_the_number_of_files(tmp_path):
    """Three epochs (one building the cache, two reading it) of 8 and of 64 files: the cache lives on disk, so
    peak RSS does not grow with it (the reference's in-RAM cache would add every file's patches)."""
    from cloudmask.dataset.synth import synthesize

    synthesize(tmp_path / "d", n_train=64, n_test=1, seed=5, height=320, width=384)
    peaks = {}
    for n in (8, 64):
        done = subprocess.run([sys.executable, "-c", RSS, str(tmp_path / "d"), str(tmp_path / f"c{n}"), str(n)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        state, cached_bytes, peak = done.stdout.split("RESULT")[-1].split()
        assert state == "built"
        peaks[n] = (int(cached_bytes), int(peak))
    growth = peaks[64][1] - peaks[8][1]
    cache_growth = peaks[64][0] - peaks[8][0]  # what an in-RAM cache of the extra 56 files would hold: ~245 MiB
    assert cache_growth > 200 * 2**20
    assert growth < 64 * 2**20, f"peak RSS grew {growth / 2**20:.0f} MiB from 8 to 64 files"


def _sets(*extra: str) -> list[str]:
    return [arg for s in (*TINY, "train.epochs=1", *extra) for arg in ("--set", s)]


@pytest.mark.slow  # two trainings compared; reuse by the next process runs by default above
def test_runs_record_the_cache_and_a_repeat_reuses_it_with_identical_results(dataset, tmp_path):
    root = tmp_path / "cache"
    outs = []
    for name in ("first", "repeat"):
        done = run_cli("train", "--data", str(dataset), "--out", str(tmp_path / name),
                       *_sets(f"data.cache={root}"))
        assert done.returncode == 0, done.stderr
        outs.append(json.loads((tmp_path / name / "results.json").read_text()))
    first, repeat = (o["input_cache"] for o in outs)
    assert {first[s]["state"] for s in ("train", "val", "test")} == {"built"}
    assert {repeat[s]["state"] for s in ("train", "val", "test")} == {"reused"}
    assert first["read_threads"] >= 1 and first["train"]["path"].startswith(str(root))
    assert outs[0]["history"] == outs[1]["history"] and outs[0]["test"]["avg_accuracy"] == \
        outs[1]["test"]["avg_accuracy"]
    assert outs[0]["deviations"] == outs[1]["deviations"] and "data.cache" not in outs[0]["deviations"]


@pytest.mark.slow  # a whole run; data.cache=off runs by default in test_remote
def test_cache_off_writes_nothing_and_a_bad_cache_dir_is_one_clear_error(dataset, tmp_path):
    done = run_cli("train", "--data", str(dataset), "--out", str(tmp_path / "off"), *_sets("data.cache=off"),
                   env={"CLOUDMASK_CACHE_DIR": str(tmp_path / "auto")})
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "off" / "results.json").read_text())
    assert results["input_cache"] == {"read_threads": results["input_cache"]["read_threads"]}
    assert not (tmp_path / "auto").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = run_cli("train", "--data", str(dataset), "--out", str(tmp_path / "bad"),
                   *_sets(f"data.cache={blocker}/cache"))
    assert_clean_error(done, str(blocker))
    assert not (tmp_path / "bad").exists()


def test_the_row_read_benchmark_script_measures_every_method(tmp_path):
    """scripts/measure/bench_row_reads.py (docs/performance.md): one table row per thread count and method."""
    array = tmp_path / "x.npy"
    np.save(array, np.arange(40 * 64 * 9, dtype=np.float32).reshape(40, 8, 8, 9))
    script = Path(__file__).resolve().parents[1] / "scripts" / "measure" / "bench_row_reads.py"
    done = subprocess.run([sys.executable, str(script), str(array), "--threads", "1", "2", "--batch", "8",
                           "--reps", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines()[2:]]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        (t, m) for t in ("1", "2") for m in ("preadv", "preadv+crc", "mmap", "mmap-drop", "ram")]
    assert all(float(r[2].replace(",", "")) > 0 for r in rows)
