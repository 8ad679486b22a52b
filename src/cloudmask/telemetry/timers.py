"""Named, nested phase timers on the monotonic clock (``timers.csv``, the console table, greppable lines)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .. import fileio
from ..cli.tables import text_table


@dataclass
class TimerRecord:
    name: str  # unique path, e.g. "run/train/epoch 3"
    depth: int
    start: float  # seconds since the timers were created
    seconds: float | None = None
    attempt: int = 1


class Timers:
    """Named, nested phases on the monotonic clock. Names are made unique by their path and a #n suffix."""

    def __init__(self, attempt: int = 1):
        self._t0 = time.perf_counter()
        self._open: list[TimerRecord] = []
        self.records: list[TimerRecord] = []
        self.attempt = attempt

    def start(self, name: str) -> TimerRecord:
        path = f"{self._open[-1].name}/{name}" if self._open else name
        taken = {r.name for r in self.records}
        unique, n = path, 2
        while unique in taken:
            unique, n = f"{path}#{n}", n + 1
        record = TimerRecord(unique, len(self._open), time.perf_counter() - self._t0, attempt=self.attempt)
        self.records.append(record)
        self._open.append(record)
        return record

    def stop(self, record: TimerRecord | None = None) -> float:
        """Stop ``record`` (default: the innermost open phase) and any phase opened inside it."""
        record = record or self._open[-1]
        now = time.perf_counter() - self._t0
        while self._open:
            inner = self._open.pop()
            inner.seconds = now - inner.start
            if inner is record:
                break
        return record.seconds or 0.0

    def close(self) -> None:
        while self._open:
            self.stop()

    def seconds(self, name: str) -> float | None:
        return next((r.seconds for r in self.records if r.name == name), None)

    # -- output ---------------------------------------------------------------------------------------------
    CSV_FIELDS = ["attempt", "name", "depth", "start_s", "seconds"]

    def rows(self) -> list[dict]:
        return [{"attempt": r.attempt, "name": r.name, "depth": r.depth, "start_s": round(r.start, 6),
                 "seconds": None if r.seconds is None else round(r.seconds, 6)} for r in self.records]

    def csv_lines(self) -> list[str]:
        """Greppable lines for console logs: ``grep '^# csv,timer' console.log``."""
        head = "# csv,timer," + ",".join(self.CSV_FIELDS)
        return [head] + [f"# csv,timer,{r['attempt']},{r['name']},{r['depth']},{r['start_s']},{r['seconds']}"
                         for r in self.rows()]

    def table(self) -> str:
        total = next((r.seconds for r in self.records if r.depth == 0 and r.seconds), None)
        rows = []
        for r in self.records:
            share = f"{100 * r.seconds / total:.1f}" if total and r.seconds is not None else None
            seconds = f"{r.seconds:.2f}" if r.seconds is not None else None
            rows.append(["  " * r.depth + r.name.rsplit("/", 1)[-1], seconds, share, f"{r.start:.2f}"])
        return text_table(["phase", "seconds", "% of run", "starts at s"], rows, title="timers")

    def write_csv(self, path: Path) -> None:
        """timers.csv with the rows of earlier attempts (a resumed run) kept before this attempt's."""
        earlier = [r for r in fileio.read_csv(path) if int(r["attempt"]) != self.attempt]
        fileio.write_csv(path, self.CSV_FIELDS, earlier + self.rows())
