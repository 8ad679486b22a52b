"""What each ``cloudmask`` command does once its arguments are parsed (cli.py): it calls the package and
prints; the benchmark's logic lives in the modules it calls."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..dataset.object_storage import redact
from ..errors import CloudmaskError
from .tables import plural


def _progress(label: str, args):
    """A ``(i, total, ...)`` callback for the data commands: a live line on a terminal, a plain line every 30 s
    or tenth otherwise (progress.py); nothing with --quiet."""
    from . import console
    from .progress import Progress

    console.setup()
    bar: Progress | None = None
    started = time.perf_counter()

    def report(i: int, total: int, *_):
        nonlocal bar
        if bar is None:
            bar = Progress(label, total, "off" if args.quiet else "auto", unit="files", items_per_step=1,
                           started=started)
        bar.update(i)

    return report


# ------------------------------------------------------------------------------------------------ commands


def _config(args, base: dict | None = None, values: dict | None = None):
    """The resolved config of a command: defaults <- ``base`` <- --config <- --set <- ``values``."""
    from ..config import load_config

    return load_config(getattr(args, "config", None), getattr(args, "set", ()), base=base, values=values)


def config_show(args) -> int:
    cfg = _config(args)
    for note in cfg.notes:
        print(f"# note: {note}")
    print(cfg.to_yaml(), end="")
    return 0


def config_ledger(args) -> int:
    from ..config.ledger import markdown

    print(markdown(), end="")
    if args.config or args.set:
        deviations = _config(args).deviations()
        print(f"\nthis config: {', '.join(deviations) or 'no deviations'} (the backend is judged when a run "
              "starts: JAX is one)")
    return 0


def data_synth(args) -> int:
    from ..dataset.synth import synthesize

    start = time.perf_counter()
    paths = synthesize(args.out, args.train, args.test, args.seed, progress=_progress("synthesizing", args))
    took = time.perf_counter() - start
    print(f"wrote {len(paths)} files ({args.train} training, {args.test} test) to {args.out} "
          f"in {took:.1f} s ({took / max(len(paths), 1):.2f} s/file)")
    return 0


def data_verify(args) -> int:
    from ..dataset import checksums, object_storage
    from ..dataset.files import MANIFEST_NAME, verify
    from ..dataset.preprocess import Geometry
    from .tables import text_table

    cfg = _config(args)
    root = object_storage.location(args.dir)
    if args.check_manifest:
        result = checksums.check_checksums(root, jobs=args.jobs or 4)
        for rel in result.missing:
            print(f"MISSING  {rel}")
        for rel in result.changed:
            print(f"CHANGED  {rel}")
        for rel in result.extra:
            print(f"EXTRA    {rel} (not in the manifest)")
        print(f"manifest: {result.checked} files checked, {len(result.changed)} changed, "
              f"{len(result.missing)} missing, {len(result.extra)} extra")
        if not result.ok:
            raise CloudmaskError(f"{root / MANIFEST_NAME}: {len(result.missing)} missing and "
                                 f"{len(result.changed)} changed files",
                                 "re-download them (`cloudmask data download` resumes)")
    report = verify(root, Geometry.from_config(cfg), cfg.data.min_finite_fraction, jobs=args.jobs,
                         progress=_progress("verifying", args))
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
        path = checksums.write_checksums(root, jobs=args.jobs or 4)
        print(f"wrote {path}")
    print(f"ok: {len(report.checks) - len(report.bad)} good files")
    return 0


def data_prepare(args) -> int:
    from ..inputs import store

    cfg = _config(args)
    meta = store.prepare(args.raw, args.store, cfg, jobs=args.jobs, progress=_progress("converting", args),
                         array_format=args.array_format)
    counts = meta["counts"]
    print(f"store {redact(args.store)}: {counts['train_x']} training + {counts['val_x']} validation patches, "
          f"{counts['test_x']} test images, {meta['normalisation']} normalisation, float16 {meta['arrays']}, "
          f"in {meta['prepare_s']:.1f} s")
    return 0


def data_replicate(args) -> int:
    from ..inputs import store

    start = time.perf_counter()
    meta = store.replicate(args.source, args.store, {"train": args.train_files, "val": args.val_files,
                                                     "test": args.test_files}, progress=_progress("replicating", args))
    counts = meta["counts"]
    print(f"store {args.store}: {counts['train_x']} training + {counts['val_x']} validation patches, "
          f"{counts['test_x']} test images (copies of {args.source}) in {time.perf_counter() - start:.1f} s")
    return 0


def data_download(args) -> int:
    from ..dataset import download

    splits = tuple(args.only) if args.only else ("train", "test")
    download.download(args.dir, naming=args.naming, endpoint=args.endpoint, prefix=args.prefix, splits=splits,
                      dry_run=args.dry_run)
    if not args.dry_run:
        print(f"done; check it with: cloudmask data verify {args.dir} --write-manifest")
    return 0


def _command_line_values(args, data: bool = True) -> dict:
    """Config keys set by command-line options (validated together with --set)."""
    values = {}
    if data and getattr(args, "data", None):
        values["data.root"] = args.data
    if getattr(args, "skip_bad", False):
        values["data.skip_bad"] = True
    if getattr(args, "store", None):
        values["data.store"] = args.store
    if getattr(args, "quiet", False):
        values["output.progress"] = "off"
    return values


def train(args) -> int:
    from ..run import modes

    values = _command_line_values(args)
    if args.resume:
        modes.run(None, args.out, resume=True,
                      resume_changes={"config": args.config, "overrides": args.set, "values": values},
                      stage_to=args.stage_to)
    else:
        modes.run(_config(args, values=values), args.out, stage_to=args.stage_to)
    return 0


def bench(args) -> int:
    from ..config import read_preset
    from ..run import modes

    cfg = _config(args, base=read_preset("bench"), values=_command_line_values(args, data=False))
    data_root = args.data
    if args.prefer_data and not data_root:
        data_root = modes.dataset_if_present(args.prefer_data)
    if args.mode == "throughput":
        modes.throughput(cfg, data_root, args.warmup, args.steps, args.json)
    else:
        modes.bench(cfg, data_root, args.out)
    return 0


def infer(args) -> int:
    from ..run import modes

    overrides = [*args.set, *(["output.progress=off"] if args.quiet else [])]
    modes.infer_only(args.run, args.checkpoint, args.data, args.out, overrides)
    return 0


def check_log(args) -> int:
    from ..run.mlperf import check_log

    ok, output = check_log(args.target)
    if args.verbose or not ok:
        print(output)
    print(f"{'PASS' if ok else 'FAIL'}: {args.target}")
    return 0 if ok else 1


def package(args) -> int:
    from ..campaign.package import build

    summary = build(args.runs, args.org, args.system, args.out)
    score = summary["score"]
    print(f"package {args.out}: {summary['runs']} runs of {args.system} ({summary['division']} division); score "
          f"{summary['score_metric']} olympic mean {'-' if score is None else f'{score:.2f} s'}")
    return 0


# --------------------------------------------------------------------------------------- slurm and grids


def _submit_options(args):
    from ..campaign.slurm import SubmitOptions

    return SubmitOptions(data=args.data, container=args.container, image=args.image, stage=args.stage,
                         extra_args=args.extra_args or "", sbatch_args=args.sbatch_arg, scripts=args.scripts,
                         dry_run=args.dry_run)


def submit(args) -> int:
    from ..campaign import slurm
    from ..campaign.experiments import plan_experiment

    opts = _submit_options(args)
    cfg = _config(args)
    exp = plan_experiment(Path(args.results) / args.experiment, cfg, args.repeats, args.base_seed)
    for line in slurm.submit([exp], None, opts, exp.path):
        print(line)
    return 0


def grid_plan(args) -> int:
    from ..campaign.experiments import plan_grid, read_grid
    from .tables import text_table

    grid = read_grid(args.grid)
    experiments = plan_grid(grid, args.results)
    print(text_table(["experiment", "repeats", "seeds", *grid.axes],
                     [[e.name, e.repeats, f"{e.seed(1)}-{e.seed(e.repeats)}", *e.values.values()] for e in experiments],
                     title=f"grid {grid.name}: {len(experiments)} experiments in {Path(args.results) / grid.name}"))
    return 0


def _grid_experiments(path):
    from ..campaign.experiments import find_experiments
    from ..errors import RunDirError

    experiments = find_experiments(path)
    if not experiments:
        raise RunDirError(f"{path}: no experiment directories (experiment.yaml) below it",
                          "plan them first with `cloudmask grid plan GRID.yaml`")
    return experiments


def grid_submit(args) -> int:
    from ..campaign import slurm

    for line in slurm.submit(_grid_experiments(args.dir), None, _submit_options(args), Path(args.dir)):
        print(line)
    return 0


def _grid_states(path):
    from ..campaign.experiments import task_states
    from ..campaign.slurm import queue_of

    experiments = _grid_experiments(path)
    queue = queue_of(experiments)
    return experiments, [st for e in experiments for st in task_states(e, queue)], queue is not None


def grid_status(args) -> int:
    from .tables import text_table

    experiments, states, asked = _grid_states(args.dir)
    print(text_table(["experiment", "task", "seed", "job", "state", "reason"],
                     [[s.experiment, s.task, s.seed, s.job, s.state, s.reason] for s in states]))
    counts = {k: sum(s.state == k for s in states) for k in ("done", "running", "pending", "interrupted", "failed",
                                                             "unreadable", "missing")}
    print(", ".join(f"{v} {k}" for k, v in counts.items() if v) + ("" if asked else
                                                                    "  (squeue unavailable: queue not consulted)"))
    return 0


def grid_resubmit(args) -> int:
    from ..campaign import slurm

    experiments, states, _ = _grid_states(args.dir)
    todo: dict[str, list[int]] = {}
    for s in states:
        if s.state in ("failed", "unreadable", "missing", "interrupted"):
            todo.setdefault(s.experiment, []).append(s.task)
    if not todo:
        print("nothing to resubmit: every task is done, running or pending")
        return 0
    for line in slurm.submit(experiments, todo, _submit_options(args), Path(args.dir)):
        print(line)
    return 0


def doctor(args) -> int:
    from ..campaign import doctor

    results = args.results or _config(args).output.root
    checks = doctor.run_checks(args.data, results, full=args.full)
    print(doctor.table(checks))
    failed = [c for c in checks if c.status == "fail"]
    if failed:
        print(f"{plural(len(failed), 'check')} failed: {', '.join(c.name for c in failed)}", file=sys.stderr)
    return 1 if failed else 0


def report(args) -> int:
    from ..campaign import report

    rep = report.collect(args.dirs, args.name)
    out = Path(args.out) if args.out else report.default_out(Path(args.dirs[0]))
    files = report.write(rep, out)
    if args.format == "md":
        print((out / "report.md").read_text(), end="")
    elif args.format == "csv":
        print(report.to_csv(rep.runs, report.RUN_COLUMNS), end="")
    else:
        print(report.as_json(rep), end="")
    problems = f", {len(rep.problems)} not successful" if rep.problems else ""
    print(f"report of {plural(len(rep.runs), 'run')}{problems}: {out}/ ({', '.join(f.name for f in files)})",
          file=sys.stderr)
    return 0
