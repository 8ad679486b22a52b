"""Progress of a long task where the user is looking: a live line on a terminal, and in a batch log (SLURM
output, nohup, CI) a plain line every ``interval_s`` seconds or tenth of the task, so ``tail -f`` shows the run
moving long before its first epoch ends.

``output.progress`` chooses: ``auto`` (live on a terminal, lines otherwise), ``bar``, ``lines`` or ``off``
(``--quiet``). Lines go through the package logger, so they also reach the run's console.log.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger('cloudmask.cli.progress')

MODES = ("auto", "bar", "lines", "off")


def resolve(mode: str) -> str:
    """``auto`` as what stdout is: ``bar`` on a terminal, ``lines`` otherwise."""
    if mode == "auto":
        return "bar" if sys.stdout.isatty() else "lines"
    return mode


def _one(unit: str) -> str:
    return {"patches": "patch", "images": "image", "files": "file"}.get(unit, unit)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Counts ``done`` of ``total`` steps of one task (``label``, e.g. "epoch 1/5 training") and reports it.

    ``items_per_step`` turns steps into a rate (patches/s); the ETA is the remaining steps at the rate so far.
    A line is written at the first step, then whenever ``interval_s`` passed or another tenth of the task is
    done, and at the end."""

    def __init__(self, label: str, total: int, mode: str = "auto", unit: str = "patches",
                 items_per_step: float | None = None, interval_s: float = 30.0, started: float | None = None):
        self.label, self.total, self.mode = label, max(int(total), 0), resolve(mode)
        self.unit, self.items_per_step, self.interval_s = unit, items_per_step, interval_s
        self.done = 0
        self._t0 = time.perf_counter() if started is None else started  # perf_counter() when the work began
        self._last_t = self._t0
        self._last_tenth = 0
        self._reported = -1  # the count of the last line written
        self._live = False

    def update(self, done: int | None = None) -> None:
        """Record ``done`` steps finished (default: one more)."""
        self.done = self.done + 1 if done is None else done
        if self.mode == "off":
            return
        now = time.perf_counter()
        if self.mode == "bar":
            self._write_live(now)
            return
        tenth = 10 * self.done // self.total if self.total else 10
        if self.done == self._reported:
            return  # the same count again (a caller's final update after the last step): one line is enough
        if self.done == 1 or self.done >= self.total or tenth > self._last_tenth \
                or now - self._last_t >= self.interval_s:
            self._last_t, self._last_tenth, self._reported = now, tenth, self.done
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self._t0
        parts = [f"{self.label}  {self.done}/{self.total}"]
        if self.total:
            parts.append(f"{100 * self.done / self.total:3.0f} %")
        if self.items_per_step and elapsed > 0 and self.done:
            rate = self.items_per_step * self.done / elapsed
            # a slow rate as time per item: 32 s per image is "32.0 s/image", not "0.0 images/s"
            parts.append(f"{rate:.1f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.1f} s/{_one(self.unit)}")
        parts.append(f"{_clock(elapsed)} elapsed")
        if 0 < self.done < self.total:
            parts.append(f"ETA {_clock(elapsed / self.done * (self.total - self.done))}")
        return "  ".join(parts)

    def _write_live(self, now: float) -> None:
        end = "\n" if self.done >= self.total else ""
        print(f"\r{self.line(now)}\033[K", end=end, file=sys.stdout, flush=True)
        self._live = not end

    def close(self) -> None:
        """End a live line that stopped short of ``total`` (a stop, an error)."""
        if self._live:
            print(file=sys.stdout, flush=True)
            self._live = False
