import argparse
from pathlib import Path

import pytest
from conftest import assert_clean_error, run_cli

from cloudmask import __version__, cli

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_the_VERSION_file():
    done = run_cli("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"cloudmask {(ROOT / 'VERSION').read_text().strip()}"
    assert __version__ == (ROOT / "VERSION").read_text().strip()


def _commands(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _commands(sub, (*prefix, name))


def test_help_everywhere():
    commands = list(_commands(cli.build_parser()))
    assert {("data", "synth"), ("data", "verify"), ("data", "download"), ("train",), ("infer",), ("bench",),
            ("check-log",), ("config", "show")} <= set(commands)
    for command in commands:
        with pytest.raises(SystemExit) as done:
            cli.main([*command, "--help"])
        assert done.value.code == 0, command


def test_no_command_is_a_usage_error():
    done = run_cli()
    assert done.returncode == 2 and "usage:" in done.stderr


def test_config_errors_are_one_line_without_traceback(tmp_path):
    assert_clean_error(run_cli("config", "show", "--set", "train.batch_size=-1"), "train.batch_size")
    bad = tmp_path / "c.yaml"
    bad.write_text("model: {filterz: 3}\n")
    assert_clean_error(run_cli("train", "--config", str(bad)), str(bad), "model.filterz")


def test_config_show_prints_a_loadable_resolved_config(tmp_path):
    done = run_cli("config", "show", "--set", "train.epochs=4")
    assert done.returncode == 0
    (tmp_path / "c.yaml").write_text(done.stdout)
    again = run_cli("config", "show", "--config", str(tmp_path / "c.yaml"))
    assert again.stdout == done.stdout and "epochs: 4" in done.stdout


def test_the_command_line_and_the_run_modes_start_without_the_framework():
    # report, doctor, data and --help must work fast and where TensorFlow is broken: the framework is
    # imported by session._framework() when a run starts, never at import time
    import subprocess
    import sys

    modules = ("cloudmask.cli, cloudmask.cli.commands, cloudmask.run.modes, cloudmask.run.session, "
               "cloudmask.campaign.report")
    code = (f"import sys, {modules}; cloudmask.cli.build_parser(); "
            "print(sorted(m for m in ('tensorflow', 'keras', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
