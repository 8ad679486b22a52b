"""User-facing errors: one line naming the file or key and the fix; the CLI prints them without a traceback."""

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


class TrainingInterrupted(CloudmaskError):
    """Training was stopped by a signal; the run can be resumed. The exit code is the shell's for that signal."""

    def __init__(self, signum: int, epochs_done: int, run):
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: training stopped after {epochs_done} completed epoch(s); "
                         f"checkpoint kept in {run}", f"continue with `cloudmask train --resume --out {run}`")
        self.signum = signum
        self.exit_code = 128 + signum
