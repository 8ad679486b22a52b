"""The benchmark's modes, each one run session (session.py) with its phases switched on:

* ``run``: ``cloudmask train``, ``train --resume`` (and a requeued SLURM job), and every worker of a
  multi-worker run;
* ``bench``: ``run`` on a cached synthetic dataset unless data is given, then a summary table;
* ``infer_only``: ``cloudmask infer``, a trained run's model scored in a new run directory;
* ``throughput``: ``bench --mode throughput``, steady-state rates and no run directory.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from ..cli import console
from ..config import Config
from ..dataset import synth
from ..dataset.files import resolve_layout
from ..errors import CloudmaskError, RunDirError
from . import throughput as throughput_lib
from .results import summary_table
from .run_dir import MODEL, RunDir
from .session import RunSession
from .state import RunState

log = logging.getLogger(__name__)


def run(cfg: Config | None, out: str | os.PathLike | None = None, resume: bool = False,
        resume_changes: dict | None = None, stage_to: str | os.PathLike | None = None) -> dict:
    """Train (or resume) and evaluate; returns results.json's content.

    When resuming, ``cfg`` is ignored: the run's saved config is used, and ``resume_changes``
    ({"config": file, "overrides": [...], "values": {...}}) must not change it. ``stage_to`` copies the dataset
    there first (node-local disk); it is not part of the config because it differs per node, not per result."""
    with RunSession.for_training(cfg, out, resume, resume_changes) as session:
        session.prepare(stage_to)
        session.start()
        session.train()
        if not session.is_chief:
            return session.hand_over()
        session.infer()
        return session.finish()


def bench(cfg: Config, data_root: str | None = None, out: str | None = None) -> dict:
    """Train + infer on ``data_root`` or on a cached synthetic dataset, then print a summary table."""
    console.setup()
    results = run(_with_data(cfg, data_root), out)
    log.info("\n%s", summary_table(results))
    return results


def throughput(cfg: Config, data_root: str | None, warmup: int, steps: int, as_json: bool) -> dict:
    """``bench --mode throughput``: a table or JSON on stdout."""
    console.setup()
    if as_json:
        console.quiet()  # stdout carries the JSON alone
    with RunSession.for_throughput(_with_data(cfg, data_root)) as session:
        session.prepare(distributed=False)
        result = throughput_lib.measure(session, warmup, steps)
    if session.is_chief:
        print(json.dumps(result, indent=2) if as_json else throughput_lib.table(result))
    return result


def infer_only(source: str | os.PathLike, checkpoint: str = "final", data_root: str | None = None,
               out: str | None = None, overrides: list[str] = ()) -> dict:
    """Score a trained run's model on the test set in a new run directory (the source run is only read)."""
    src = RunDir.existing(source, "score")
    cfg = src.config()
    values = {"data.root": data_root, "data.test_dir": None} if data_root else {}
    cfg = cfg.with_values(values, "--data").with_overrides(overrides)
    model_file = _model_file(src, checkpoint)
    layout = resolve_layout(cfg.data.root, None, cfg.data.test_dir, need_train=False)
    target = Path(out) if out else src.path.with_name(f"{src.path.name}-infer-{checkpoint}-"
                                                       f"{time.strftime('%Y%m%d-%H%M%S')}")
    with RunSession.for_inference(cfg, target) as session:
        session.prepare_inference(layout.test_dir, model_file)
        session.infer()
        return session.finish_inference(src.path, checkpoint, model_file)


def _model_file(src: RunDir, checkpoint: str) -> Path:
    name = MODEL if checkpoint == "final" else RunState.load(src.path).checkpoint(checkpoint)
    if name is None:
        raise RunDirError(f"{src.path}: has no {checkpoint} checkpoint", "use --checkpoint final|best|latest")
    model_file = src / name
    if not model_file.is_file():
        raise RunDirError(f"{model_file}: model file missing", "the source run did not finish training")
    return model_file


def _with_data(cfg: Config, data_root: str | None) -> Config:
    """``data_root``, else the config's data, else the cached synthetic dataset."""
    if data_root is None and not (cfg.data.root or cfg.data.train_dir or cfg.data.store):
        data_root = str(synth.synthetic_dataset(cfg))
    if data_root is not None:
        cfg = cfg.with_values({"data.root": str(data_root)}, "--data")
    return cfg


def dataset_if_present(root: str) -> str | None:
    """``root`` if it holds a dataset; otherwise None, after saying why synthetic data is used instead."""
    console.setup()
    try:
        resolve_layout(root)
        return root
    except CloudmaskError as e:
        log.warning("NOTICE: no dataset in %s (%s); running on SYNTHETIC data instead. Accuracy and timings "
                    "on synthetic data are not comparable with the benchmark's published numbers.", root, e)
        return None
