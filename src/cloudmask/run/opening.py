"""Opening a training run: a new run directory, or an interrupted run to resume (its saved config, refused when
the run has finished or the resume would change the config), and under ``distribute.strategy=multi_worker`` the
cluster, whose workers all check the data before the chief creates the run directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..cli import console
from ..config import Config, flatten, load_config
from ..errors import ConfigError, RunDirError
from ..inputs import run_inputs
from ..training import cluster as cluster_lib
from . import recovery
from .run_dir import RunDir
from .state import RunState


@dataclass
class OpenedRun:
    cfg: Config
    run_dir: RunDir
    state: RunState
    cluster: object = None
    checkpoints: Path | None = None  # where checkpoints are read (the chief's run directory for every worker)


def open_for_training(cfg: Config | None, out, resume: bool, changes: dict | None) -> OpenedRun:
    if resume:
        if out is None:
            raise RunDirError("--resume needs the run directory", "pass --out DIR of the run to continue")
        resumed = RunDir.existing(out)
        cfg = _resume_config(resumed, changes)
    assert cfg is not None
    cluster = connect(cfg)

    def check_data() -> None:  # data problems are found before a run directory is created
        if not resume:
            run_inputs.check(cfg)

    def open_run() -> tuple[RunDir | None, RunState]:
        if resume:
            if cluster is None or cluster.is_chief:
                resumed.lock()  # one process per run; what a killed writer left is cleared under it
                try:
                    _refuse_finished(resumed)
                    return resumed, recovery.resumable_state(resumed)
                except BaseException:
                    resumed.release()
                    raise
            return resumed, RunState.load(resumed.path)
        run = RunDir.create(out, cfg) if cluster is None or cluster.is_chief else None
        return run, RunState.load(run.path) if run else RunState()

    if cluster is None:
        check_data()
        return OpenedRun(cfg, *open_run())
    cluster.settle(check_data)  # every worker must see the data before the chief creates the run directory
    opened, state = cluster.settle(open_run)
    chief_run, saved = cluster.exchange([str(opened.path), state.to_dict()] if cluster.is_chief else None)[0]
    if cluster.is_chief:
        return OpenedRun(cfg, opened, state, cluster, Path(chief_run))
    scratch = RunDir.create_scratch(cfg, f"cloudmask-worker{cluster.rank}-")
    return OpenedRun(cfg, scratch, RunState.from_dict(saved).moved_to(scratch.path), cluster, Path(chief_run))


def connect(cfg: Config):
    """The cluster of a multi_worker run (the chief speaks for the run; the others only report problems)."""
    if cfg.distribute.strategy != "multi_worker":
        return None
    cluster = cluster_lib.connect(cfg)
    if not cluster.is_chief:
        console.quiet()
    return cluster


def _refuse_finished(run: RunDir) -> None:
    """A finished run is never rewritten (its inference, attempts and MLPerf run_stop would change)."""
    if RunState.load(run.path).phase == "done":
        raise RunDirError(f"{run.path}: this run has finished; there is nothing to resume",
                          f"start a new run, or score its model again with `cloudmask infer {run.path}`")


def _resume_config(run: RunDir, changes: dict | None) -> Config:
    """The run's saved config; a resume that would change any key is refused, naming the keys."""
    saved = run.config()
    if changes:
        requested = load_config(changes.get("config"), changes.get("overrides", ()), base=saved.to_dict(),
                                values=changes.get("values", {}))
        a, b = flatten(saved.to_dict()), flatten(requested.to_dict())
        differing = sorted(k for k in a if a[k] != b.get(k))
        if differing:
            shown = ", ".join(f"{k}: {a[k]!r} -> {b[k]!r}" for k in differing[:4])
            raise ConfigError(f"{run.path} was started with a different config ({shown})",
                              "--resume continues the same run: drop --config/--set, or start a new run")
    return saved
