"""The one configuration schema (schema.py), the rules of its keys (rules.py) and the reference's own config
files (reference.py). The rest of the package imports from here."""

from .rules import DATA_LOCATIONS, REFERENCE_VALUES, RULES, WORD_OFF, Rule
from .schema import Config, config_from_dict, flatten, load_config, parse_override, preset_names, read_preset, yaml_load

__all__ = ["Config", "DATA_LOCATIONS", "REFERENCE_VALUES", "RULES", "Rule", "WORD_OFF", "config_from_dict", "flatten",
           "load_config", "parse_override", "preset_names", "read_preset", "yaml_load"]
