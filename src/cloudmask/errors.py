"""User-facing errors: one line naming the file or key and the fix; the CLI prints them without a traceback."""

import errno
import os
import signal


class CloudmaskError(Exception):
    """A problem the user can fix. ``exit_code`` is what the CLI returns."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(CloudmaskError):
    """A bad configuration key or value."""

    exit_code = 2


class DataError(CloudmaskError):
    """A missing, unreadable or malformed dataset file or directory."""


class RunDirError(CloudmaskError):
    """A run directory that exists, is missing, or cannot be resumed."""


_OUTPUT_FIXES = {
    errno.ENOSPC: "free space there, or write the run elsewhere (--out, or --set output.root=DIR)",
    errno.EDQUOT: "the disk quota is used up: free some of it, or write the run elsewhere (--out, output.root)",
    errno.EROFS: "the file system is read-only: write the run to a writable one (--out, or output.root)",
    errno.EACCES: "no permission to write there: choose a directory you own (--out, or output.root)",
    errno.EPERM: "writing there is not permitted (an immutable or append-only file?): check `lsattr`, or "
                 "write the run elsewhere",
}


class OutputError(CloudmaskError):
    """A file of the run could not be written (disk full, read-only, no permission): the OS error, the file and
    what to do. Every write of a run goes through fileio, which raises this instead of the bare OSError."""

    def __init__(self, path: os.PathLike | str, error: OSError):
        reason = error.strerror or str(error)
        super().__init__(f"{path}: cannot write ({reason})",
                         _OUTPUT_FIXES.get(error.errno, "check the file system, then resume or start again"))
        self.path, self.errno = str(path), error.errno


def describe_os_error(error: OSError) -> str:
    """One line for an OS error that reached the command line without passing through fileio."""
    where = error.filename or "a file of the run"
    if error.errno in _OUTPUT_FIXES:
        return str(OutputError(where, error))
    return f"{where}: {error.strerror or error} (set CLOUDMASK_DEBUG=1 for the traceback, and report it)"


class TrainingInterrupted(CloudmaskError):
    """The run was stopped by a signal and can be resumed. The exit code is the shell's for that signal.
    ``during``: "training" (the last finished epoch is kept) or "inference" (training is complete)."""

    def __init__(self, signum: int, epochs_done: int, run, during: str = "training"):
        name = signal.Signals(signum).name
        done = (f"training stopped after {epochs_done} completed epoch(s); checkpoint kept" if during == "training"
                else f"stopped during {during}; the trained model ({epochs_done} epochs) is kept")
        super().__init__(f"{name} received: {done} in {run}",
                         f"continue with `cloudmask train --resume --out {run}`")
        self.signum = signum
        self.exit_code = 128 + signum
