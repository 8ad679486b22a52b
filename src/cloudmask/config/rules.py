"""The constraints on every config key (``RULES``, checked by ``Config.validate``). How each key relates to the
reference run is in ledger.py."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from ..cli.progress import MODES as PROGRESS_MODES


@dataclass(frozen=True)
class Rule:
    """How to check one key: ``check`` returns an error text or None."""

    describe: str
    check: Callable[[Any], str | None]


def _int(lo: int | None = None, hi: int | None = None, optional: bool = False) -> Rule:
    def check(v):
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            return "must be an integer"
        if lo is not None and v < lo:
            return f"must be >= {lo}"
        if hi is not None and v > hi:
            return f"must be <= {hi}"
        return None

    span = f" in [{lo}, {hi if hi is not None else 'inf'}]" if lo is not None else ""
    return Rule(f"integer{span}{' or null' if optional else ''}", check)


def _float(lo: float | None = None, hi: float | None = None, open_lo=False, open_hi=False) -> Rule:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return "must be a finite number"
        if lo is not None and (v < lo or (open_lo and v == lo)):
            return f"must be {'>' if open_lo else '>='} {lo}"
        if hi is not None and (v > hi or (open_hi and v == hi)):
            return f"must be {'<' if open_hi else '<='} {hi}"
        return None

    return Rule("number", check)


def _bool() -> Rule:
    return Rule("true or false", lambda v: None if isinstance(v, bool) else "must be true or false")


def _choice(*choices) -> Rule:
    return Rule(
        " | ".join(map(str, choices)),
        lambda v: None if v in choices else f"must be one of {', '.join(map(str, choices))}",
    )


def _text(optional: bool = False) -> Rule:
    def check(v):
        if v is None and optional:
            return None
        if not isinstance(v, str) or not v.strip():
            return "must be a non-empty string"
        return None

    return Rule("string" + (" or null" if optional else ""), check)


def _auto_or(rule: Rule) -> Rule:
    return Rule(f"auto or {rule.describe}", lambda v: None if v == "auto" else rule.check(v))


DATA_LOCATIONS = ("root", "train_dir", "test_dir", "store")
WORD_OFF = ("output.progress", "data.cache")  # settings that take the word off

RULES: dict[str, Rule] = {
    "seed": _int(0, 2**31 - 1),
    "data.root": _text(optional=True),
    "data.train_dir": _text(optional=True),
    "data.test_dir": _text(optional=True),
    "data.normalisation": _choice("fixed", "zscore"),
    "data.train_split": _float(0.0, 1.0, open_lo=True, open_hi=True),
    "data.split_seed": _int(0, 2**32 - 1),
    "data.min_finite_fraction": _float(0.0, 1.0),
    "data.skip_bad": _bool(),
    "data.read_threads": _auto_or(_int(1, 64)),
    "data.cache": Rule("auto | off | a directory", lambda v: None if isinstance(v, str) and v.strip()
                       else "must be auto, off or a directory"),
    "data.store": _text(optional=True),
    "data.resident": _choice("none", "host", "device"),
    "data.remote.anonymous": Rule("auto | true | false", lambda v: None if v in ("auto", True, False)
                                  else "must be auto, true or false"),
    "data.remote.retries": _int(1, 100),
    "data.remote.endpoint_url": _text(optional=True),
    "image.height": _int(16),
    "image.width": _int(16),
    "image.patch_size": _int(8),
    "image.overlap": _int(0),
    "model.filters": _int(1, 1024),
    "model.depth": _int(1, 8),
    "train.epochs": _int(1, 100_000),
    "train.batch_size": _int(1, 65_536),
    "train.micro_batch_size": _int(1, 65_536, optional=True),
    "train.learning_rate": _float(0.0, 10.0, open_lo=True),
    "train.shuffle_buffer": _int(1, 1_000_000),
    "train.shuffle_buffer_files": _int(1, 10_000),
    "train.deterministic": _bool(),
    "train.shuffle": _choice("reference", "window", "global"),
    "train.precision": _choice("fp32", "mixed_bfloat16", "mixed_float16"),
    "train.jit_compile": _choice("auto", True, False),
    "train.lr_scaling": _choice("none", "linear", "sqrt"),
    "train.early_stopping.enabled": _bool(),
    "train.early_stopping.patience": _int(0),
    "train.early_stopping.min_delta": _float(0.0),
    "train.early_stopping.restore_best_weights": _bool(),
    "train.target.metric": _choice("val_accuracy", "val_loss"),
    "train.target.value": Rule("number or null", lambda v: None if v is None else _float(0.0).check(v)),
    "infer.enabled": _bool(),
    "infer.threshold": _float(0.0, 1.0, open_lo=True, open_hi=True),
    "infer.images_per_call": _int(1, 1024),
    "infer.batch_size": _int(1, 65_536),
    "infer.save_masks": _bool(),
    "infer.save_probabilities": _bool(),
    "infer.max_files": _int(1, optional=True),
    "telemetry.interval_s": _float(0.001, 60.0),
    "telemetry.idle_seconds": _float(0.0, 3600.0),
    "telemetry.power_csv": _bool(),
    "distribute.strategy": _choice("auto", "none", "mirrored", "multi_worker"),
    "distribute.cpu_devices": _int(2, 256, optional=True),
    "distribute.per_replica_batch": _bool(),
    "distribute.port": _auto_or(_int(1024, 65000)),
    "distribute.timeout_s": _float(1.0, 86_400.0),
    "mlperf.benchmark": _choice("cloudmask"),
    "mlperf.org": _text(),
    "mlperf.division": _choice("auto", "closed", "open"),
    "mlperf.status": _choice("cloud", "onprem", "preview", "research"),
    "mlperf.platform": _text(),
    "mlperf.runs": _int(1, 1000),
    "output.root": _text(),
    "output.progress": _choice(*PROGRESS_MODES),
    "output.progress_interval_s": _float(1.0, 86_400.0),
    "bench.train_files": _int(2, 10_000),
    "bench.test_files": _int(1, 10_000),
    "bench.synth_seed": _int(0, 2**31 - 1),
    "bench.cache_dir": _text(optional=True),
}
