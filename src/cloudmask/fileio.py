"""Atomic writes: a temporary file in the target's directory renamed into place, so a reader (a report, a
resumed run, a user) never sees a half-written file and an interruption never destroys the previous version."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


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


def _jsonable(value):
    # numpy scalars and paths appear in results; everything else is a bug worth a loud error
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
