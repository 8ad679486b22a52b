"""The ledger of differences from the reference (config/ledger.py): it classifies every config key, it decides
the deviations and the division, and docs/config.md is its own text."""

from __future__ import annotations

from pathlib import Path

from cloudmask.config import RULES, load_config, read_preset
from cloudmask.config.ledger import FAITHFUL, LEDGER, NEUTRAL, NO_VALUE, key_class, markdown
from cloudmask.run.mlperf import division

from conftest import run_cli

REPO = Path(__file__).resolve().parents[1]


def test_docs_config_md_is_the_ledger():
    text = (REPO / "docs" / "config.md").read_text()
    block = text.split("<!-- ledger:start -->\n", 1)[1].split("<!-- ledger:end -->", 1)[0]
    assert block == markdown(), "docs/config.md differs from the ledger: paste `cloudmask config ledger` there"


def test_every_key_has_exactly_one_class_and_every_named_key_exists():
    assert [k for k in RULES if key_class(k) == "unclassified"] == []
    deviation_keys = {d.name for d in LEDGER if d.kind == "deviation" and d.name != "backend"}
    assert deviation_keys <= set(RULES) and set(FAITHFUL) <= set(RULES) and set(NEUTRAL) <= set(RULES)
    assert not (deviation_keys & set(FAITHFUL)) and not (deviation_keys & set(NEUTRAL))
    assert not set(FAITHFUL) & set(NEUTRAL)
    defaults = load_config()
    for d in LEDGER:  # a key's reference value is its default: the defaults are the reference run
        if d.reference_value is not NO_VALUE:
            assert defaults[d.name] == d.reference_value, d.name


def test_the_issue_items_each_have_a_row():
    names = {d.name for d in LEDGER}
    assert {"train.shuffle", "time per epoch", "MLPerf events", "test metric", "backend", "file list",
            "masks"} <= names


def test_the_defaults_are_closed_and_every_deviation_opens_the_division():
    assert load_config().deviations() == {} and division(load_config(), "tensorflow") == "closed"
    window = load_config(overrides=["train.shuffle=window"])
    assert list(window.deviations()) == ["train.shuffle"] and division(window, "tensorflow") == "open"
    assert list(load_config().deviations("jax")) == ["backend"] and division(load_config(), "jax") == "open"
    subset = load_config(overrides=["infer.max_files=3"])
    assert list(subset.deviations()) == ["infer.max_files"]
    neutral = load_config(overrides=["output.progress=lines", "infer.batch_size=8", "train.micro_batch_size=8",
                                     "train.jit_compile=true", "data.cache=off", "telemetry.idle_seconds=0"])
    assert neutral.deviations() == {}


def test_the_bench_preset_is_closed():
    bench = load_config(base=read_preset("bench"))  # as `cloudmask bench` resolves it
    assert bench.train.micro_batch_size == 8  # its difference: gradient accumulation, rounding only
    assert bench.deviations() == {} and division(bench, "tensorflow") == "closed"


def test_config_ledger_prints_the_tables_and_a_configs_deviations():
    done = run_cli("config", "ledger", "--set", "train.shuffle=window", "--set", "model.filters=8")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(markdown())
    assert "this config: model.filters, train.shuffle" in done.stdout
