"""Stop requests: SIGTERM, SIGUSR1, SIGINT and SIGHUP (SLURM's time limit, scancel, preemption, a user's kill,
Ctrl-C, a closed terminal) only set a flag for the whole of a run; training checks it at every batch, inference
between images, the session before it writes results. The run then stops cleanly with a resumable state instead
of dying mid-write. A second Ctrl-C is the impatient user's: it interrupts at once (KeyboardInterrupt; the files
are still whole, being written atomically).

A stop always ends the process within ``STOP_GRACE_S``: the flag is set by a watcher thread that reads the
signal from a wake-up pipe (Python runs its own handlers only between bytecodes of the main thread, which may
sit for minutes in a framework call or an object-storage read), and if the process has not ended by the grace
period it says so in one line and exits with 128 + the signal. Nothing is lost by that: every file of a run is
committed atomically and in an order a resume repairs (recovery.py)."""

from __future__ import annotations

import os
import signal
import sys
import threading

STOP_GRACE_S = float(os.environ.get("CLOUDMASK_STOP_GRACE_S", "20"))


class StopSignals:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}
        self._wakeup: tuple[int, int] | None = None
        self._previous_fd = -1
        self._deadline: threading.Timer | None = None
        self._interrupts = 0

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
            return self
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        self._previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        self._wakeup = (read_end, write_end)
        threading.Thread(target=self._watch, args=(read_end,), name="cloudmask-stop-watch", daemon=True).start()
        return self

    def uninstall(self) -> None:
        """The handlers before ``install``; the run has stopped, so the grace period ends too (a process that
        then hangs on its way out is ended by cli.main.entry)."""
        if self._deadline is not None:
            self._deadline.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_fd)
            os.close(self._wakeup[1])  # the watcher reads end-of-file and closes the read end
            self._wakeup = None

    def _watch(self, read_end: int) -> None:
        try:
            while data := os.read(read_end, 64):
                for signum in data:
                    if signum in self.SIGNALS:
                        self._note(signum)
        finally:
            os.close(read_end)

    def _note(self, signum: int) -> None:
        if self.signum is None:  # the first signal names the stop; a repeat (srun and the shell both pass
            self.signum = signum  # scancel's TERM on) changes nothing
        if self._deadline is None and STOP_GRACE_S > 0:
            self._deadline = threading.Timer(STOP_GRACE_S, _give_up, (self.signum,))
            self._deadline.daemon = True
            self._deadline.start()

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt
        self._note(signum)


def _give_up(signum: int) -> None:
    """The stop did not end the process in time: one line, and the exit code of the signal."""
    name = signal.Signals(signum).name
    waiting = [t.name for t in threading.enumerate() if t is not threading.current_thread() and t.is_alive()
               and not t.name.startswith("cloudmask-stop")]
    line = (f"cloudmask: error: {name} received, but the process did not stop within {STOP_GRACE_S:.0f} s "
            f"(waiting on {', '.join(waiting[:3]) or 'the main thread'}); exiting now (what the run committed is "
            "kept: continue it with --resume)\n")
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    try:
        os.write(2, line.encode())
    except OSError:
        pass
    os._exit(128 + signum)
