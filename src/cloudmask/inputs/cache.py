"""The patch cache (``data.cache``): the decoded, normalised patches of a split, kept on local disk the first
time the raw HDF5 files are read, so later epochs, repeats and array tasks on the node skip the decode.

An entry holds exactly what the raw path computes (float32, the same preprocessing), so a run reads the same
bits in the same batch order whether its patches come from the files or from the cache. One entry per split
(training, validation, test) and preprocessing, named by a digest of the file list (path, size, mtime),
geometry, normalisation and ``min_finite_fraction``::

    <root>/<key>/x.npy       float32 training/validation patches (n * per, P, P, 9), or test images (n, H, W, 9)
    <root>/<key>/y.npy       uint8 labels (n * per, P, P, 1) or (n, H, W)
    <root>/<key>/*.crc32.npy a CRC-32 per row of each, checked on every read
    <root>/<key>/entry.json  written last: an entry without it is never opened

The first process to need an entry takes ``<root>/<key>.lock`` (flock), writes into ``<root>/.<key>.tmp-PID`` as
it reads the files and renames it into place once every file is in; a process that finds the lock taken reads
the raw files without writing. A damaged entry (a bad header or size when opened, a row whose CRC-32 fails when
read) is removed with a warning; the run reads the HDF5 files instead and the next run builds it again. The cache is an
optimisation: no space, no permission or a write error mean a warning and plain streaming, never a failed run.
"""

from __future__ import annotations

import atexit
import fcntl
import getpass
import hashlib
import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import fileio
from ..dataset.preprocess import N_CHANNELS, Geometry
from ..errors import DataError, OutputError
from .row_files import DamagedRows, RowFile, read_batch

log = logging.getLogger(__name__)

FORMAT = 2  # 2: every array has its CRC-32 sidecar (row_files.py)
ENTRY = "entry.json"
REMOVE_ENTRY = "remove the patch cache entry (the next run builds it again) or set data.cache=off"


def cache_root(setting: str) -> Path | None:
    """Where ``data.cache`` puts entries: None for ``off``; ``auto`` is $CLOUDMASK_CACHE_DIR, else node-local
    scratch in a SLURM job ($SLURM_TMPDIR, $TMPDIR or /tmp), else $XDG_CACHE_HOME (~/.cache); else the path."""
    if setting == "off":  # (a bare `off` in YAML, read as false, is made "off" by config.py)
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    if os.environ.get("CLOUDMASK_CACHE_DIR"):
        return Path(os.environ["CLOUDMASK_CACHE_DIR"]).expanduser()
    if os.environ.get("SLURM_JOB_ID"):
        scratch = os.environ.get("SLURM_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
        return Path(scratch) / f"cloudmask-cache-{_user()}"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cloudmask" / "patches"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


@dataclass(frozen=True)
class EntryLayout:
    """What one entry holds: ``per`` rows of x/y for each of ``n_files`` files."""

    n_files: int
    per: int
    x_row: tuple
    y_row: tuple

    @classmethod
    def of(cls, kind: str, n_files: int, g: Geometry) -> "EntryLayout":
        if kind == "patches":
            return cls(n_files, g.patches_per_train_image, (g.patch, g.patch, N_CHANNELS), (g.patch, g.patch, 1))
        return cls(n_files, 1, (g.height, g.width, N_CHANNELS), (g.height, g.width))

    @property
    def shapes(self) -> dict[str, tuple]:
        rows = self.n_files * self.per
        return {"x": (rows, *self.x_row), "y": (rows, *self.y_row)}

    @property
    def nbytes(self) -> int:
        return self.n_files * self.per * (4 * int(np.prod(self.x_row)) + int(np.prod(self.y_row)))


def entry_key(files: list[Path], kind: str, g: Geometry, normalisation: str, min_finite_fraction: float) -> str:
    """The digest that names an entry: any change to a file (size, mtime), the list or the preprocessing makes
    a new entry, so a stale one is never read."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, "kind": kind, "normalisation": normalisation,
                                   "min_finite_fraction": min_finite_fraction,
                                   "geometry": [g.height, g.width, g.patch, g.overlap]}).encode())
    for path in files:
        st = path.stat()
        h.update(f"\0{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


class SplitCache:
    """The cache entry of one file list. ``get(i)`` gives file ``i``'s (x, y) when the entry is complete; before
    that, the process holding the build lock ``put``s every file it reads, and the entry is published when the
    last one arrives. ``state``: reused | building | built | streamed | abandoned (``reason`` says why)."""

    def __init__(self, root: Path, files: list[Path], kind: str, g: Geometry, normalisation: str,
                 min_finite_fraction: float, what: str):
        self.layout = EntryLayout.of(kind, len(files), g)
        self.kind, self.what = kind, what
        self.key = entry_key(files, kind, g, normalisation, min_finite_fraction)
        self.root, self.path = root, root / self.key
        self.state, self.reason = "streamed", ""
        self._arrays: dict[str, RowFile] | None = None
        self._retired: list[RowFile] = []
        self._build: _Build | None = None
        self._publisher: threading.Thread | None = None
        self._guard = threading.Lock()
        try:
            self._open()
        except OSError as e:
            self._no_cache(f"cannot use {root} ({e.strerror or e})")

    # -- opening ---------------------------------------------------------------------------------------------

    def _open(self) -> None:
        if self._reuse():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        lock = _Lock.take(self.root / f"{self.key}.lock")
        if lock is None:
            self._no_cache("another process is building it")
            return
        if self._reuse():  # built by the process that held the lock a moment ago
            lock.release()
            return
        _remove_leftovers(self.root, self.key)
        free = shutil.disk_usage(self.root).free
        if free < self.layout.nbytes * 1.05:
            lock.release()
            self._no_cache(f"{self.layout.nbytes / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free in "
                           f"{self.root}; set data.cache=DIR elsewhere or data.cache=off")
            return
        try:
            self._build = _Build(self.root / f".{self.key}.tmp-{os.getpid()}", self.layout, lock)
        except OSError:
            lock.release()
            raise
        self.state = "building"

    def _reuse(self) -> bool:
        if not self.path.is_dir():
            return False
        try:
            self._arrays = _open_entry(self.path, self.key, self.layout)
        except DataError as e:
            log.warning("%s patch cache %s is damaged (%s): building it again", self.what, self.path, e.message)
            _discard(self.path)
            return False
        self.state = "reused"
        log.info("%s patches from the cache %s", self.what, self.path)
        return True

    def _no_cache(self, reason: str) -> None:
        self.state, self.reason = "streamed", reason
        log.warning("%s patch cache not used: %s; reading the HDF5 files", self.what, reason)

    # -- reading and writing ---------------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self._arrays is not None

    def get(self, index: int):
        """(x, y) of file ``index`` from the entry, or None while there is no complete entry."""
        if self._arrays is None:
            return None
        try:
            x, y = read_batch(self.row_files(), np.arange(index * self.layout.per, (index + 1) * self.layout.per))
        except DamagedRows as e:
            self.damaged(e)
            return None
        return (x, y) if self.kind == "patches" else (x[0], y[0])

    def damaged(self, error: DataError) -> None:
        """A row failed its checksum: the entry is removed (the next run builds it again) and this run reads
        the HDF5 files from now on."""
        with self._guard:
            if self._arrays is None:
                return
            self._retired += self._arrays.values()  # closed at the end: another thread may still be reading
            self._arrays = None
            _discard(self.path)
            self.state, self.reason = "damaged", error.message
        log.warning("%s patch cache %s removed: %s; reading the HDF5 files (the next run builds it again)",
                    self.what, self.path, error.message)

    def row_files(self) -> list[RowFile]:
        """The complete entry's x and y arrays (rows are patches, or whole images)."""
        arrays = self._arrays
        return [arrays["x"], arrays["y"]]

    def put(self, index: int, x: np.ndarray, y: np.ndarray) -> None:
        """Record file ``index`` read from its HDF5 file. After the last one this process reads the entry at
        once (its data is in the page cache) while it is published in the background (fsync, entry.json,
        rename: seconds for a large entry, which no epoch waits for)."""
        with self._guard:
            build = self._build
            if build is None or index in build.written:
                return
            try:
                build.write(index, x, y)
            except OSError as e:
                self.abandon(f"writing {build.tmp} failed ({e.strerror or e})")
                return
            if len(build.written) == self.layout.n_files:
                try:
                    for array in build.arrays.values():
                        array.save_checksums()
                    self._arrays = _open_arrays(build.tmp, self.layout)  # open files stay readable when renamed
                except (OSError, DataError) as e:
                    self.abandon(f"reading back {build.tmp} failed ({e})")
                    return
                self._build, self.state = None, "publishing"
                self._publisher = threading.Thread(target=self._publish, args=(build,), daemon=True,
                                                   name=f"cache-{self.what}")
                self._publisher.start()

    def missing(self) -> list[int]:
        """The files the entry still lacks (those an epoch did not need: the dropped remainder)."""
        build = self._build
        return [] if build is None else [i for i in range(self.layout.n_files) if i not in build.written]

    def _publish(self, build: "_Build") -> None:
        try:
            build.finish(self.key)
            try:
                os.rename(build.tmp, self.path)
            except OSError:
                if not self.path.is_dir():
                    raise
                shutil.rmtree(build.tmp, ignore_errors=True)  # an equal entry is already there
        except (OSError, OutputError) as e:  # a full disk: this run keeps reading its open copy
            build.discard()
            self.state, self.reason = "abandoned", f"publishing {self.path} failed ({e})"
            log.warning("%s patch cache not kept: %s", self.what, self.reason)
            return
        build.lock.release()
        self.state = "built"
        log.info("%s patch cache written: %s (%.2f GiB)", self.what, self.path, self.layout.nbytes / 2**30)

    def wait(self) -> None:
        """Until a publication under way has ended."""
        if self._publisher is not None:
            self._publisher.join()

    def abandon(self, reason: str) -> None:
        """Stop building (a bad file, a write error, the end of the run): the partial entry is removed."""
        build, self._build = self._build, None
        if build is not None:
            build.discard()
            self.state, self.reason = "abandoned", reason
            log.warning("%s patch cache not kept: %s", self.what, reason)

    def close(self) -> None:
        self.wait()
        if self._build is not None:
            self.abandon("the run ended before every file was read")
        for array in [*(self._arrays or {}).values(), *self._retired]:
            array.close()
        self._arrays, self._retired = None, []

    def report(self) -> dict:
        self.wait()
        out = {"state": self.state, "path": str(self.path), "bytes": self.layout.nbytes}
        return {**out, "reason": self.reason} if self.reason else out


# ----------------------------------------------------------------------------------------------- internals


class _Lock:
    def __init__(self, fd: int):
        self.fd = fd

    @classmethod
    def take(cls, path: Path) -> "_Lock | None":
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


class _Build:
    """An entry being written under its temporary name, while this process holds the lock."""

    def __init__(self, tmp: Path, layout: EntryLayout, lock: _Lock):
        self.tmp, self.layout, self.lock = tmp, layout, lock
        self.written: set[int] = set()
        tmp.mkdir()
        shapes = layout.shapes
        self.arrays = {"x": RowFile.create(tmp / "x.npy", shapes["x"], np.float32),
                       "y": RowFile.create(tmp / "y.npy", shapes["y"], np.uint8)}
        atexit.register(self.discard)  # an interpreter exit (a signal, an error) leaves no partial entry

    def write(self, index: int, x: np.ndarray, y: np.ndarray) -> None:
        per = self.layout.per
        self.arrays["x"].write(index * per, x)
        self.arrays["y"].write(index * per, y)
        self.written.add(index)

    def finish(self, key: str) -> None:
        for array in self.arrays.values():
            os.fsync(array.fd)
            array.close()
        atexit.unregister(self.discard)
        meta = {"format": FORMAT, "key": key, "files": self.layout.n_files, "per_file": self.layout.per,
                "shapes": {k: list(v) for k, v in self.layout.shapes.items()}}
        fileio.write_json(self.tmp / ENTRY, meta)

    def discard(self) -> None:
        atexit.unregister(self.discard)
        for array in self.arrays.values():
            array.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.lock.release()


def _open_entry(path: Path, key: str, layout: EntryLayout) -> dict[str, RowFile]:
    try:
        meta = json.loads((path / ENTRY).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{ENTRY} unreadable ({getattr(e, 'strerror', None) or e})") from None
    wanted = {"format": FORMAT, "key": key, "files": layout.n_files, "per_file": layout.per}
    if any(meta.get(k) != v for k, v in wanted.items()) if isinstance(meta, dict) else True:
        raise DataError(f"{ENTRY} does not describe this entry")
    return _open_arrays(path, layout)


def _open_arrays(path: Path, layout: EntryLayout) -> dict[str, RowFile]:
    shapes = layout.shapes
    x = RowFile.open(path / "x.npy", shapes["x"], np.float32, fix=REMOVE_ENTRY)
    try:
        return {"x": x, "y": RowFile.open(path / "y.npy", shapes["y"], np.uint8, fix=REMOVE_ENTRY)}
    except DataError:
        x.close()
        raise


def _discard(path: Path) -> None:
    """Move a damaged entry aside first, so no reader opens it while it is being removed."""
    aside = path.with_name(f".{path.name}.bad-{os.getpid()}")
    try:
        os.rename(path, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _remove_leftovers(root: Path, key: str) -> None:
    """Partial entries of builders that died (SIGKILL, node failure): their lock is free, so they are dead."""
    for stale in root.glob(f".{key}.tmp-*"):
        log.warning("removing a partial patch cache left by an interrupted run: %s", stale)
        shutil.rmtree(stale, ignore_errors=True)
