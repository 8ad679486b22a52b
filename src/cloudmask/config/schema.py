"""One configuration schema: packaged YAML defaults, a config file, dotted ``--set`` overrides, validated up front.

Defaults live in ``presets/default.yaml`` (the single place a default is written); the constraints on each key
live in ``RULES`` below. A config file may also be the reference's flat ``cloudMaskConfig.yaml``; its keys are
mapped onto this schema, and keys that have no effect here come back as notes for the user.
"""

from __future__ import annotations

import copy
import hashlib
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from ..dataset import object_storage
from ..errors import ConfigError
from ..training.distribution import DATA_PARALLEL, check_batch
from . import reference
from .rules import DATA_LOCATIONS, RULES, WORD_OFF

# --------------------------------------------------------------------------------------------------------------
# YAML: PyYAML follows YAML 1.1, where 1e-3 is a string; users write --set train.learning_rate=1e-3.


class _Loader(yaml.SafeLoader):
    pass


_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789"))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


# --------------------------------------------------------------------------------------------------------------
# Loading


def _defaults() -> dict:
    text = resources.files("cloudmask.config").joinpath("presets/default.yaml").read_text()
    return yaml_load(text)


def preset_names() -> list[str]:
    folder = resources.files("cloudmask.config").joinpath("presets")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml") and p.name != "default.yaml")


def read_preset(name: str) -> dict:
    """A packaged preset (presets/<name>.yaml) as a partial config tree."""
    text = resources.files("cloudmask.config").joinpath(f"presets/{name}.yaml").read_text()
    return _parse_mapping(text, f"preset '{name}'")


def _read_yaml(path: str) -> tuple[dict, str]:
    """Read a config file, or a packaged preset given by name (e.g. ``bench``)."""
    p = Path(path).expanduser()
    if not p.exists() and "/" not in path and not path.endswith((".yaml", ".yml")):
        if path in preset_names():
            return read_preset(path), f"preset '{path}'"
        raise ConfigError(f"config '{path}' is neither a file nor a preset",
                          f"presets: {', '.join(preset_names()) or 'none'}")
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}", "check the path") from None
    return _parse_mapping(text, str(p)), str(p)


def _parse_mapping(text: str, source: str) -> dict:
    try:
        data = yaml_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise ConfigError(f"{source}:{line} is not valid YAML", "fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config file must be a mapping of keys to values")
    return data


def _set_dotted(tree: dict, key: str, value) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _merge(base: dict, update: dict, source: str, prefix: str = "") -> None:
    for key, value in update.items():
        full = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"{source}: unknown key '{full}'", _suggest(full))
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{full}' is a section; give it sub-keys", _suggest(full + "."))
            _merge(base[key], value, source, full + ".")
        else:
            if isinstance(value, dict):
                raise ConfigError(f"{source}: '{full}' takes a value, not a section")
            if value is False and full in WORD_OFF:  # YAML 1.1 reads a bare off as false
                value = "off"
            base[key] = value


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of every leaf of a config tree."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _suggest(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key.rstrip("."), list(flatten(_defaults())), n=3, cutoff=0.5)
    return f"did you mean {' or '.join(close)}?" if close else "see `cloudmask config show` for every key"


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value parsed as YAML, so numbers, booleans and null have their types)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} is not key=value", "e.g. --set train.epochs=5")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(config_file: str | None = None, overrides: Iterable[str] = (),
                base: dict | None = None, values: dict | None = None) -> "Config":
    """Defaults <- ``base`` (e.g. a preset) <- config file <- ``--set`` overrides <- ``values`` (dotted keys set
    by command-line options such as --data); validated once, after everything is applied."""
    tree = copy.deepcopy(_defaults())
    notes: list[str] = []
    if base:
        _merge(tree, base, "built-in settings")
    if config_file:
        raw, source = _read_yaml(config_file)
        if reference.is_reference_format(raw, set(tree)):
            mapped, notes = reference.from_reference(raw, source)
            raw = {}
            for key, value in mapped.items():
                _set_dotted(raw, key, value)
            notes = [f"{source}: reference config mapped; {n}" for n in notes]
        _merge(tree, raw, source)
    cfg = Config(tree, notes).with_values({**dict(parse_override(item) for item in overrides), **(values or {})})
    object_storage.configure(cfg.data.remote)
    return cfg


def config_from_dict(tree: dict, source: str) -> "Config":
    """A resolved config read back from a run directory (every key present)."""
    full = copy.deepcopy(_defaults())
    _merge(full, tree, source)
    cfg = Config(full)
    cfg.validate(source)
    object_storage.configure(cfg.data.remote)
    return cfg


# --------------------------------------------------------------------------------------------------------------


class Config:
    """A validated, resolved configuration. ``cfg.train.batch_size`` or ``cfg["train.batch_size"]``."""

    def __init__(self, tree: dict, notes: list[str] | None = None):
        object.__setattr__(self, "_tree", tree)
        object.__setattr__(self, "notes", list(notes or []))

    def __getattr__(self, name):
        try:
            value = self._tree[name]
        except KeyError:
            raise AttributeError(name) from None
        return Config(value) if isinstance(value, dict) else value

    def __setattr__(self, name, value):
        raise AttributeError("Config is read-only; build a new one with load_config(..., overrides)")

    def __getitem__(self, dotted: str):
        node = self._tree
        for part in dotted.split("."):
            node = node[part]
        return node

    def to_dict(self) -> dict:
        return copy.deepcopy(self._tree)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self._tree, sort_keys=False, default_flow_style=False)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()

    def with_values(self, values: dict[str, Any], source: str = "--set") -> "Config":
        """A new validated config with dotted keys replaced, e.g. {"data.root": "/data"}."""
        tree = self.to_dict()
        for key, value in values.items():
            update: dict = {}
            _set_dotted(update, key, value)
            _merge(tree, update, source)
        for key in DATA_LOCATIONS:  # secrets in a URL stay in this process, never in a saved config
            tree["data"][key] = object_storage.take_credentials(tree["data"][key])
        cfg = Config(tree, self.notes)
        cfg.validate()
        return cfg

    def for_replicas(self, replicas: int) -> "Config":
        """With distribute.per_replica_batch, train.batch_size is per replica: the config with it made global."""
        if not self.distribute.per_replica_batch or replicas == 1:
            return self
        batch, micro = self.train.batch_size, self.train.micro_batch_size
        return self.with_values({"train.batch_size": batch * replicas,
                                 "train.micro_batch_size": None if micro == batch else micro},
                                "distribute.per_replica_batch")

    def with_overrides(self, overrides: Iterable[str]) -> "Config":
        return self.with_values(dict(parse_override(item) for item in overrides))

    def validate(self, source: str | None = None) -> None:
        for key, value in flatten(self._tree).items():
            rule = RULES.get(key)
            if rule is None:  # a key in default.yaml without a rule is a bug, not a user error
                raise RuntimeError(f"no validation rule for config key {key}")
            problem = rule.check(value)
            if problem:
                where = f"{source}: " if source else ""
                raise ConfigError(f"{where}{key}={value!r} {problem}", f"expected {rule.describe}")
        self._check_combinations(source)

    def _check_combinations(self, source: str | None) -> None:
        """Keys that are valid alone but not together."""
        img = self.image
        where = f"{source}: " if source else ""
        if img.overlap % 2:
            raise ConfigError(f"{where}image.overlap={img.overlap} must be even",
                              "half of it is trimmed from each side of a test patch")
        if img.overlap >= img.patch_size:
            raise ConfigError(f"{where}image.overlap={img.overlap} must be smaller than image.patch_size")
        if img.patch_size > min(img.height, img.width):
            raise ConfigError(f"{where}image.patch_size={img.patch_size} exceeds the image size")
        strategy = self.distribute.strategy
        check_batch(self.train.batch_size, self.train.micro_batch_size,
                    strategy if strategy in DATA_PARALLEL else None, where=where)
        if self.distribute.strategy == "multi_worker":
            if not self.data.store:
                raise ConfigError(f"{where}distribute.strategy=multi_worker needs a patch store (data.store): each "
                                  "worker reads only its rows of every batch from it",
                                  "prepare one with `cloudmask data prepare RAW STORE` and pass --store STORE")
            if self.data.resident != "none":
                raise ConfigError(f"{where}data.resident={self.data.resident} with distribute.strategy=multi_worker "
                                  "would load the whole split on every worker", "use data.resident=none: each "
                                  "worker reads only its rows of every batch")
            if self.train.jit_compile is True:
                raise ConfigError(f"{where}train.jit_compile=true does not work with distribute.strategy="
                                  "multi_worker (its training step is not XLA-compiled)", "use train.jit_compile=auto")
        target = self.train.target
        if target.metric == "val_accuracy" and target.value is not None and not 0 < target.value <= 1:
            raise ConfigError(f"{where}train.target.value={target.value} is not an accuracy",
                              "an accuracy target lies in (0, 1], e.g. 0.88")
        if self.train.shuffle == "global" and not self.data.store:
            raise ConfigError(f"{where}train.shuffle=global needs a patch store (data.store)",
                              "prepare one with `cloudmask data prepare RAW STORE`, or use train.shuffle=window")
        if self.data.resident != "none" and not self.data.store:
            raise ConfigError(f"{where}data.resident={self.data.resident} needs a patch store (data.store)")
        if img.patch_size % (2 ** self.model.depth):
            raise ConfigError(f"{where}image.patch_size={img.patch_size} must be divisible by 2**model.depth "
                              f"= {2 ** self.model.depth}")

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per global batch (1 = no gradient accumulation)."""
        micro = self.train.micro_batch_size
        return self.train.batch_size // micro if micro else 1

    @property
    def effective_learning_rate(self) -> float:
        """``train.learning_rate`` scaled for the batch size (lr_scaling), relative to the reference batch 32."""
        ratio = self.train.batch_size / 32
        factor = {"none": 1.0, "linear": ratio, "sqrt": ratio ** 0.5}[self.train.lr_scaling]
        return self.train.learning_rate * factor

    def deviations(self, backend: str | None = None) -> dict[str, dict]:
        """What makes a run with this config (on ``backend``) differ from the reference: ledger.py."""
        from .ledger import deviations

        return deviations(self, backend)
