"""Every way a run can differ from the reference, in one place: mlcommons/science ``benchmarks/cloudmask`` at
a11f727 (slstr_cloud.py, data_loader.py, model.py, cloudMaskConfig.yaml — the v1.1 code), read line by line.

Each ``Difference`` says what the reference does, what this bundle does, why, and whether it changes the
result. Two kinds:

* ``deviation``: a choice a run makes (a config value other than the reference's, a patch store, the JAX
  backend). A run with one is in the ``open`` MLPerf division and lists it in results.json ``deviations`` and in
  the MLPerf log.
* ``difference``: how every run here differs, by design, whatever its settings (the sorted file list, the test
  metric, the mask files, the clock of the time per epoch, the MLPerf events). Documented, not a deviation.

Every config key is classified: a key with a reference value is a deviation when changed; the others are
``faithful`` (any value is comparable with the reference: the seed, the epochs, paths) or ``neutral`` (output,
telemetry and speed settings that do not change what is measured). docs/config.md's "Faithful versus
different" section is this module's ``markdown()`` (tests/test_ledger.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

NO_VALUE = object()


@dataclass(frozen=True)
class Difference:
    name: str  # the config key, or what differs
    reference: str  # what the reference does
    ours: str  # what this bundle does
    why: str
    changes_result: str  # "no", "rounding only", or how it changes what is measured
    kind: str = "deviation"  # deviation | difference
    reference_value: Any = NO_VALUE  # a key's reference value: another value is a deviation
    active: Callable[[Any, str | None], bool] | None = None  # (cfg, backend) -> deviation present?

    def applies(self, cfg, backend: str | None) -> bool:
        if self.kind != "deviation":
            return False
        if self.active is not None:
            return self.active(cfg, backend)
        return cfg[self.name] != self.reference_value


def _key(name, value, reference, ours, why, changes="yes") -> Difference:
    return Difference(name, reference, ours, why, changes, "deviation", value)


LEDGER: list[Difference] = [
    # -- settings with a reference value ----------------------------------------------------------------------
    _key("data.normalisation", "fixed", "`(bts − 270)/22`, `refs − 0.5` (data_loader.py `_load_data`)",
         "the same; `zscore` is v1.2's per-image z-score", "v1.2 (UVA) changed it; NYU's 0.896 used fixed"),
    _key("data.train_split", 0.8, "`train_test_split(train_size=0.8)`", "the same", "the reference's config"),
    _key("data.split_seed", 42, "`random_state=42`", "the same", "the reference's code"),
    _key("image.height", 1200, "IMAGE_H 1200", "the same", "the data"),
    _key("image.width", 1500, "IMAGE_W 1500", "the same", "the data"),
    _key("image.patch_size", 256, "PATCH_SIZE 256", "the same", "the model's input"),
    _key("image.overlap", 80, "CROP_SIZE 80: test patches every 176 pixels, edges cropped", "the same",
         "the reference's inference"),
    _key("model.filters", 32, "U-Net 32-64-128-256, 1,948,609 parameters (model.py)", "the same, layer by layer",
         "tests and presets shrink it"),
    _key("model.depth", 3, "three pooling levels", "the same", "tests shrink it"),
    _key("train.batch_size", 32, "`batch(32, drop_remainder=True)`", "the same global batch",
         "larger batches for larger machines"),
    _key("train.learning_rate", 0.001, "`Adam(0.001)`, other arguments default", "the same", "its config"),
    _key("train.shuffle", "reference",
         "files shuffled, patches file by file, `cache()` (every epoch replays epoch 1's file order), "
         "`shuffle(32)` redrawn every epoch, validation the same way (data_loader.py 139–156)",
         "`reference`: the same order, streamed without holding the dataset; `window`, `global`: other orders",
         "`window` reshuffles the files every epoch; `global` permutes all patches (store)",
         "yes: which patches meet in a batch"),
    _key("train.shuffle_buffer", 32, "`shuffle(self.batch_size)`: a 32-patch buffer", "the same buffer",
         "a larger buffer mixes more"),
    _key("train.precision", "fp32", "float32", "float32; mixed_bfloat16 / mixed_float16 on request",
         "speed on tensor cores"),
    _key("train.lr_scaling", "none", "the configured rate", "the same; linear / sqrt scaling with the batch",
         "larger batches"),
    _key("train.early_stopping.restore_best_weights", False,
         "no early stopping (v1.1); NYU's: `restore_best_weights=False`", "the same by default",
         "scoring the best epoch is better, and not what was published"),
    _key("infer.threshold", 0.5, "v1.2 / NYU accuracy: `p > 0.5`", "the same", "the metric's threshold"),
    _key("distribute.per_replica_batch", False, "global batch 32 over the MirroredStrategy's replicas",
         "the same; true multiplies the batch by the replicas", "weak scaling"),
    Difference("data.store", "float32 patches decoded from HDF5 every epoch (after the first, from its cache)",
               "a prepared patch store holds float16 inputs", "speed: read once, no decoding",
               "inputs rounded to float16 (differences < 1e-3 in loss)", "deviation",
               active=lambda cfg, backend: bool(cfg.data.store)),
    Difference("infer.max_files", "every test file", "the first N test files when set", "quick checks",
               "yes: the test accuracy of a subset", "deviation",
               active=lambda cfg, backend: cfg.infer.max_files is not None),
    Difference("backend", "TensorFlow: Keras computes binary cross-entropy from the sigmoid's logits",
               "KERAS_BACKEND=jax: Keras computes it from the probabilities clipped to [1e-7, 1 − 1e-7]",
               "the GPU measurements run on JAX", "the loss of saturated pixels; rounding elsewhere",
               "deviation", active=lambda cfg, backend: backend not in (None, "tensorflow")),
    # -- how every run differs, by design ---------------------------------------------------------------------
    Difference("file list", "`glob('**/S3A*.hdf')` in the file system's order, then the split",
               "sorted by relative path, then the same split", "the glob order differs between machines; "
               "sorted, every machine gets the same split", "which files validate (as between two machines)",
               "difference"),
    Difference("test metric", "v1.1 computes no test accuracy: it writes the masks",
               "v1.2's (UVA, Jan 2023) and NYU's: p > 0.5, pixel accuracy over all pixels of a file, mean over "
               "files", "the published 0.896 is this metric", "no (v1.1 has none)", "difference"),
    Difference("masks", "one (1, 1200, 1500, 1) float64 array per file: 14.4 MB (path `output_dir + name`, "
               "no separator)", "gzip'd uint8 masks, float16 probabilities on request (`infer.save_*`)",
               "disk (v1.2–NYU also wrote patches: 149 MB per file)", "no", "difference"),
    Difference("time per epoch", "wall time of all of `cloud_training` (data set-up, model build, fit with "
               "validation, model save) ÷ configured epochs (slstr_cloud.py 209–212)",
               "both: `timing.reference_time_per_epoch_s` (the reference's clock; the text log line) and "
               "`timing.time_per_epoch_s` (fit with validation ÷ epochs run)",
               "set-up and saving are not training", "no (both are reported)", "difference"),
    Difference("time per inference", "wall time of all of `cloud_inference` (model load, reading, predicting, "
               "writing masks) ÷ files", "reading, predicting, stitching, scoring and writing masks ÷ files; "
               "the model load is timed in `timers.csv`", "the model load is not inference",
               "no (a few seconds once)", "difference"),
    Difference("MLPerf events", "`run_start` first (logged with `end`), submission keys, `init_start`, "
               "`number_of_ranks`, `number_of_nodes`, `accelerators_per_node`, `init_stop`, one "
               "`eval_start`/`eval_stop` pair around training and one around inference, `run_stop`",
               "the same keys with the same meaning, in the HPC rules' order (docs/results.md maps them): "
               "init block, `run_start`, epochs with their evaluation, inference, `run_stop`",
               "the compliance checker's rules", "no", "difference"),
    Difference("seeds", "`tf.random.set_seed(seed)` only", "Python, NumPy and Keras seeded from `seed`",
               "repeatable runs on the CPU", "other random draws for the same seed number", "difference"),
    Difference("devices", "always inside a `MirroredStrategy` (optimizer made outside its scope)",
               "one device: the default strategy; several: mirrored", "the same arithmetic on one device",
               "no", "difference"),
    Difference("train.jit_compile", "Keras 2 `fit`: no XLA", "`auto`: Keras 3 decides (XLA on a GPU without "
               "tf.distribute, and on JAX); `true`/`false` force it", "speed", "rounding only", "difference"),
    Difference("train.micro_batch_size", "whole batches of 32", "whole batches by default; micro-batches with "
               "gradient accumulation on request (the `bench` preset: 4 × 8), recorded as "
               "`gradient_accumulation_steps`", "memory", "rounding only", "difference"),
    Difference("non-finite values", "none handled (the released files are believed finite)",
               "replaced per channel by the image's smallest finite value; files mostly non-finite are bad",
               "raw SLSTR has fill values", "no, on the released data", "difference"),
    Difference("inference batches", "`predict_on_batch` of one image's 63 patches", "`infer.images_per_call` "
               "images per predict call in batches of `infer.batch_size`", "speed", "rounding only",
               "difference"),
    Difference("model file", "`cloudModel.h5`", "`model.keras` (Keras 3) and per-epoch checkpoints",
               "Keras 3; resume", "no", "difference"),
]

# Keys without a reference value: any value is comparable with the reference (faithful), or the key does not
# change what is measured (neutral).
FAITHFUL = {
    "seed": "the reference's config has one (1234)",
    "data.root": "where the data is", "data.train_dir": "where the data is", "data.test_dir": "where the data is",
    "data.remote.anonymous": "how object storage is read", "data.remote.retries": "how object storage is read",
    "data.remote.endpoint_url": "how object storage is read",
    "train.epochs": "the reference's config has one (1; NYU: 200)",
    "train.early_stopping.enabled": "NYU's runs stop early (patience 25)",
    "train.early_stopping.patience": "NYU's value is 25", "train.early_stopping.min_delta": "Keras default 0",
    "train.target.metric": "an MLPerf-style stop at a quality target",
    "train.target.value": "an MLPerf-style stop at a quality target",
    "train.micro_batch_size": "the same update (see the ledger)", "train.jit_compile": "rounding only (ledger)",
    "train.deterministic": "the same operations, deterministic kernels",
    "distribute.strategy": "the global batch is kept", "distribute.cpu_devices": "the global batch is kept",
    "data.skip_bad": "only acts on a bad file, which a run then names",
    "data.min_finite_fraction": "only acts on a file that is mostly fill values",
}
NEUTRAL = {
    "data.read_threads": "speed", "data.cache": "speed, bit-identical", "data.resident": "speed (with a store)",
    "train.shuffle_buffer_files": "only for `train.shuffle=window`",
    "infer.enabled": "whether a test score is made", "infer.images_per_call": "speed",
    "infer.batch_size": "speed", "infer.save_masks": "output", "infer.save_probabilities": "output",
    "telemetry.interval_s": "telemetry", "telemetry.idle_seconds": "telemetry", "telemetry.power_csv": "telemetry",
    "distribute.port": "networking", "distribute.timeout_s": "networking",
    "mlperf.benchmark": "a label", "mlperf.org": "a label", "mlperf.division": "a label (auto from this ledger)",
    "mlperf.status": "a label", "mlperf.platform": "a label", "mlperf.runs": "packaging",
    "output.root": "output", "output.progress": "output", "output.progress_interval_s": "output",
    "bench.train_files": "the synthetic data of `bench`", "bench.test_files": "the synthetic data of `bench`",
    "bench.synth_seed": "the synthetic data of `bench`", "bench.cache_dir": "where it is kept",
}


def reference_values() -> dict[str, Any]:
    """The reference's value of every key that has one."""
    return {d.name: d.reference_value for d in LEDGER if d.reference_value is not NO_VALUE}


def deviations(cfg, backend: str | None = None) -> dict[str, dict]:
    """The deviations a run with ``cfg`` on ``backend`` has: {name: {"value", "reference", "changes"}}
    (``backend`` None: the backend is not judged)."""
    out = {}
    for d in LEDGER:
        if d.applies(cfg, backend):
            reference = d.reference_value if d.reference_value is not NO_VALUE else d.reference
            out[d.name] = {"value": backend if d.name == "backend" else cfg[d.name], "reference": reference,
                           "changes": d.changes_result}
    return out


def key_class(key: str) -> str:
    if key in reference_values() or any(d.name == key and d.kind == "deviation" for d in LEDGER):
        return "deviation when changed"
    return "faithful" if key in FAITHFUL else "neutral" if key in NEUTRAL else "unclassified"


def _cell(text) -> str:
    return str(text).replace("|", "\\|")


def _yaml(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def markdown() -> str:
    """docs/config.md's tables: the ledger, then the class of every key."""
    from .rules import RULES

    lines = ["| what | reference (a11f727) | here | why | changes the result | kind |",
             "|---|---|---|---|---|---|"]
    for d in LEDGER:
        name = f"`{d.name}`" if "." in d.name or d.name == "backend" else d.name
        if d.reference_value is not NO_VALUE:
            name += f" ≠ `{_yaml(d.reference_value)}`"
        lines.append("| " + " | ".join(_cell(x) for x in (name, d.reference, d.ours, d.why, d.changes_result,
                                                         d.kind)) + " |")
    lines += ["", "| key | class | why |", "|---|---|---|"]
    for key in RULES:
        cls = key_class(key)
        why = FAITHFUL.get(key) or NEUTRAL.get(key) or "the reference's value is in the table above"
        lines.append(f"| `{key}` | {cls} | {_cell(why)} |")
    return "\n".join(lines) + "\n"
