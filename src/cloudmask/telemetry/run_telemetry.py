"""Telemetry of one attempt of a run: its phase timers (timers.py), energy meter (energy.py) and provenance
manifest (provenance.py), written into its run directory. ``phase`` opens a timer phase and an energy window
together, so the two always cover the same span.

A resumed run is several attempts (several processes, maybe on different nodes): ``timers.csv`` keeps every
attempt's rows, ``manifest.json`` keeps earlier attempts under ``previous_attempts``, and the energy totals
add the earlier attempts' (carried in state.json, merged by energy.merge_energy).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import fileio
from ..cli.console import FILE_ONLY
from .energy import EnergyMeter
from .energy_sources import POWERCAP
from .provenance import collect_provenance, finish_provenance
from .timers import TimerRecord, Timers


@dataclass
class OpenPhase:
    timer: TimerRecord
    window: str | None


class RunTelemetry:
    def __init__(self, cfg, run_path: Path, attempt: int, environ=os.environ, nvml=None, powercap: Path = POWERCAP,
                 energy: bool = True):
        self.cfg = cfg
        self.path = Path(run_path)
        self.attempt = attempt
        self.timers = Timers(attempt)
        power_csv = self.path / "power.csv" if cfg.telemetry.power_csv else None
        self.meter = EnergyMeter.for_config(cfg, power_csv, environ, nvml, powercap) if energy else EnergyMeter([])
        self._nvml = nvml
        self._run: OpenPhase | None = None
        self.manifest: dict | None = None
        self._started = time.time()

    def start(self) -> "RunTelemetry":
        self.meter.start()
        self._run = self.open("run")
        return self

    # -- phases: a timer and an energy window opened and closed together -----------------------------------
    def open(self, name: str, window: str | None = "") -> OpenPhase:
        """Start timer phase ``name`` and energy window ``window`` (default: the same name; None: no window)."""
        window = name if window == "" else window
        if window is not None:
            self.meter.begin(window)
        return OpenPhase(self.timers.start(name), window)

    def close(self, phase: OpenPhase) -> None:
        """End both, unless already ended (stopping an outer timer phase stops the inner ones too)."""
        if phase.window is not None:
            self.meter.end(phase.window)
            phase.window = None
        if phase.timer.seconds is None:
            self.timers.stop(phase.timer)

    @contextmanager
    def phase(self, name: str, window: str | None = ""):
        opened = self.open(name, window)
        try:
            yield opened
        finally:
            self.close(opened)

    # -- outputs --------------------------------------------------------------------------------------------
    def write_provenance(self, dataset_root: Path | None, dataset_digest: str | None, files: dict) -> None:
        manifest = collect_provenance(self.cfg, dataset_root, dataset_digest, self._started, self._nvml)
        manifest["dataset"].update(files)
        manifest["energy_methods"] = {s.kind: {"method": s.method, "reason": s.reason} for s in self.meter.sources}
        previous = self.path / "manifest.json"
        if previous.is_file():
            try:
                old = json.loads(previous.read_text())
                manifest["previous_attempts"] = old.pop("previous_attempts", []) + [old]
            except (OSError, ValueError):
                manifest["previous_attempts"] = []
        manifest["attempt"] = self.attempt
        self.manifest = manifest
        fileio.write_json(previous, manifest)

    def energy_so_far(self) -> dict:
        """Close the run's energy window now and summarise it (a worker hands its energy over before the end)."""
        self._end_run_window()
        return self.meter.summary()

    def _end_run_window(self) -> None:
        if self._run is not None and self._run.window is not None:
            self.meter.end(self._run.window)
            self._run.window = None

    def finish(self) -> dict:
        """Close every window and timer, stop sampling, write timers.csv and manifest.json; return energy."""
        self._end_run_window()
        self.meter.stop()
        self.timers.close()
        self.timers.write_csv(self.path / "timers.csv")
        if self.manifest is not None:
            fileio.write_json(self.path / "manifest.json", finish_provenance(self.manifest))
        return self.meter.summary()

    def seconds_in(self, *names: str) -> float:
        """Seconds spent in the named timer phases (``run/train``), by this attempt and every earlier one
        (timers.csv, written by ``finish``)."""
        rows = fileio.read_csv(self.path / "timers.csv")
        return sum(float(r["seconds"]) for r in rows if r["name"] in names and r["seconds"] not in ("", None))

    def show_timers(self, log) -> None:
        """The timer table on the console (and, for `grep '^# csv,timer' console.log`, as CSV in the file)."""
        log.info("\n%s", self.timers.table())
        log.info("timers as CSV:\n%s", "\n".join(self.timers.csv_lines()), extra={FILE_ONLY: True})
