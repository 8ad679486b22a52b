"""Row files: the ``.npy`` arrays of the patch store and the patch cache, read and written by whole rows
(patches) with preadv/pwrite. The kernel copies straight into the batch array with the GIL released, so one
batch read split over a few threads runs in parallel; one file descriptor serves every thread.

Every row has a CRC-32 in a sidecar (``x.npy`` → ``x.crc32.npy``), made as the rows are written and checked on
every read (zlib releases the GIL too: the check runs in the reading threads), so bytes damaged on disk after
they were written are never trained on: the read fails with ``DamagedRows`` naming the file and the row.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from .. import fileio
from ..errors import DataError


class DamagedRows(DataError):
    """A row whose bytes are not the ones written (its CRC-32 differs)."""


def checksum_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).stem + ".crc32.npy")


class RowFile:
    """A C-ordered ``.npy`` array addressed by row. ``fix``: what the user should do when it is damaged."""

    def __init__(self, path: Path, fd: int, offset: int, shape: tuple, dtype, fix: str = ""):
        self.path, self.fd, self.offset, self.fix = path, fd, offset, fix
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self.crc: np.ndarray | None = None  # uint32 per row: checked on read, kept up to date on write

    @classmethod
    def create(cls, path: Path, shape: tuple, dtype) -> "RowFile":
        """A new file of ``shape`` (zeros until written), open for reading and writing."""
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                     "fortran_order": False, "shape": tuple(shape)})
            offset = f.tell()
        rows = cls(path, os.open(path, os.O_RDWR), offset, shape, dtype)
        os.ftruncate(rows.fd, offset + rows.row_bytes * shape[0])
        rows.crc = np.zeros(shape[0], np.uint32)
        return rows

    @classmethod
    def open(cls, path: Path, shape: tuple | None = None, dtype=None, fix: str = "", checked: bool = True) -> "RowFile":
        """Open for reading after checking the header (and ``shape``/``dtype`` when given), the file size and
        (``checked``) the checksum sidecar: a truncated copy fails here with a DataError naming the file, not in
        the middle of an epoch."""
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                found_shape, fortran, found_dtype = read_header(f)
                offset = f.tell()
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable array ({getattr(e, 'strerror', None) or e})", fix) from None
        if fortran:
            raise DataError(f"{path}: a Fortran-ordered array", fix)
        found_dtype = np.dtype(found_dtype)
        if shape is not None and (tuple(found_shape) != tuple(shape) or found_dtype != np.dtype(dtype)):
            raise DataError(f"{path}: holds {found_dtype} {tuple(found_shape)}, expected {np.dtype(dtype)} "
                            f"{tuple(shape)}", fix)
        rows = cls(path, os.open(path, os.O_RDONLY), offset, found_shape, found_dtype, fix)
        size, expected = os.fstat(rows.fd).st_size, offset + rows.row_bytes * rows.shape[0]
        if size != expected:
            rows.close()
            raise DataError(f"{path}: {'truncated' if size < expected else 'too long'} "
                            f"({size} of {expected} bytes)", fix)
        if checked:
            try:
                rows.crc = _load_checksums(path, rows.shape[0], fix)
            except DataError:
                rows.close()
                raise
        return rows

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, rows, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``rows`` into ``out`` (a new array when None), each one preadv straight into its place."""
        rows = np.asarray(rows)
        out = np.empty((len(rows), *self.shape[1:]), self.dtype) if out is None else out
        flat = out.reshape(len(rows), -1).view(np.uint8)
        for k, r in enumerate(rows):
            if os.preadv(self.fd, [memoryview(flat[k])], self.offset + int(r) * self.row_bytes) != self.row_bytes:
                raise DataError(f"{self.path}: shorter than its header says", self.fix)
            if self.crc is not None and zlib.crc32(flat[k]) != self.crc[r]:
                raise DamagedRows(f"{self.path}: row {int(r)} is not what was written (CRC-32 mismatch: the file "
                                  "was damaged on disk)", self.fix)
        return out

    def write(self, first_row: int, values: np.ndarray) -> None:
        """Rows ``first_row`` onwards (a short write continues where it stopped)."""
        data = memoryview(np.ascontiguousarray(values, self.dtype).reshape(-1).view(np.uint8))
        if self.crc is not None:
            for k in range(len(data) // self.row_bytes):
                self.crc[first_row + k] = zlib.crc32(data[k * self.row_bytes:(k + 1) * self.row_bytes])
        at = self.offset + first_row * self.row_bytes
        while len(data):
            n = os.pwrite(self.fd, data, at)
            data, at = data[n:], at + n

    def save_checksums(self) -> Path:
        """The rows' CRC-32s into the sidecar (atomically)."""
        return _save_checksums(self.path, self.crc)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_batch(files: list[RowFile], rows: np.ndarray, pool=None, threads: int = 1) -> list[np.ndarray]:
    """Rows ``rows`` of each of ``files`` (the x and y of one split), the batch split into ``threads``
    contiguous parts read by ``pool`` (a ThreadPoolExecutor) at once."""
    rows = np.asarray(rows)
    outs = [np.empty((len(rows), *f.shape[1:]), f.dtype) for f in files]

    def read_part(part: np.ndarray) -> None:
        for f, out in zip(files, outs):
            f.read(rows[part], out[part[0]:part[-1] + 1])

    parts = [p for p in np.array_split(np.arange(len(rows)), max(1, min(threads, len(rows)))) if len(p)]
    if pool is None or len(parts) == 1:
        for part in parts:
            read_part(part)
    else:
        list(pool.map(read_part, parts))
    return outs


def seal(path: Path, rows_at_once: int = 8) -> Path:
    """Checksum sidecar of an ``.npy`` array written by other means (np.lib.format.open_memmap)."""
    rows = RowFile.open(Path(path), checked=False)
    try:
        crc = np.empty(len(rows), np.uint32)
        for first in range(0, len(rows), rows_at_once):
            block = rows.read(np.arange(first, min(first + rows_at_once, len(rows))))
            flat = block.reshape(len(block), -1).view(np.uint8)
            crc[first:first + len(block)] = [zlib.crc32(row) for row in flat]
    finally:
        rows.close()
    return _save_checksums(Path(path), crc)


def _save_checksums(path: Path, crc: np.ndarray) -> Path:
    target = checksum_path(path)
    with fileio.atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, crc)
    return target


def _load_checksums(path: Path, n_rows: int, fix: str) -> np.ndarray:
    sidecar = checksum_path(path)
    try:
        crc = np.load(sidecar, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{sidecar}: {'missing' if isinstance(e, FileNotFoundError) else 'unreadable'} (the "
                        f"checksums of {Path(path).name})", fix) from None
    if crc.dtype != np.uint32 or crc.shape != (n_rows,):
        raise DataError(f"{sidecar}: holds {crc.dtype} {crc.shape}, expected {n_rows} CRC-32s", fix)
    return crc
