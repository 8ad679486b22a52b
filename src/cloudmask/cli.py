"""The ``cloudmask`` command: parses arguments and calls the package; no benchmark logic lives here."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import __version__
from .errors import CloudmaskError


def _progress(label: str):
    """A one-line counter on a terminal, a line every 10 % otherwise (SLURM logs stay short)."""
    tty = sys.stderr.isatty()
    start = time.perf_counter()

    def report(i: int, total: int, *_):
        if tty:
            end = "\n" if i == total else ""
            print(f"\r{label} {i}/{total} ({time.perf_counter() - start:.0f} s)", end=end, file=sys.stderr,
                  flush=True)
        elif i == total or i % max(1, total // 10) == 0:
            print(f"{label} {i}/{total} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    return report


# ------------------------------------------------------------------------------------------------ commands


def cmd_config_show(args) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.set)
    for note in cfg.notes:
        print(f"# note: {note}")
    print(cfg.to_yaml(), end="")
    return 0


def cmd_data_synth(args) -> int:
    from .synth import synthesize

    start = time.perf_counter()
    paths = synthesize(args.out, args.train, args.test, args.seed, progress=_progress("synthesized"))
    took = time.perf_counter() - start
    print(f"wrote {len(paths)} files ({args.train} training, {args.test} test) to {args.out} "
          f"in {took:.1f} s ({took / max(len(paths), 1):.2f} s/file)")
    return 0


def cmd_data_verify(args) -> int:
    from . import data
    from .config import load_config
    from .preprocess import Geometry
    from .tables import text_table

    cfg = load_config(args.config, args.set)
    root = Path(args.dir)
    if args.check_manifest:
        result = data.check_manifest(root, jobs=args.jobs or 4)
        for rel in result.missing:
            print(f"MISSING  {rel}")
        for rel in result.changed:
            print(f"CHANGED  {rel}")
        for rel in result.extra:
            print(f"EXTRA    {rel} (not in the manifest)")
        print(f"manifest: {result.checked} files checked, {len(result.changed)} changed, "
              f"{len(result.missing)} missing, {len(result.extra)} extra")
        if not result.ok:
            raise CloudmaskError(f"{root / data.MANIFEST_NAME}: {len(result.missing)} missing and "
                                 f"{len(result.changed)} changed files",
                                 "re-download them (`cloudmask data download` resumes)")
    report = data.verify(root, Geometry.from_config(cfg), cfg.data.min_finite_fraction, jobs=args.jobs,
                         progress=_progress("verified"))
    counts = report.counts()
    rows = []
    for split in ("train", "test"):
        n = [counts.get((split, dn), 0) for dn in ("day", "night", "other")]
        rows.append([split, *n, sum(n)])
    rows.append(["total", *(sum(r[i] for r in rows) for i in range(1, 5))])
    print(text_table(["split", "day", "night", "other", "files"], rows, title=f"dataset {root}"))
    nonfinite = [c for c in report.checks if not c.problem and c.finite_fraction is not None
                 and c.finite_fraction < 1]
    if nonfinite:
        print(f"{len(nonfinite)} file(s) contain non-finite values (filled when read; see docs/dataset.md)")
    for c in report.bad:
        print(f"BAD  {c.path}: {c.problem}")
    if report.bad:
        message = f"{len(report.bad)} of {len(report.checks)} files are bad (listed above)"
        if not args.skip_bad:
            raise CloudmaskError(message, "re-download them, remove them, or pass --skip-bad to carry on without")
        print(f"warning: {message}; continuing because of --skip-bad", file=sys.stderr)
    if args.write_manifest:
        path = data.write_manifest(root, jobs=args.jobs or 4)
        print(f"wrote {path}")
    print(f"ok: {len(report.checks) - len(report.bad)} good files")
    return 0


def cmd_data_prepare(args) -> int:
    from . import store
    from .config import load_config

    cfg = load_config(args.config, args.set)
    meta = store.prepare(args.raw, args.store, cfg, jobs=args.jobs, progress=_progress("converted"))
    counts = meta["counts"]
    print(f"store {args.store}: {counts['train_x']} training + {counts['val_x']} validation patches, "
          f"{counts['test_x']} test images, {meta['normalisation']} normalisation, float16, in {meta['prepare_s']:.1f} s")
    return 0


def cmd_data_download(args) -> int:
    from . import data

    splits = tuple(args.only) if args.only else ("train", "test")
    data.download(args.dir, naming=args.naming, endpoint=args.endpoint, prefix=args.prefix, splits=splits,
                  dry_run=args.dry_run)
    if not args.dry_run:
        print(f"done; check it with: cloudmask data verify {args.dir} --write-manifest")
    return 0


def _command_line_values(args) -> dict:
    values = {}
    if getattr(args, "data", None):
        values["data.root"] = args.data
    if getattr(args, "skip_bad", False):
        values["data.skip_bad"] = True
    if getattr(args, "store", None):
        values["data.store"] = args.store
    return values


def cmd_train(args) -> int:
    from . import benchmark
    from .config import load_config

    values = _command_line_values(args)
    if args.resume:
        benchmark.run(None, args.out, resume=True,
                      resume_changes={"config": args.config, "overrides": args.set, "values": values},
                      stage_to=args.stage_to)
    else:
        benchmark.run(load_config(args.config, args.set, values=values), args.out, stage_to=args.stage_to)
    return 0


def cmd_bench(args) -> int:
    from . import benchmark
    from .config import load_config, read_preset

    values = {"data.skip_bad": True} if args.skip_bad else {}
    if args.store:
        values["data.store"] = args.store
    cfg = load_config(args.config, args.set, base=read_preset("bench"), values=values)
    data_root = args.data
    if args.prefer_data and not data_root:
        data_root = benchmark.dataset_if_present(args.prefer_data)
    if args.mode == "throughput":
        benchmark.throughput(cfg, data_root, args.warmup, args.steps, args.json)
    else:
        benchmark.bench(cfg, data_root, args.out)
    return 0


def cmd_infer(args) -> int:
    from . import benchmark

    benchmark.infer_only(args.run, args.checkpoint, args.data, args.out, args.set)
    return 0


def cmd_check_log(args) -> int:
    from .mlperf import check_log

    ok, output = check_log(args.target)
    if args.verbose or not ok:
        print(output)
    print(f"{'PASS' if ok else 'FAIL'}: {args.target}")
    return 0 if ok else 1


# --------------------------------------------------------------------------------------- slurm and grids


def _submit_options(args):
    from .slurm import SubmitOptions

    return SubmitOptions(data=args.data, container=args.container, image=args.image, stage=args.stage,
                         extra_args=args.extra_args or "", sbatch_args=args.sbatch_arg, scripts=args.scripts,
                         dry_run=args.dry_run)


def cmd_submit(args) -> int:
    from . import slurm
    from .config import load_config
    from .experiments import plan_experiment

    opts = _submit_options(args)
    cfg = load_config(args.config, args.set)
    exp = plan_experiment(Path(args.results) / args.experiment, cfg, args.repeats, args.base_seed)
    for line in slurm.submit([exp], None, opts, exp.path):
        print(line)
    return 0


def cmd_grid_plan(args) -> int:
    from .experiments import plan_grid, read_grid
    from .tables import text_table

    grid = read_grid(args.grid)
    experiments = plan_grid(grid, args.results)
    print(text_table(["experiment", "repeats", "seeds", *grid.axes],
                     [[e.name, e.repeats, f"{e.seed(1)}-{e.seed(e.repeats)}", *e.values.values()] for e in experiments],
                     title=f"grid {grid.name}: {len(experiments)} experiments in {Path(args.results) / grid.name}"))
    return 0


def _grid_experiments(path):
    from .errors import RunDirError
    from .experiments import find_experiments

    experiments = find_experiments(path)
    if not experiments:
        raise RunDirError(f"{path}: no experiment directories (experiment.yaml) below it",
                          "plan them first with `cloudmask grid plan GRID.yaml`")
    return experiments


def cmd_grid_submit(args) -> int:
    from . import slurm

    for line in slurm.submit(_grid_experiments(args.dir), None, _submit_options(args), Path(args.dir)):
        print(line)
    return 0


def _grid_states(path):
    from .experiments import task_states
    from .slurm import queue_of

    experiments = _grid_experiments(path)
    queue = queue_of(experiments)
    return experiments, [st for e in experiments for st in task_states(e, queue)], queue is not None


def cmd_grid_status(args) -> int:
    from .tables import text_table

    experiments, states, asked = _grid_states(args.dir)
    print(text_table(["experiment", "task", "seed", "job", "state", "reason"],
                     [[s.experiment, s.task, s.seed, s.job, s.state, s.reason] for s in states]))
    counts = {k: sum(s.state == k for s in states) for k in ("done", "running", "pending", "interrupted", "failed",
                                                             "missing")}
    print(", ".join(f"{v} {k}" for k, v in counts.items() if v) + ("" if asked else
                                                                    "  (squeue unavailable: queue not consulted)"))
    return 0


def cmd_grid_resubmit(args) -> int:
    from . import slurm

    experiments, states, _ = _grid_states(args.dir)
    todo: dict[str, list[int]] = {}
    for s in states:
        if s.state in ("failed", "missing", "interrupted"):
            todo.setdefault(s.experiment, []).append(s.task)
    if not todo:
        print("nothing to resubmit: every task is done, running or pending")
        return 0
    for line in slurm.submit(experiments, todo, _submit_options(args), Path(args.dir)):
        print(line)
    return 0


def cmd_doctor(args) -> int:
    from . import doctor
    from .config import load_config

    results = args.results or load_config().output.root
    checks = doctor.run_checks(args.data, results, full=args.full)
    print(doctor.table(checks))
    failed = [c for c in checks if c.status == "fail"]
    if failed:
        print(f"{len(failed)} check(s) failed: {', '.join(c.name for c in failed)}", file=sys.stderr)
    return 1 if failed else 0


def cmd_report(args) -> int:
    from . import report

    rep = report.collect(args.dirs)
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "report"
    files = report.write(rep, out)
    if args.format == "md":
        print((out / "report.md").read_text(), end="")
    elif args.format == "csv":
        print(report.to_csv(rep.runs, report.RUN_COLUMNS), end="")
    else:
        print(report.as_json(rep), end="")
    print(f"report: {len(rep.runs)} runs ({len(rep.problems)} not successful) -> "
          f"{', '.join(str(f) for f in files)}", file=sys.stderr)
    return 0


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
    from . import data

    parser = argparse.ArgumentParser(
        prog="cloudmask",
        description="MLCommons Science CloudMask benchmark: SLSTR cloud segmentation with a U-Net.",
        epilog="Run `cloudmask COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"cloudmask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # data ---------------------------------------------------------------------------------------------
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
    p.set_defaults(func=cmd_data_synth)

    p = data_sub.add_parser("verify", help="check every file of a dataset",
                            description="Check keys, shapes, dtypes and finite fraction of every file; print a "
                                        "day/night x train/test summary; exit non-zero listing every bad file.")
    p.add_argument("dir", metavar="DIR", help="dataset root (training/+inference/ or one-day/+ssts/)")
    p.add_argument("--jobs", type=_positive_int, default=None, metavar="N", help="parallel workers")
    p.add_argument("--skip-bad", action="store_true", help="report bad files but exit 0")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--write-manifest", action="store_true",
                       help=f"write DIR/{data.MANIFEST_NAME} (sha256sum format) after a successful check")
    group.add_argument("--check-manifest", action="store_true",
                       help=f"compare every file with DIR/{data.MANIFEST_NAME}")
    _add_config_options(p)
    p.set_defaults(func=cmd_data_verify)

    p = data_sub.add_parser("prepare", help="convert the dataset once into a fast patch store",
                            description="Read RAW once and write STORE: normalised float16 training/validation "
                                        "patches (the reference's split), uint8 masks and the test images, as "
                                        "memory-mappable arrays. Train with `cloudmask train --store STORE`.")
    p.add_argument("raw", metavar="RAW", help="dataset root (training/+inference/ or one-day/+ssts/)")
    p.add_argument("store", metavar="STORE", help="new store directory")
    p.add_argument("--jobs", type=_positive_int, default=2, metavar="N", help="parallel converters (default 2)")
    _add_config_options(p)
    p.set_defaults(func=cmd_data_prepare)

    p = data_sub.add_parser("download", help="fetch the real ~180 GB dataset with aws s3 sync",
                            description="Fetch cloud_slstr_ds1 anonymously from the STFC object store with "
                                        "`aws s3 sync` (needs `pip install awscli`). Re-running resumes.")
    p.add_argument("dir", metavar="DIR", help="destination dataset root")
    p.add_argument("--naming", choices=["auto", *data.LAYOUTS], default="auto",
                   help="remote prefix naming: training/inference (current) or one-day/ssts (2022-2025); "
                        "auto lists the bucket first")
    p.add_argument("--only", choices=["train", "test"], action="append", help="fetch only one split")
    p.add_argument("--endpoint", default=data.ENDPOINT, help=f"S3 endpoint (default {data.ENDPOINT})")
    p.add_argument("--prefix", default=data.BUCKET_PREFIX, help=f"bucket prefix (default {data.BUCKET_PREFIX})")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    p.set_defaults(func=cmd_data_download)

    # train / bench / infer / check-log ----------------------------------------------------------------
    p = sub.add_parser("train", help="train and evaluate (one benchmark run)",
                       description="Train the U-Net on the training files, validate on the reference file split, "
                                   "score the test files, and write a run directory.")
    _add_run_options(p, data_help="dataset root (sets data.root)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--store", metavar="DIR", help="train and test from a patch store (sets data.store)")
    p.add_argument("--stage-to", metavar="DIR", help="copy the dataset to DIR (node-local disk) before training; "
                                                     "timed and logged as MLPerf staging")
    p.set_defaults(func=cmd_train)

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
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("infer", help="score a trained run's model on the test set",
                       description="Load the final, best or latest model of RUN and score the test files into a "
                                   "new run directory (RUN itself is never modified).")
    p.add_argument("run", metavar="RUN", help="a run directory written by `cloudmask train`")
    p.add_argument("--checkpoint", choices=["final", "best", "latest"], default="final")
    p.add_argument("--data", metavar="DIR", help="dataset root (default: the run's)")
    p.add_argument("--out", metavar="DIR", help="new directory (default RUN-infer-<checkpoint>-<timestamp>)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help="override infer.* keys")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("check-log", help="check an MLPerf log with the compliance checker",
                       description="Run mlperf_logging's compliance checker with the cloudmask ruleset shipped in "
                                   "this package. Exit 0 when the log passes.")
    p.add_argument("target", metavar="RUN_OR_LOG", help="a run directory or an mlperf.log file")
    p.add_argument("-v", "--verbose", action="store_true", help="print the checker's output on success too")
    p.set_defaults(func=cmd_check_log)

    # doctor -------------------------------------------------------------------------------------------
    p = sub.add_parser("doctor", help="check GPUs, drivers, /dev/shm, disk, dataset, container and SLURM context",
                       description="Print a table of readiness checks; exit 1 if any check fails.")
    p.add_argument("--data", metavar="DIR", help="dataset root to check")
    p.add_argument("--results", metavar="DIR", help="where results will go (default: output.root)")
    p.add_argument("--full", action="store_true", help="verify every dataset file (slow on the real 180 GB)")
    p.set_defaults(func=cmd_doctor)

    # report -------------------------------------------------------------------------------------------
    p = sub.add_parser("report", help="tables and statistics over run, experiment or results directories",
                       description="Collect every run below DIR..., list failed and missing ones, and write "
                                   "runs.csv, summary.csv, report.json and report.md into --out.")
    p.add_argument("dirs", nargs="+", metavar="DIR")
    p.add_argument("--out", metavar="DIR", help="output directory (default: first DIR/report)")
    p.add_argument("--format", choices=["md", "csv", "json"], default="md", help="what to print (default md)")
    p.set_defaults(func=cmd_report)

    # slurm --------------------------------------------------------------------------------------------
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
    p.set_defaults(func=cmd_submit)

    p_grid = sub.add_parser("grid", help="hyper-parameter grids: plan, submit, status, resubmit",
                            description="A grid YAML lists values per config key; every combination becomes an "
                                        "experiment directory with its own seeded repeats.")
    grid_sub = p_grid.add_subparsers(dest="grid_command", metavar="GRID_COMMAND", required=True)
    p = grid_sub.add_parser("plan", help="write one experiment directory per combination",
                            description="Validate every combination, then write RESULTS/<name>/<combination>/ "
                                        "with the resolved config and a version stamp. Re-planning is a no-op.")
    p.add_argument("grid", metavar="GRID.yaml")
    p.add_argument("--results", default="results", metavar="DIR", help="results directory (default: results)")
    p.set_defaults(func=cmd_grid_plan)
    p = grid_sub.add_parser("submit", help="one array per experiment plus one report job after all of them")
    p.add_argument("dir", metavar="GRID_DIR", help="the planned grid directory (RESULTS/<name>)")
    _add_submit_options(p)
    p.set_defaults(func=cmd_grid_submit)
    p = grid_sub.add_parser("status", help="done / running / pending / failed / missing per task")
    p.add_argument("dir", metavar="GRID_DIR")
    p.set_defaults(func=cmd_grid_status)
    p = grid_sub.add_parser("resubmit", help="submit again only the failed, interrupted or missing tasks")
    p.add_argument("dir", metavar="GRID_DIR")
    _add_submit_options(p)
    p.set_defaults(func=cmd_grid_resubmit)

    # config -------------------------------------------------------------------------------------------
    p_cfg = sub.add_parser("config", help="show the resolved configuration", description="Configuration.")
    cfg_sub = p_cfg.add_subparsers(dest="config_command", metavar="CONFIG_COMMAND", required=True)
    p = cfg_sub.add_parser("show", help="print the resolved config (defaults + file + overrides)",
                           description="Print the resolved configuration as YAML.")
    _add_config_options(p)
    p.set_defaults(func=cmd_config_show)

    return parser


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CloudmaskError as e:
        print(f"cloudmask: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("cloudmask: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
