"""The dataset's checksum manifest (``MANIFEST.sha256``, ``sha256sum -c`` format): written by ``data verify
--write-manifest`` beside a local copy, checked by ``--check-manifest`` (locally or against a bucket), and its
digest is the dataset's identity in every run's provenance."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .. import fileio
from ..errors import DataError
from . import object_storage
from .files import MANIFEST_NAME, find_files, resolve_layout


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with object_storage.errors(path), path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def dataset_files(root: Path) -> list[Path]:
    layout = resolve_layout(root, need_train=False, need_test=False)
    files = []
    for d in (layout.train_dir, layout.test_dir):
        if d is not None and d.is_dir():
            files += find_files(d)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def hash_files(root: Path, files: list[Path], jobs: int = 4) -> dict[str, str]:
    """{relative path: sha256}; hashlib releases the GIL, so threads hash in parallel."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        digests = list(pool.map(_sha256, files))
    return {p.relative_to(root).as_posix(): d for p, d in zip(files, digests)}


def write_checksums(root: str | os.PathLike, jobs: int = 4) -> Path:
    """Write ``MANIFEST.sha256`` (``sha256sum -c`` format) atomically; return its path."""
    root = object_storage.location(root)
    if object_storage.is_remote(root):
        raise DataError(f"{root}: a manifest is written beside a local copy, not into object storage",
                        "verify with --check-manifest against the bucket's manifest, or write it on a copy")
    digests = hash_files(root, dataset_files(root), jobs)
    return fileio.write_text(root / MANIFEST_NAME, "".join(f"{d}  {rel}\n" for rel, d in digests.items()))


def read_checksums(path: Path) -> dict[str, str]:
    entries = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line)
        if not m:
            raise DataError(f"{path}:{n}: not a sha256sum line", "regenerate it with --write-manifest")
        entries[m.group(2)] = m.group(1)
    return entries


@dataclass
class ChecksumCheck:
    missing: list[str]
    changed: list[str]
    extra: list[str]
    checked: int

    @property
    def ok(self) -> bool:
        return not (self.missing or self.changed)


def check_checksums(root: str | os.PathLike, jobs: int = 4) -> ChecksumCheck:
    root = object_storage.location(root)
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        raise DataError(f"{manifest}: no manifest", "create one with `cloudmask data verify DIR --write-manifest`")
    expected = read_checksums(manifest)
    present = {p.relative_to(root).as_posix(): p for p in dataset_files(root)}
    missing = sorted(set(expected) - set(present))
    common = sorted(set(expected) & set(present))
    digests = hash_files(root, [present[r] for r in common], jobs)
    changed = [r for r in common if digests[r] != expected[r]]
    extra = sorted(set(present) - set(expected))
    return ChecksumCheck(missing, changed, extra, len(common))


def checksums_digest(root: str | os.PathLike) -> str | None:
    """sha256 of the dataset's manifest file, the dataset's identity in provenance records."""
    path = object_storage.location(root) / MANIFEST_NAME
    with object_storage.errors(path):
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
