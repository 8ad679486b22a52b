"""Atomic writes: a temporary file (or directory) beside the target, renamed into place, so a reader (a report,
a resumed run, a user) never sees a half-written file and an interruption never destroys the previous version."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence


@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path next to ``target``; rename it onto ``target`` if the block succeeds."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are shared like any other file
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(target: str | os.PathLike):
    """Yield a new temporary directory beside ``target``; rename it to ``target`` when the block succeeds.

    A failed block removes the partial directory. When ``target`` appeared meanwhile (another process built
    the same thing first) the temporary one is removed and FileExistsError raised: the caller decides whether
    the other copy is as good as its own."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            os.rename(tmp, target)
        except OSError as e:
            if target.exists():
                raise FileExistsError(str(target)) from e
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_if_changed(src: Path, dst: Path) -> bool:
    """Copy ``src`` to ``dst`` (atomically, with its time stamp) unless ``dst`` already has the same size and
    modification time; True if it copied. Staging uses it so a repeated stage copies nothing."""
    st = src.stat()
    if dst.is_file():
        have = dst.stat()
        if have.st_size == st.st_size and have.st_mtime_ns == st.st_mtime_ns:
            return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        shutil.copy2(src, tmp)
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(target: str | os.PathLike, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    return Path(target)


def write_json(target: str | os.PathLike, obj) -> Path:
    return write_text(target, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def csv_text(fields: Sequence[str], rows: Iterable[dict]) -> str:
    """A CSV document with a header row; keys of a row that are not in ``fields`` are an error."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(target: str | os.PathLike, fields: Sequence[str], rows: Iterable[dict]) -> Path:
    return write_text(target, csv_text(fields, rows))


def read_csv(path: Path) -> list[dict]:
    """The rows of a CSV file as dicts of strings (none when the file does not exist)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _jsonable(value):
    # numpy scalars and paths appear in results; everything else is a bug worth a loud error
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
