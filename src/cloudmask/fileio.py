"""Atomic writes: a temporary file (or directory) beside the target, renamed into place, so a reader (a report,
a resumed run, a user) never sees a half-written file and an interruption never destroys the previous version."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence

from .errors import OutputError


@contextmanager
def writing(target: str | os.PathLike, *also: str | os.PathLike):
    """OS errors of writing ``target`` (or its temporary ``also`` names) become one OutputError naming it; an
    error about some other file (a source being read) passes through unchanged."""
    ours = {None, str(target), *map(str, also)}
    try:
        yield
    except FileExistsError:
        raise  # not a fault: the caller decides (a taken name)
    except OSError as e:
        if e.filename not in ours:
            raise
        raise OutputError(target, e) from e


@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path next to ``target``; rename it onto ``target`` if the block succeeds. A failed block
    (a full disk, say) leaves the previous ``target`` as it was and no temporary file."""
    target = Path(target)
    with writing(target):
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
        os.close(fd)
    try:
        with writing(target, tmp):
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
    with writing(target, target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(target.parent, of=target.name)  # a killed writer's partial copy of the same target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_writer()}.", suffix=".tmp", dir=target.parent))
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


@contextmanager
def replacing_dir(target: str | os.PathLike):
    """Yield a new temporary directory beside ``target``; when the block succeeds it replaces ``target`` whole
    (the old one renamed aside, the new one renamed in, the old one removed). A kill at any point leaves the old
    directory or the new one, and temporary directories that the next writer of ``target`` removes."""
    target = Path(target)
    with writing(target, target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(target.parent, of=target.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_writer()}.", suffix=".tmp", dir=target.parent))
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        with writing(target, tmp):
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_writer()}.", suffix=".tmp", dir=target.parent))
                os.rename(target, old)  # onto an empty directory: allowed, and atomic
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _writer() -> str:
    """Who writes a temporary directory, in its name: the next writer removes it only once that process is gone."""
    return f"{socket.gethostname().split('.')[0]}-{os.getpid()}"


_TEMP = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<host>[^.]+)-(?P<pid>\d+)\.)?[^.]+\.tmp[^/]*$")


def remove_leftovers(directory: str | os.PathLike, of: str | None = None) -> list[Path]:
    """Remove the temporary files and directories that killed writers left in ``directory`` (only those for
    target ``of`` when given). A name that carries its writer (``atomic_dir``) is removed once that process is
    gone from this host; one that does not (``atomic_path``) only when the caller owns the directory's writes
    (a run directory under its lock) and asks for every target (``of=None``)."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or (of is not None and m["name"] != of) or not _dead(m["host"], m["pid"], owned=of is None):
            continue
        path = Path(entry.path)
        try:
            shutil.rmtree(path) if entry.is_dir(follow_symlinks=False) else path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def _dead(host: str | None, pid: str | None, owned: bool) -> bool:
    if pid is None:
        return owned
    if host != socket.gethostname().split(".")[0]:
        return False  # another node's process: it may be alive
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def copy_if_changed(src: Path, dst: Path) -> bool:
    """Copy ``src`` to ``dst`` (atomically, with its time stamp) unless ``dst`` already has the same size and
    modification time; True if it copied. Staging uses it so a repeated stage copies nothing. ``src`` may be an
    object-storage path (remote.py): it is downloaded."""
    st = src.stat()
    if dst.is_file():
        have = dst.stat()
        if have.st_size == st.st_size and have.st_mtime_ns == st.st_mtime_ns:
            return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        if isinstance(src, Path):
            shutil.copy2(src, tmp)
        else:
            src.fs.get_file(src.path, str(tmp))
            os.utime(tmp, ns=(st.st_mtime_ns, st.st_mtime_ns))
    return True


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


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


class AppendLog(logging.FileHandler):
    """A log file appended to line by line (console.log, mlperf.log). A failed write is kept in ``error``
    (as OutputError) instead of logging's traceback on stderr for every later line."""

    def __init__(self, path: Path):
        with writing(path):
            super().__init__(path, mode="a")
        self.error: OutputError | None = None

    def handleError(self, record):
        exc = sys.exc_info()[1]
        if self.error is None and isinstance(exc, OSError):
            self.error = OutputError(self.baseFilename, exc)
        elif not isinstance(exc, OSError):
            super().handleError(record)


def _jsonable(value):
    # numpy scalars and paths appear in results; everything else is a bug worth a loud error
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
