"""The patch store's arrays in Zarr v3 (``cloudmask data prepare --format zarr``): one format for a local disk,
a shared file system and object storage, read in place by every worker of a job instead of a staged copy each.

Chunking: one chunk per patch (one per test image), so a patch is one read; chunks are grouped into one shard
per source file (the sharding codec), so the full dataset is ~2,000 objects rather than ~60,000, and a batch is
one ranged read per patch plus one shard-index read per file it touches. Uncompressed: float16 satellite
radiances barely compress, and a codec would cost decode time on every epoch.

On a GPU node with kvikIO installed and the JAX backend, a local store is read with kvikIO (GPUDirect Storage,
or its POSIX compatibility mode) straight into device memory; otherwise through the CPU, with the reason logged.
"""

from __future__ import annotations

import logging

import numpy as np

from ..dataset import object_storage
from ..errors import DataError

log = logging.getLogger(__name__)

FIX = "copy or prepare the store again"


def _zarr():
    try:
        import zarr
    except ImportError:
        raise DataError("a Zarr patch store needs zarr-python, which is not installed",
                        object_storage.cloud_extra_hint()) from None
    return zarr


def _storage(path, read_only: bool):
    zarr = _zarr()
    if object_storage.is_remote(path):
        from zarr.storage import FsspecStore

        url = str(path)
        return FsspecStore.from_url(url, storage_options=object_storage.storage_options(url), read_only=read_only)
    return zarr.storage.LocalStore(str(path), read_only=read_only)


def create(path, shapes: dict[str, tuple], rows_per_shard: dict[str, int]) -> dict:
    """New arrays ``{name: (shape, dtype)}`` in a new group at ``path``; shard = ``rows_per_shard[name]`` rows."""
    zarr = _zarr()
    with object_storage.errors(path):
        group = zarr.open_group(store=_storage(path, read_only=False), mode="w-", zarr_format=3)
        arrays = {}
        for name, (shape, dtype) in shapes.items():
            rows = max(1, rows_per_shard[name])
            arrays[name] = group.create_array(name, shape=shape, dtype=dtype, chunks=(1, *shape[1:]),
                                              shards=(rows, *shape[1:]) if rows > 1 else None,
                                              compressors=None, fill_value=0)
    return arrays


def open_arrays(path, names, counts: dict[str, int]) -> dict[str, "ZarrRows"]:
    """The arrays ``names`` of the store at ``path``, each checked to hold ``counts[name]`` rows."""
    zarr = _zarr()
    with object_storage.errors(path):
        try:
            group = zarr.open_group(store=_storage(path, read_only=True), mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as e:
            raise DataError(f"{path}: not a readable Zarr group ({e})", FIX) from None
        out = {}
        for name in names:
            if name not in group:
                raise DataError(f"{path}/{name}: missing", FIX)
            array = group[name]
            if array.shape[0] != counts[name]:
                raise DataError(f"{path}/{name}: {array.shape[0]} rows, store.json says {counts[name]}", FIX)
            out[name] = ZarrRows(array, path / name)
    return out


async def _rows(array, rows: np.ndarray) -> list:
    import asyncio

    return await asyncio.gather(*(array.getitem(int(r)) for r in rows))


def _sync(coroutine):
    from zarr.core.sync import sync  # the loop the store's async I/O (fsspec, local files) is bound to

    return sync(coroutine)


class ZarrRows:
    """A Zarr array addressed by row, with the interface of rows.RowFile (read, len, shape, dtype, close)."""

    def __init__(self, array, where):
        self.array, self.where = array, where  # where: the array's path object (errors name it)
        self.shape, self.dtype = tuple(array.shape), np.dtype(array.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, rows, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``rows`` (any order, repeats allowed), one chunk request each, all in flight at once on zarr's
        event loop. (An orthogonal selection over a sharded array decodes far more than it returns: ~50x slower
        for a batch of 32 here.)"""
        rows = np.asarray(rows, dtype=np.int64)
        if out is None:
            out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        with object_storage.errors(self.where):
            for i, value in enumerate(_sync(_rows(self.array.async_array, rows))):
                out[i] = value
        return out

    def close(self) -> None:
        pass


def kvikio_reason(path, backend: str) -> str | None:
    """Why a store at ``path`` is not read through kvikIO, or None when it is."""
    if object_storage.is_remote(path):
        return "the store is on object storage (kvikIO reads local files)"
    if backend != "jax":
        return f"the Keras backend is {backend} (kvikIO feeds device memory to the JAX backend)"
    try:
        import kvikio  # noqa: F401
        import kvikio.zarr  # noqa: F401
    except ImportError:
        return "kvikIO is not installed (pip install kvikio-cu12)"
    import jax

    if not [d for d in jax.devices() if d.platform == "gpu"]:
        return "no GPU"
    return None


class DeviceRows(ZarrRows):
    """Rows read by kvikIO (GPUDirect Storage, or its compatibility mode) into GPU memory as JAX arrays."""

    @classmethod
    def open(cls, path, name: str) -> "DeviceRows":
        import kvikio.zarr
        import zarr

        zarr.config.enable_gpu()  # chunks land in CuPy buffers
        group = zarr.open_group(store=kvikio.zarr.GDSStore(str(path)), mode="r")
        return cls(group[name], path / name)

    def read(self, rows, out=None):
        import cupy
        import jax

        values = cupy.stack(_sync(_rows(self.array.async_array, np.asarray(rows, dtype=np.int64))))
        return jax.dlpack.from_dlpack(values)
