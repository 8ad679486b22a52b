"""Stop requests: SIGTERM, SIGUSR1 and SIGINT (SLURM's time limit, scancel, preemption, a user's kill or
Ctrl-C) only set a flag for the whole of a run; training checks it at every batch, inference between images,
the session before it writes results. The run then stops cleanly with a resumable state instead of dying
mid-write. A second Ctrl-C is the impatient user's: it interrupts at once (KeyboardInterrupt; the files are
still whole, being written atomically)."""

from __future__ import annotations

import signal
import threading


class StopSignals:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:  # the first signal names the stop; a repeat (srun and the shell both pass
            self.signum = signum  # scancel's TERM on) changes nothing
