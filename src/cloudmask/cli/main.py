"""The ``cloudmask`` command line: the argument parser and ``main``; each command is a function of commands.py."""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import threading

from .. import __version__
from ..dataset.object_storage import redact
from ..errors import CloudmaskError, describe_os_error
from . import commands


class CloudmaskParser(argparse.ArgumentParser):
    """argparse with hints: every command (a parser given a ``func``) also takes --quiet and --verbose, and
    knows itself so that an unknown option is reported with its own usage; a misspelt choice gets a
    did-you-mean."""

    def set_defaults(self, **kwargs):
        if "func" in kwargs:
            kwargs["parser"] = self
            self.add_argument("-q", "--quiet", action="store_true", help="no progress output (output.progress=off)")
            self.add_argument("-v", "--verbose", action="store_true",
                              help="also show the frameworks' start-up messages (TensorFlow, XLA, absl) on stderr")
        super().set_defaults(**kwargs)

    def error(self, message):
        wrong = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if wrong:
            close = difflib.get_close_matches(wrong.group(1), re.findall(r"'([^']*)'", wrong.group(2)), n=1)
            if close:
                message += f"; did you mean '{close[0]}'?"
        super().error(message)


# ------------------------------------------------------------------------------------------------- parser


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (this schema or the reference's flat "
                                                    "cloudMaskConfig.yaml), or a preset name")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override one key, e.g. --set train.epochs=5 (repeatable)")


def _add_run_options(p: argparse.ArgumentParser, data_help: str) -> None:
    _add_config_options(p)
    p.add_argument("--data", metavar="DIR", help=data_help)
    p.add_argument("--out", metavar="DIR", help="new run directory (default results/<timestamp>-seed<seed>)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable or malformed files with a warning")


def build_parser() -> argparse.ArgumentParser:
    parser = CloudmaskParser(
        prog="cloudmask",
        description="MLCommons Science CloudMask benchmark: SLSTR cloud segmentation with a U-Net.",
        epilog="Run `cloudmask COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"cloudmask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_data_commands(sub)
    _add_run_commands(sub)
    _add_tool_commands(sub)
    _add_slurm_commands(sub)
    _add_config_command(sub)
    return parser


def _add_data_commands(sub) -> None:
    from ..dataset import download
    from ..dataset.files import LAYOUTS, MANIFEST_NAME

    p_data = sub.add_parser("data", help="synthesize, verify, download or prepare (patch store) the dataset",
                            description="Dataset commands.")
    data_sub = p_data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    p = data_sub.add_parser("synth", help="write a synthetic SLSTR-like dataset",
                            description="Write synthetic files with the real structure: DIR/training/{day,night}/ "
                                        "and DIR/inference/{day,night}/ S3A_*.hdf with refs, bts and bayes.")
    p.add_argument("--out", required=True, metavar="DIR", help="new directory to write")
    p.add_argument("--train", type=_positive_int, default=8, metavar="N", help="training files (default 8)")
    p.add_argument("--test", type=_positive_int, default=2, metavar="M", help="test files (default 2)")
    p.add_argument("--seed", type=int, default=1, metavar="S", help="generator seed (default 1)")
    p.set_defaults(func=commands.data_synth)

    p = data_sub.add_parser("verify", help="check every file of a dataset",
                            description="Check keys, shapes, dtypes and finite fraction of every file; print a "
                                        "day/night x train/test summary; exit non-zero listing every bad file.")
    p.add_argument("dir", metavar="DIR", help="dataset root (training/+inference/ or one-day/+ssts/)")
    p.add_argument("--jobs", type=_positive_int, default=None, metavar="N", help="parallel workers")
    p.add_argument("--skip-bad", action="store_true", help="report bad files but exit 0")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--write-manifest", action="store_true",
                       help=f"write DIR/{MANIFEST_NAME} (sha256sum format) after a successful check")
    group.add_argument("--check-manifest", action="store_true",
                       help=f"compare every file with DIR/{MANIFEST_NAME}")
    _add_config_options(p)
    p.set_defaults(func=commands.data_verify)

    p = data_sub.add_parser("prepare", help="convert the dataset once into a fast patch store",
                            description="Read RAW once and write STORE: normalised float16 training/validation "
                                        "patches (the reference's split), uint8 masks and the test images, as "
                                        "memory-mappable arrays. Train with `cloudmask train --store STORE`. "
                                        "Either may be an s3://bucket/prefix URL.")
    p.add_argument("raw", metavar="RAW", help="dataset root (training/+inference/ or one-day/+ssts/), or a URL")
    p.add_argument("store", metavar="STORE", help="new store directory, or a URL (Zarr)")
    p.add_argument("--format", dest="array_format", choices=("auto", "npy", "zarr"), default="auto",
                   help="array format: npy (the fastest on a file system) | zarr (object storage, shared by the "
                        "workers of a job) | auto: zarr for a URL, else npy")
    p.add_argument("--jobs", type=_positive_int, default=2, metavar="N", help="parallel converters (default 2)")
    _add_config_options(p)
    p.set_defaults(func=commands.data_prepare)

    p = data_sub.add_parser("replicate", help="a full-size store made of copies of a small one",
                            description="Write STORE from repeated copies of SOURCE's files (a store from `data "
                                        "prepare`): the real dataset's size, 776 training, 194 validation and 100 "
                                        "test files by default, for full-size speed, memory and energy figures "
                                        "without the 180 GB download. Its accuracies mean little.")
    p.add_argument("source", metavar="SOURCE", help="a patch store")
    p.add_argument("store", metavar="STORE", help="new store directory")
    p.add_argument("--train-files", type=_positive_int, default=776, metavar="N", help="training files (776)")
    p.add_argument("--val-files", type=_positive_int, default=194, metavar="N", help="validation files (194)")
    p.add_argument("--test-files", type=_positive_int, default=100, metavar="N", help="test files (100)")
    p.set_defaults(func=commands.data_replicate)

    p = data_sub.add_parser("download", help="fetch the real ~180 GB dataset with aws s3 sync",
                            description="Fetch cloud_slstr_ds1 anonymously from the STFC object store with "
                                        "`aws s3 sync` (needs `pip install awscli`). Re-running resumes.")
    p.add_argument("dir", metavar="DIR", help="destination dataset root")
    p.add_argument("--naming", choices=["auto", *LAYOUTS], default="auto",
                   help="remote prefix naming: training/inference (current) or one-day/ssts (2022-2025); "
                        "auto lists the bucket first")
    p.add_argument("--only", choices=["train", "test"], action="append", help="fetch only one split")
    p.add_argument("--endpoint", default=download.ENDPOINT, help=f"S3 endpoint (default {download.ENDPOINT})")
    p.add_argument("--prefix", default=download.BUCKET_PREFIX, help=f"bucket prefix (default {download.BUCKET_PREFIX})")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    p.set_defaults(func=commands.data_download)


def _add_run_commands(sub) -> None:
    """train, bench, infer, check-log."""
    p = sub.add_parser("train", help="train and evaluate (one benchmark run)",
                       description="Train the U-Net on the training files, validate on the reference file split, "
                                   "score the test files, and write a run directory.")
    _add_run_options(p, data_help="dataset root (sets data.root)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--store", metavar="DIR", help="train and test from a patch store (sets data.store)")
    p.add_argument("--stage-to", metavar="DIR", help="copy the dataset to DIR (node-local disk) before training; "
                                                     "timed and logged as MLPerf staging")
    p.set_defaults(func=commands.train)

    p = sub.add_parser("bench", help="end-to-end benchmark, on synthetic data unless --data is given",
                       description="Train + infer with the 'bench' preset (a short run) and print a summary. "
                                   "Without --data a small synthetic dataset is made once and cached.")
    _add_run_options(p, data_help="dataset root (default: cached synthetic data)")
    p.add_argument("--prefer-data", metavar="DIR", help="use the dataset in DIR if it holds one, else synthetic data "
                                                        "with a notice (containers: /data)")
    p.add_argument("--store", metavar="DIR", help="read a patch store (sets data.store)")
    p.add_argument("--mode", choices=["run", "throughput"], default="run",
                   help="run: a short benchmark run (default); throughput: steady-state patches/s, no run directory")
    p.add_argument("--warmup", type=_positive_int, default=3, metavar="N", help="throughput: warm-up steps (3)")
    p.add_argument("--steps", type=_positive_int, default=20, metavar="N", help="throughput: timed steps (20)")
    p.add_argument("--json", action="store_true", help="throughput: print JSON instead of a table")
    p.set_defaults(func=commands.bench)

    p = sub.add_parser("infer", help="score a trained run's model on the test set",
                       description="Load the final, best or latest model of RUN and score the test files into a "
                                   "new run directory (RUN itself is never modified).")
    p.add_argument("run", metavar="RUN", help="a run directory written by `cloudmask train`")
    p.add_argument("--checkpoint", choices=["final", "best", "latest"], default="final")
    p.add_argument("--data", metavar="DIR", help="dataset root (default: the run's)")
    p.add_argument("--out", metavar="DIR", help="new directory (default RUN-infer-<checkpoint>-<timestamp>)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help="override infer.* keys")
    p.set_defaults(func=commands.infer)

    p = sub.add_parser("check-log", help="check an MLPerf log with the compliance checker",
                       description="Run mlperf_logging's compliance checker with the cloudmask ruleset shipped in "
                                   "this package. Exit 0 when the log passes.")
    p.add_argument("target", metavar="RUN_OR_LOG", help="a run directory or an mlperf.log file")
    p.set_defaults(func=commands.check_log)


def _add_tool_commands(sub) -> None:
    """doctor and report."""
    p = sub.add_parser("doctor", help="check GPUs, drivers, /dev/shm, disk, dataset, container and SLURM context",
                       description="Print a table of readiness checks; exit 1 if any check fails.")
    p.add_argument("--data", metavar="DIR", help="dataset root to check")
    p.add_argument("--results", metavar="DIR", help="where results will go (default: output.root)")
    p.add_argument("--full", action="store_true", help="verify every dataset file (slow on the real 180 GB)")
    p.set_defaults(func=commands.doctor)

    p = sub.add_parser("package", help="seeded repeats as one checked MLPerf-HPC-style results package",
                       description="Check the runs (each successful and at its quality target, its MLPerf log "
                                   "passing the ruleset, distinct seeds, one config, one system, at least "
                                   "mlperf.runs of them) and write OUT/systems/<system>.json and "
                                   "OUT/results/<system>/cloudmask/ (result_<i>.txt, config.yaml, summary.json "
                                   "with the olympic-mean score). Nothing is written when a check fails.")
    p.add_argument("runs", nargs="+", metavar="RUN_OR_EXPERIMENT")
    p.add_argument("--org", required=True, help="submitting organisation")
    p.add_argument("--system", required=True, help="system name (the systems/<name>.json file)")
    p.add_argument("--out", required=True, metavar="DIR", help="new package directory")
    p.set_defaults(func=commands.package)

    p = sub.add_parser("report", help="tables and statistics over run, experiment or results directories",
                       description="Collect every run below DIR..., list failed and missing ones, and write "
                                   "runs.csv, summary.csv, report.json and report.md into --out.")
    p.add_argument("dirs", nargs="+", metavar="DIR")
    p.add_argument("--out", metavar="DIR", help="output directory (default: DIR/report for a folder of runs, "
                                                "report-RUN beside a single run directory)")
    p.add_argument("--name", help="experiment name of runs outside experiment directories (default: their "
                                  "folder's name, or bench/train runs when that folder is `results`)")
    p.add_argument("--format", choices=["md", "csv", "json"], default="md", help="what to print (default md)")
    p.set_defaults(func=commands.report)


def _add_slurm_commands(sub) -> None:
    """submit and grid."""
    p = sub.add_parser("submit", help="submit seeded repeats as a SLURM array plus the report job",
                       description="Write RESULTS/EXPERIMENT (resolved config, experiment.yaml), submit "
                                   "slurm/train.sh as an array (seed = base seed + task id) and slurm/aggregate.sh "
                                   "after it (afterany), and print both job ids.")
    _add_config_options(p)
    p.add_argument("--experiment", default="default", help="experiment name (default: default)")
    p.add_argument("--results", default="results", metavar="DIR", help="results directory (default: results)")
    p.add_argument("--repeats", type=_positive_int, default=5, metavar="N", help="array tasks 1..N (default 5)")
    p.add_argument("--base-seed", type=_non_negative_int, default=0, metavar="S", help="seed of task 0 (default 0)")
    _add_submit_options(p)
    p.set_defaults(func=commands.submit)

    p_grid = sub.add_parser("grid", help="hyper-parameter grids: plan, submit, status, resubmit",
                            description="A grid YAML lists values per config key; every combination becomes an "
                                        "experiment directory with its own seeded repeats.")
    grid_sub = p_grid.add_subparsers(dest="grid_command", metavar="GRID_COMMAND", required=True)
    p = grid_sub.add_parser("plan", help="write one experiment directory per combination",
                            description="Validate every combination, then write RESULTS/<name>/<combination>/ "
                                        "with the resolved config and a version stamp. Re-planning is a no-op.")
    p.add_argument("grid", metavar="GRID.yaml")
    p.add_argument("--results", default="results", metavar="DIR", help="results directory (default: results)")
    p.set_defaults(func=commands.grid_plan)
    p = grid_sub.add_parser("submit", help="one array per experiment plus one report job after all of them")
    p.add_argument("dir", metavar="GRID_DIR", help="the planned grid directory (RESULTS/<name>)")
    _add_submit_options(p)
    p.set_defaults(func=commands.grid_submit)
    p = grid_sub.add_parser("status", help="done / running / pending / failed / missing per task")
    p.add_argument("dir", metavar="GRID_DIR")
    p.set_defaults(func=commands.grid_status)
    p = grid_sub.add_parser("resubmit", help="submit again only the failed, interrupted or missing tasks")
    p.add_argument("dir", metavar="GRID_DIR")
    _add_submit_options(p)
    p.set_defaults(func=commands.grid_resubmit)


def _add_config_command(sub) -> None:
    p_cfg = sub.add_parser("config", help="show the resolved configuration", description="Configuration.")
    cfg_sub = p_cfg.add_subparsers(dest="config_command", metavar="CONFIG_COMMAND", required=True)
    p = cfg_sub.add_parser("show", help="print the resolved config (defaults + file + overrides)",
                           description="Print the resolved configuration as YAML.")
    _add_config_options(p)
    p.set_defaults(func=commands.config_show)
    p = cfg_sub.add_parser("ledger", help="every way a run can differ from the reference, and every key's class",
                           description="Print the ledger of differences from the reference (config/ledger.py) "
                                       "as the Markdown tables of docs/config.md; with --config/--set, also the "
                                       "deviations of that config.")
    _add_config_options(p)
    p.set_defaults(func=commands.config_ledger)


def _add_submit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="DIR", help="dataset root for the tasks (DATA_DIR)")
    p.add_argument("--container", choices=["apptainer", "singularity", "none"], default="apptainer",
                   help="how the tasks run cloudmask (default apptainer; none: from PATH)")
    p.add_argument("--image", metavar="SIF", help="the container image (default ./cloudmask.sif)")
    p.add_argument("--stage", action="store_true", help="copy the dataset to node-local disk first")
    p.add_argument("--extra-args", metavar="ARGS", help="more `cloudmask train` arguments for every task")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="OPT",
                   help="an sbatch option, e.g. --sbatch-arg=--partition=gpu (repeatable)")
    p.add_argument("--scripts", metavar="DIR", help="where train.sh and aggregate.sh are (default: slurm/)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch commands, submit nothing")


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _unknown_options(args, extra: list[str]) -> None:
    """Report options the command does not have with its own usage, and the ``--set`` form where a config key
    has the option's name (``--epochs 3``: ``--set train.epochs=3``)."""
    from ..config import RULES

    leaf = args.parser
    hints = []
    for i, token in enumerate(extra):
        if not token.startswith("--"):
            continue
        name, _, value = token[2:].partition("=")
        if not value:
            value = extra[i + 1] if i + 1 < len(extra) and not extra[i + 1].startswith("-") else "VALUE"
        keys = [k for k in RULES if k.rsplit(".", 1)[-1] == name.replace("-", "_") or k == name]
        hints += [f"--set {k}={value}" for k in keys]
        if not keys:
            options = [o for a in leaf._actions for o in a.option_strings if o.startswith("--")]
            hints += difflib.get_close_matches(f"--{name}", options, n=1)
    hint = f"; did you mean {' or '.join(hints)}?" if hints else ""
    leaf.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def entry() -> None:
    """The ``cloudmask`` executable: stderr without the frameworks' start-up messages unless --verbose (set up
    before anything imports TensorFlow), then ``main``."""
    argv = sys.argv[1:]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's C++ info lines: not a Python setting
    if not {"-v", "--verbose"} & set(argv) and not os.environ.get("CLOUDMASK_VERBOSE"):
        from .console import filter_framework_noise

        filter_framework_noise()
    leave(main(argv))


def leave(code: int) -> None:
    """Exit with ``code``. A thread still blocked in a read that never returns (a stopped object-storage server)
    must not hold the process: Python would wait for it at exit, for ever. So where threads remain, the exit
    handlers run and the process ends without waiting for them."""
    stuck = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if not stuck:
        sys.exit(code)
    import atexit
    import logging

    try:
        atexit._run_exitfuncs()  # the patch cache removes an entry it was building
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - exiting whatever happens
        pass
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _unknown_options(args, extra)
    try:
        return args.func(args)
    except CloudmaskError as e:
        print(f"cloudmask: error: {redact(str(e))}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # stdout's reader left (`cloudmask ... | head`): the output ends there, quietly
        from .console import stdout_gone

        stdout_gone()
        return 0
    except OSError as e:  # a library's own write (not through fileio) failing on a full or read-only disk
        if os.environ.get("CLOUDMASK_DEBUG"):
            raise
        print(f"cloudmask: error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cloudmask: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    entry()
