"""One process per run directory: ``RUN/.lock``, an exclusive ``flock`` held by train, ``--resume`` and infer for
the whole run. A second process gets one line naming the holder (host, pid, since) and exits non-zero. The
kernel releases the lock with the process that held it, however it ended (SIGKILL, a node's OOM killer), so a
dead holder's lock is simply taken over; the file's text is only there to name the holder.

``holder`` tells a reader (``cloudmask report``) whether a run is in progress without taking the lock from it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from .. import fileio
from ..errors import RunDirError

log = logging.getLogger(__name__)

LOCK = ".lock"
_SETTLE_S = 1.0  # a reader (report) holds a shared lock for an instant: wait that long before calling it taken


@dataclass
class Holder:
    host: str
    pid: int
    since: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since}"


class RunLock:
    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd = path, fd

    @classmethod
    def take(cls, run_path: Path) -> "RunLock":
        """The run's lock, or a RunDirError naming the process that holds it."""
        path = Path(run_path) / LOCK
        with fileio.writing(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        deadline = time.monotonic() + _SETTLE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                found = _read(fd)
                os.close(fd)
                who = found.describe() if found else "another process"
                raise RunDirError(f"{run_path}: in use by {who}",
                                  "one process per run: wait for it to end, or stop it first") from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                log.warning("%s: this file system has no locks (%s): nothing stops a second process from "
                            "writing this run", run_path, e.strerror)
                return cls(path, fd)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with fileio.writing(path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # the text names a holder only while there is one
        except OSError:
            pass
        os.close(self.fd)  # closing the last descriptor releases the flock
        self.fd = None


def holder(run_path: Path) -> Holder | None:
    """The process holding the run's lock, or None when no process does (or the run has no lock file)."""
    try:
        fd = os.open(Path(run_path) / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd) or Holder("?", 0, "?")
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read(fd: int) -> Holder | None:
    try:
        found = json.loads(os.pread(fd, 4096, 0).decode() or "null")
        return Holder(str(found["host"]), int(found["pid"]), str(found["since"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
