"""User-facing errors: one line naming the file or key and the fix; the CLI prints them without a traceback."""


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
