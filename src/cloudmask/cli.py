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
    return values


def cmd_train(args) -> int:
    from . import benchmark
    from .config import load_config

    values = _command_line_values(args)
    if args.resume:
        benchmark.run(None, args.out, resume=True,
                      resume_changes={"config": args.config, "overrides": args.set, "values": values})
    else:
        benchmark.run(load_config(args.config, args.set).with_values(values, "command line"), args.out)
    return 0


def cmd_bench(args) -> int:
    from . import benchmark
    from .config import load_config, read_preset

    cfg = load_config(args.config, args.set, base=read_preset("bench"))
    if args.skip_bad:
        cfg = cfg.with_values({"data.skip_bad": True}, "command line")
    benchmark.bench(cfg, args.data, args.out)
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
    p_data = sub.add_parser("data", help="synthesize, verify or download the dataset",
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
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="end-to-end benchmark, on synthetic data unless --data is given",
                       description="Train + infer with the 'bench' preset (a short run) and print a summary. "
                                   "Without --data a small synthetic dataset is made once and cached.")
    _add_run_options(p, data_help="dataset root (default: cached synthetic data)")
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

    # config -------------------------------------------------------------------------------------------
    p_cfg = sub.add_parser("config", help="show the resolved configuration", description="Configuration.")
    cfg_sub = p_cfg.add_subparsers(dest="config_command", metavar="CONFIG_COMMAND", required=True)
    p = cfg_sub.add_parser("show", help="print the resolved config (defaults + file + overrides)",
                           description="Print the resolved configuration as YAML.")
    _add_config_options(p)
    p.set_defaults(func=cmd_config_show)

    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


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
