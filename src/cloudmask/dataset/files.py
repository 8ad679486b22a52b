"""The SLSTR dataset's files: discovery, layouts, reading one file, the file split, verify, staging.

A dataset directory holds a training and a test directory, in either published layout:
``training/`` + ``inference/`` (current) or ``one-day/`` + ``ssts/`` (2022-2025). Files are found by the
reference's recursive pattern ``**/S3A*.hdf`` and sorted by relative path, so every machine sees the same order
(the reference used unsorted glob order, which depends on the file system).

Each file holds ``refs`` (H, W, 6) reflectance, ``bts`` (H, W, 3) brightness temperature in K and ``bayes``
(H, W, 1) integer cloud flags; the input image is refs then bts (9 channels) and the label is ``bayes > 0``.

Non-finite values (the released files are believed finite; raw SLSTR has NaN fill) are replaced per channel by
that channel's smallest finite value in the image, the rule of the STFC pre-release loader; non-finite labels
become 0 (clear). A file whose refs+bts are less than ``data.min_finite_fraction`` finite is rejected.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .. import fileio
from ..errors import DataError
from . import object_storage
from .preprocess import N_BTS, N_CHANNELS, N_REFS, Geometry

PATTERN = "S3A*.hdf"
LAYOUTS = {"training": ("training", "inference"), "one-day": ("one-day", "ssts")}
KEYS = {"refs": N_REFS, "bts": N_BTS, "bayes": 1}
MANIFEST_NAME = "MANIFEST.sha256"


# ---------------------------------------------------------------------------------------------- discovery


def find_files(directory) -> list[Path]:
    """All ``**/S3A*.hdf`` below ``directory`` (a path or URL), sorted by path relative to it."""
    root = object_storage.location(directory)
    with object_storage.errors(root):
        return sorted(root.rglob(PATTERN), key=lambda p: p.relative_to(root).as_posix())


@dataclass(frozen=True)
class DatasetLayout:
    train_dir: Path | None
    test_dir: Path | None
    naming: str  # "training", "one-day" or "explicit"


def resolve_layout(root: str | None = None, train_dir: str | None = None, test_dir: str | None = None,
                   need_train: bool = True, need_test: bool = True) -> DatasetLayout:
    """Find the training and test directories from a dataset root or explicit paths."""
    if train_dir or test_dir:
        tr = object_storage.location(train_dir) if train_dir else None
        te = object_storage.location(test_dir) if test_dir else None
        if root and (tr is None or te is None):
            base = resolve_layout(root, need_train=need_train and tr is None, need_test=need_test and te is None)
            tr, te = tr or base.train_dir, te or base.test_dir
        layout = DatasetLayout(tr, te, "explicit")
    elif root:
        layout = _layout_of_root(object_storage.location(root))
    else:
        raise DataError("no dataset given", "pass --data DIR (or set data.root), or run `cloudmask bench` "
                                            "to use synthetic data")
    for needed, path, key in ((need_train, layout.train_dir, "data.train_dir"),
                              (need_test, layout.test_dir, "data.test_dir")):
        if needed:
            _require_files(path, key)
    return layout


def _layout_of_root(root: Path) -> DatasetLayout:
    object_storage.probe(root)  # a missing bucket, denied access or no endpoint, said as such
    if not root.is_dir():
        raise DataError(f"{root}: dataset directory does not exist",
                        "check the path, or fetch the data with `cloudmask data download DIR`")
    found = [name for name, (tr, te) in LAYOUTS.items() if (root / tr).is_dir() or (root / te).is_dir()]
    if len(found) > 1:
        raise DataError(f"{root}: holds both training/+inference/ and one-day/+ssts/",
                        "set data.train_dir and data.test_dir to say which to use")
    if not found:
        if root.name in {d for pair in LAYOUTS.values() for d in pair} or (root / "day").is_dir() \
                or (root / "night").is_dir():
            raise DataError(f"{root}: this is a split directory, not a dataset root",
                            f"pass its parent {root.parent} instead")
        raise DataError(f"{root}: no training/ + inference/ (or one-day/ + ssts/) directories",
                        "pass the directory that holds them, or create one with `cloudmask data synth`")
    tr, te = LAYOUTS[found[0]]
    return DatasetLayout(root / tr, root / te, found[0])


def _require_files(path: Path | None, key: str) -> None:
    if path is None:
        raise DataError(f"{key} is not set and no dataset root gives it", "pass --data DIR or set " + key)
    object_storage.probe(path)
    if not path.is_dir():
        raise DataError(f"{path}: directory does not exist ({key})", "check the path")
    if not find_files(path):
        raise DataError(f"{path}: no {PATTERN} files found below it ({key})",
                        "the directory is empty or holds other files; check the path or re-download")


def day_or_night(path: Path) -> str:
    parts = {p.lower() for p in path.parts[-3:-1]}
    return "day" if "day" in parts else "night" if "night" in parts else "other"


# ------------------------------------------------------------------------------------------------ reading


@dataclass
class Sample:
    """One file: raw (unnormalised) float32 image (H, W, 9) = refs then bts, uint8 label (H, W, 1)."""

    path: Path
    image: np.ndarray
    label: np.ndarray
    nonfinite: int = 0


def _h5_reason(err: Exception) -> str:
    text = str(err)
    inner = re.findall(r"\(([^()]*)\)", text)
    return (inner[-1] if inner else text).strip() or type(err).__name__


def read_sample(path: str | os.PathLike, geometry: Geometry = Geometry(), min_finite_fraction: float = 0.5) -> Sample:
    """Read refs, bts and bayes of one file; raise DataError naming the file for every kind of bad input."""
    path = object_storage.location(path)
    return sample_of(path, read_arrays(path, geometry), min_finite_fraction)


def read_arrays(path: str | os.PathLike, geometry: Geometry = Geometry(),
                buffers: dict | None = None) -> dict[str, np.ndarray]:
    """refs (H, W, 6), bts (H, W, 3) and bayes (H, W, 1) of one file, in their stored dtypes, checked.

    h5py serialises every call behind one global lock, so threads reading through it take turns. Contiguous
    uncompressed datasets (the released files) are read by file offset with ``preadv``, which releases the
    GIL, so reader threads really read in parallel; chunked or compressed ones through h5py. ``buffers``: a
    reader thread's arrays to read into, reused next call (fresh memory costs a page fault per page).

    A file on object storage is fetched whole in one request first: h5py holds its lock through every read
    of a file object, so reading it block by block through h5py would let only one thread wait on the network."""
    path = object_storage.location(path)
    blob = object_storage.read_bytes(path) if object_storage.is_remote(path) else None
    try:
        with h5py.File(path if blob is None else io.BytesIO(blob), "r") as f:
            datasets = {key: _checked_dataset(f, key, n, path, geometry) for key, n in KEYS.items()}
            shapes = {key: (geometry.height, geometry.width, n) for key, n in KEYS.items()}
            direct = {key: ds.id.get_offset() for key, ds in datasets.items()
                      if ds.chunks is None and ds.external is None}
            direct = {key: offset for key, offset in direct.items() if offset is not None}
            arrays = {key: ds[()].reshape(shapes[key]) for key, ds in datasets.items() if key not in direct}
            dtypes = {key: datasets[key].dtype for key in direct}
        outs = {key: _buffer(buffers, key, shapes[key], dtypes[key]) for key in direct}
        if blob is not None:
            arrays.update({key: _copy_at(blob, offset, outs[key], path) for key, offset in direct.items()})
        elif direct:
            with open(path, "rb", buffering=0) as raw:
                arrays.update({key: _read_at(raw.fileno(), offset, outs[key], path) for key, offset in direct.items()})
    except DataError:
        raise
    except (OSError, RuntimeError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a readable HDF5 file ({_h5_reason(e)})",
                        "the file is truncated or corrupt: re-download it, or pass --skip-bad") from None
    return arrays


def _buffer(buffers: dict | None, key: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
    out = (buffers or {}).get(key)
    if out is None or out.shape != shape or out.dtype != dtype:
        out = np.empty(shape, dtype)
        if buffers is not None:
            buffers[key] = out
    return out


def _read_at(fd: int, offset: int, out: np.ndarray, path: Path) -> np.ndarray:
    view = memoryview(out.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise DataError(f"{path}: truncated (a dataset ends past the end of the file)",
                            "re-download the file, or pass --skip-bad")
        done += n
    return out


def _copy_at(blob: bytes, offset: int, out: np.ndarray, path) -> np.ndarray:
    view = memoryview(out.reshape(-1).view(np.uint8))
    if offset + len(view) > len(blob):
        raise DataError(f"{path}: truncated (a dataset ends past the end of the file)",
                        "replace the object, or pass --skip-bad")
    view[:] = memoryview(blob)[offset:offset + len(view)]
    return out


@contextlib.contextmanager
def open_hdf5(path):
    """``h5py.File`` of a local file, or of an object through a read-ahead file object."""
    path = object_storage.location(path)
    if not object_storage.is_remote(path):
        with h5py.File(path, "r") as f:
            yield f
        return
    with object_storage.errors(path), object_storage.open_file(path) as raw, h5py.File(raw, "r") as f:
        yield f


def all_finite(arrays: dict[str, np.ndarray]) -> bool:
    """No NaN/Inf in refs and bts: a sum is finite only if every term is (an overflow merely sends the file
    down the exact path of ``sample_of``). Adding rows as vectors beats ``np.sum`` and, unlike BLAS, starts no
    threads beside the reader threads."""
    for key in ("refs", "bts"):
        a = arrays[key]
        if a.dtype.kind == "f":
            with np.errstate(over="ignore", invalid="ignore"):
                total = np.add.reduce(np.add.reduce(a.reshape(a.shape[0], -1), axis=0))
            if not np.isfinite(total):
                return False
    return True


def label_of(bayes: np.ndarray) -> np.ndarray:
    """The cloud label: 1 where the Bayesian flag is positive; non-finite flags are clear."""
    if np.issubdtype(bayes.dtype, np.floating):
        bayes = np.nan_to_num(bayes, nan=0.0, posinf=0.0, neginf=0.0)
    return (bayes > 0).astype(np.uint8)


def sample_of(path: Path, arrays: dict[str, np.ndarray], min_finite_fraction: float = 0.5) -> Sample:
    """The checked arrays of one file as a Sample, with non-finite values replaced (module docstring)."""
    image = np.concatenate([arrays["refs"], arrays["bts"]], axis=-1, dtype=np.float32)
    finite = np.isfinite(image)
    nonfinite = int(image.size - np.count_nonzero(finite))
    if nonfinite:
        frac = 1.0 - nonfinite / image.size
        if frac < min_finite_fraction:
            raise DataError(f"{path}: only {frac:.1%} of refs/bts values are finite "
                            f"(data.min_finite_fraction={min_finite_fraction})",
                            "the file is damaged: re-download it, or pass --skip-bad")
        for c in range(N_CHANNELS):
            ok = finite[..., c]
            if not ok.all():
                image[..., c][~ok] = image[..., c][ok].min()
    return Sample(path, image, label_of(arrays["bayes"]), nonfinite)


def _checked_dataset(f: h5py.File, key: str, channels: int, path: Path, g: Geometry) -> h5py.Dataset:
    if key not in f:
        raise DataError(f"{path}: missing dataset '{key}' (has: {', '.join(sorted(f.keys())) or 'nothing'})",
                        "not a cloud_slstr_ds1 file; re-download it or pass --skip-bad")
    ds = f[key]
    if not isinstance(ds, h5py.Dataset):
        raise DataError(f"{path}: '{key}' is a group, not a dataset", "re-download the file or pass --skip-bad")
    shape = ds.shape
    if key == "bayes" and len(shape) == 2:
        shape = (*shape, 1)
    if shape != (g.height, g.width, channels):
        raise DataError(f"{path}: '{key}' has shape {ds.shape}, expected ({g.height}, {g.width}, {channels})",
                        "the file is not a 1 km SLSTR image, or image.height/width are set wrongly")
    if ds.dtype.kind not in "fiub":
        raise DataError(f"{path}: '{key}' has dtype {ds.dtype}, expected a numeric type",
                        "re-download the file or pass --skip-bad")
    return ds


# -------------------------------------------------------------------------------------------------- split


def split_files(files: list, train_size: float = 0.8, seed: int = 42) -> tuple[list, list]:
    """Identical to ``sklearn.model_selection.train_test_split(files, train_size=..., random_state=seed)``.

    scikit-learn takes floor(train_size * n) training items, the rest as test, and permutes with a legacy
    ``RandomState(seed)``: the test items are the first n_test of the permutation, training the following ones.
    """
    n = len(files)
    n_train = int(np.floor(train_size * n))
    n_test = n - n_train
    if n_train == 0 or n_test == 0:
        raise DataError(f"cannot split {n} training file(s) with data.train_split={train_size}",
                        "the training directory needs enough files for both a training and a validation part")
    perm = np.random.RandomState(seed).permutation(n)
    return [files[i] for i in perm[n_test:n_test + n_train]], [files[i] for i in perm[:n_test]]


# ------------------------------------------------------------------------------------------------- verify


@dataclass
class FileCheck:
    path: Path
    split: str
    daynight: str
    problem: str | None = None
    finite_fraction: float | None = None
    cloud_fraction: float | None = None
    dtypes: dict = field(default_factory=dict)


def check_file(path: Path, split: str, geometry: Geometry, min_finite_fraction: float) -> FileCheck:
    check = FileCheck(path, split, day_or_night(path))
    try:
        with open_hdf5(path) as f:
            check.dtypes = {k: str(f[k].dtype) for k in KEYS if k in f and isinstance(f[k], h5py.Dataset)}
        sample = read_sample(path, geometry, min_finite_fraction)
    except object_storage.StorageError:
        raise
    except DataError as e:
        check.problem = str(e.message).removeprefix(f"{path}: ")
        return check
    except OSError as e:
        check.problem = f"not a readable HDF5 file ({_h5_reason(e)})"
        return check
    check.finite_fraction = 1.0 - sample.nonfinite / sample.image.size
    check.cloud_fraction = float(sample.label.mean())
    return check


@dataclass
class VerifyReport:
    checks: list[FileCheck]

    @property
    def bad(self) -> list[FileCheck]:
        return [c for c in self.checks if c.problem]

    def counts(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for c in self.checks:
            if not c.problem:
                out[(c.split, c.daynight)] = out.get((c.split, c.daynight), 0) + 1
        return out


def verify(root: str | os.PathLike, geometry: Geometry = Geometry(), min_finite_fraction: float = 0.5,
           jobs: int | None = None, progress=None) -> VerifyReport:
    """Check every file of a dataset root (both splits) in parallel worker processes."""
    layout = resolve_layout(root, need_train=False, need_test=False)
    todo = []
    for split, directory in (("train", layout.train_dir), ("test", layout.test_dir)):
        if directory is not None and directory.is_dir():
            todo += [(p, split) for p in find_files(directory)]
    if not todo:
        raise DataError(f"{root}: no {PATTERN} files in {layout.train_dir} or {layout.test_dir}",
                        "the dataset is empty; download or synthesize it first")
    jobs = jobs or min(4, os.cpu_count() or 1)
    checks: list[FileCheck] = []
    # objects: threads (the work is waiting on the network, and forked children would share fsspec's event loop)
    on_store = object_storage.is_remote(todo[0][0])
    pool_type = concurrent.futures.ThreadPoolExecutor if on_store else concurrent.futures.ProcessPoolExecutor
    with pool_type(max_workers=jobs * 4 if on_store else jobs) as pool:
        futures = [pool.submit(check_file, p, split, geometry, min_finite_fraction) for p, split in todo]
        for i, fut in enumerate(futures, 1):
            checks.append(fut.result())
            if progress:
                progress(i, len(futures), checks[-1])
    return VerifyReport(checks)


# ------------------------------------------------------------------------------------------------ staging


@dataclass
class Staging:
    dest: Path
    files: int
    copied: int
    bytes: int
    seconds: float


def stage_dataset(layout: DatasetLayout, dest: str | os.PathLike) -> tuple[DatasetLayout, Staging]:
    """Copy the dataset's training and test files to ``dest`` (node-local disk) and return the staged layout.

    Files already there with the same size and modification time are kept, so a requeued task on the same node
    copies nothing. Each file is copied to a temporary name and renamed, so an interrupted copy is never used."""
    import time

    t0 = time.perf_counter()
    dest = Path(dest).expanduser()
    names = ("train", "test") if layout.naming == "explicit" else LAYOUTS[layout.naming]
    staged = []
    files = copied = size = 0
    for src, name in zip((layout.train_dir, layout.test_dir), names):
        if src is None or not src.is_dir():
            staged.append(None)
            continue
        target_dir = dest / name
        for f in find_files(src):
            target = target_dir / f.relative_to(src)
            files += 1
            size += f.stat().st_size
            try:
                with object_storage.errors(f):
                    copied += fileio.copy_if_changed(f, target)
            except OSError as e:
                raise DataError(f"{target}: cannot stage the dataset there ({e.strerror or e})",
                                "free space on the node-local disk or stage elsewhere (--stage-to DIR)") from None
        staged.append(target_dir)
    if layout.naming != "explicit" and layout.train_dir is not None:
        manifest = layout.train_dir.parent / MANIFEST_NAME
        if manifest.is_file():
            fileio.copy_if_changed(manifest, dest / MANIFEST_NAME)
    staging = Staging(dest, files, copied, size, time.perf_counter() - t0)
    return DatasetLayout(staged[0], staged[1], layout.naming), staging
