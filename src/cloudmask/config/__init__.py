"""The one configuration schema (schema.py), the rules of its keys (rules.py), every way a run can differ from
the reference (ledger.py), and the reference's own config files (reference.py). The rest of the package imports
from here."""

from .ledger import LEDGER, deviations, reference_values
from .rules import DATA_LOCATIONS, RULES, WORD_OFF, Rule
from .schema import Config, config_from_dict, flatten, load_config, parse_override, preset_names, read_preset, yaml_load

__all__ = ["Config", "DATA_LOCATIONS", "LEDGER", "RULES", "Rule", "WORD_OFF", "config_from_dict", "deviations",
           "flatten", "load_config", "parse_override", "preset_names", "read_preset", "reference_values",
           "yaml_load"]
