"""The reference's flat config files (S1 ``cloudMaskConfig.yaml``, S2 ``config.yaml``): which of their keys map
onto this schema (config.py), which are fixed by the benchmark, and which have no effect here (returned as
notes for the user)."""

from __future__ import annotations

from ..errors import ConfigError

_REFERENCE_MAP = {
    "organisation": "mlperf.org",
    "platform": "mlperf.platform",
    "train_dir": "data.train_dir",
    "inference_dir": "data.test_dir",
    "PATCH_SIZE": "image.patch_size",
    "IMAGE_H": "image.height",
    "IMAGE_W": "image.width",
    "CROP_SIZE": "image.overlap",
    "seed": "seed",
    "learning_rate": "train.learning_rate",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "train_split": "data.train_split",
}
_REFERENCE_UNUSED = {
    "benchmark": "the benchmark is always logged as 'cloudmask'",
    "accelerators_per_node": "measured from the visible devices, not configured",
    "nodes": "measured, not configured",
    "gpu": "measured from the visible devices, not configured",
    "model_file": "models are written inside the run directory",
    "output_dir": "masks are written inside the run directory",
    "log_file": "logs are written inside the run directory",
    "mlperf_logfile": "the MLPerf log is <run>/mlperf.log",
    "MIN_SST": "unused by the reference too",
    "clip_offset": "unused by the reference too",
    "no_cache": "decoded patches are cached on disk, never in RAM (data.cache; off: decode every epoch)",
    "experiment": "sweeps are described by `cloudmask grid` files",
    "system": "host facts are recorded in manifest.json",
}
_REFERENCE_FIXED = {"N_CHANNELS": 9, "training_loss": "binary_crossentropy", "training_metrics": "accuracy"}


def is_reference_format(raw: dict, schema_sections: set[str]) -> bool:
    """Whether a config file's top-level keys are the reference's (and not this schema's sections)."""
    return any(k not in schema_sections and (k in _REFERENCE_MAP or k in _REFERENCE_UNUSED or k in _REFERENCE_FIXED)
               for k in raw)


def from_reference(raw: dict, source: str) -> tuple[dict, list[str]]:
    """Map a reference flat config onto this schema; return ({dotted key: value}, notes for the user)."""
    mapped: dict = {}
    notes: list[str] = []
    for key, value in raw.items():
        if key in _REFERENCE_MAP:
            mapped[_REFERENCE_MAP[key]] = value
        elif key in ("division", "status"):
            allowed = ("closed", "open") if key == "division" else ("cloud", "onprem", "preview", "research")
            if value in allowed:
                mapped[f"mlperf.{key}"] = value
            else:
                notes.append(f"{key}: {value!r} is not an MLPerf {key} ({', '.join(allowed)}); using the default")
        elif key == "submission" and isinstance(value, dict):
            for sub, target in (("org", "mlperf.org"), ("platform", "mlperf.platform")):
                if value.get(sub):
                    mapped[target] = value[sub]
            notes.append("submission: org and platform mapped; the other fields are ignored")
        elif key in _REFERENCE_FIXED:
            if value != _REFERENCE_FIXED[key]:
                raise ConfigError(f"{source}: {key}={value!r} is not supported",
                                  f"this benchmark fixes {key}={_REFERENCE_FIXED[key]!r}")
        elif key in _REFERENCE_UNUSED:
            notes.append(f"{key}: ignored ({_REFERENCE_UNUSED[key]})")
        else:
            raise ConfigError(f"{source}: unknown key '{key}'",
                              "use this project's schema (`cloudmask config show`) or the reference's flat keys")
    return mapped, notes
