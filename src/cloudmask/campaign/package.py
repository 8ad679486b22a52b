"""``cloudmask package``: seeded repeats as one MLPerf-HPC-style results package, checked before it is written.

    OUT/systems/<system>.json                        the hardware and software, from the runs' manifests
    OUT/results/<system>/cloudmask/result_<i>.txt    each run's MLPerf log (i from 0, in seed order)
    OUT/results/<system>/cloudmask/config.yaml       the resolved config the runs share (the seed aside)
    OUT/results/<system>/cloudmask/summary.json      per-run figures and the score

Every check runs before anything is written, and OUT is built under a temporary name: a package that fails
leaves nothing but its error. The score is MLPerf HPC's: the olympic mean (best and worst run dropped) of the
runs' time to train, run_start to run_stop of their MLPerf logs, or with a quality target (train.target) the
time to the target.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import fileio
from ..config import flatten
from ..errors import CloudmaskError
from ..run.mlperf import check_log
from ..run.run_dir import CONFIG, MLPERF_LOG, RESULTS, RunDir
from .experiments import run_state
from .report import describe, run_dirs

# config keys that may differ between the repeats of one result
PER_RUN_KEYS = {"seed", "output.root"}


class PackageError(CloudmaskError):
    pass


def find_runs(paths: list[str | Path]) -> list[Path]:
    """The run directories given or below them, found as `cloudmask report` finds them (a run that crashed before
    its results.json is found too, and refused by the checks)."""
    runs: set[Path] = set()
    for p in map(Path, paths):
        if not p.is_dir():
            raise PackageError(f"{p}: no such directory", "pass run or experiment directories")
        runs.update(run_dirs(p))
    if not runs:
        raise PackageError(f"{', '.join(map(str, paths))}: no runs found", "pass run or experiment directories")
    return sorted(runs)


def _check_run(run: Path) -> tuple[dict, dict, dict]:
    """(results, manifest, flat config) of a run that can go into a package, else the reason it cannot."""
    state, reason = run_state(run)
    if state != "done":
        raise PackageError(f"{run}: the run is {state} ({reason})", "package only finished runs; run it again")
    results = json.loads((run / RESULTS).read_text())
    if results.get("status") != "success":
        raise PackageError(f"{run}: status {results.get('status')} ({results.get('error')})",
                           "package only successful runs")
    target = results.get("target")
    if target and not target.get("reached"):
        raise PackageError(f"{run}: did not reach its quality target {target['metric']} {target['value']} "
                           "(MLPerf status aborted)", "package only runs that reached the target")
    ok, output = check_log(run / MLPERF_LOG)
    if not ok:
        first = next((line for line in output.splitlines() if "ERROR" in line or "Failed" in line), output[-200:])
        raise PackageError(f"{run}: {MLPERF_LOG} fails the cloudmask ruleset: {first.strip()}",
                           f"see `cloudmask check-log {run} -v`")
    manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").is_file() else {}
    return results, manifest, flatten(RunDir.existing(run, "package").config().to_dict())


def system_of(results: dict, manifest: dict) -> dict:
    """What must be the same for every run of one system: its hardware and software stack."""
    host, gpus = manifest.get("host") or {}, manifest.get("gpus") or {}
    devices = [d for d in results.get("devices") or [] if d != "CPU"]
    return {"number_of_nodes": (results.get("distributed") or {}).get("nodes") or 1,
            "host_processor_model_name": host.get("cpu_model"), "host_processor_core_count": host.get("cpu_count"),
            "host_memory_capacity": f"{host.get('memory_gib')} GiB",
            "accelerator_model_name": devices[0] if devices else None, "accelerators_per_node": len(devices),
            "accelerator_driver": gpus.get("driver"), "framework": f"Keras on {results.get('backend')}",
            "operating_system": host.get("os"), "cloudmask_version": results.get("version")}


def _time_to_train(run: Path, results: dict) -> float:
    target = results.get("target")
    if target:
        return target["time_to_target_s"]
    times = {}
    for line in (run / MLPERF_LOG).read_text().splitlines():
        if ":::MLLOG" in line:
            event = json.loads(line.split(":::MLLOG", 1)[1])
            if event["key"] in ("run_start", "run_stop"):
                times[event["key"]] = event["time_ms"]
    return (times["run_stop"] - times["run_start"]) / 1000


def build(paths: list[str | Path], org: str, system: str, out: str | Path) -> dict:
    """Check the runs and write the package; its summary."""
    out = Path(out)
    if out.exists():
        raise PackageError(f"{out}: already exists", "choose a new package directory (packages are never overwritten)")
    runs = find_runs(paths)
    checked = [(run, *_check_run(run)) for run in runs]
    checked.sort(key=lambda c: c[1]["seed"])
    first, first_config = checked[0][0], checked[0][3]
    seeds: dict[int, Path] = {}
    for run, results, manifest, config in checked:
        if results["seed"] in seeds:
            raise PackageError(f"{run} and {seeds[results['seed']]} both have seed {results['seed']}",
                               "every repeat needs its own seed (slurm/train.sh: base seed + task id)")
        seeds[results["seed"]] = run
        differing = sorted(k for k in set(config) | set(first_config)
                           if k not in PER_RUN_KEYS and config.get(k) != first_config.get(k))
        if differing:
            k = differing[0]
            raise PackageError(f"{run}: config differs from {first} in {k} ({config.get(k)!r} vs "
                               f"{first_config.get(k)!r})", "a package holds repeats of one config")
        if system_of(results, manifest) != system_of(checked[0][1], checked[0][2]):
            raise PackageError(f"{run}: ran on another system than {first}", "package each system separately")
    wanted = first_config["mlperf.runs"]
    if len(checked) < wanted:
        raise PackageError(f"{len(checked)} runs, the config asks for {wanted} (mlperf.runs)",
                           "run more seeded repeats, or set mlperf.runs")
    times = [_time_to_train(run, results) for run, results, _, _ in checked]
    stats = describe(times)
    summary = {"benchmark": "cloudmask", "organization": org, "system": system,
               "division": checked[0][1].get("division"), "runs": len(checked),
               "score_metric": "time_to_target_s" if checked[0][1].get("target") else "time_to_train_s",
               "score": stats["olympic_mean"], "mean": stats["mean"], "ci95": [stats["ci95_low"], stats["ci95_high"]],
               "per_run": [{"result": f"result_{i}.txt", "run": str(run), "seed": results["seed"],
                            "time_s": t, "test_accuracy": (results.get("test") or {}).get("avg_accuracy"),
                            "energy_to_target_j": (results.get("target") or {}).get("energy_to_target_j")}
                           for i, ((run, results, _, _), t) in enumerate(zip(checked, times))]}
    _write(out, checked, org, system, summary)
    return summary


def _write(out: Path, checked: list, org: str, system: str, summary: dict) -> None:
    try:
        with fileio.atomic_dir(out) as tmp:
            folder = tmp / "results" / system / "cloudmask"
            folder.mkdir(parents=True)
            (tmp / "systems").mkdir()
            run0, results0, manifest0, _ = checked[0]
            fileio.write_json(tmp / "systems" / f"{system}.json",
                              {"submitter": org, "system_name": system, "division": results0.get("division"),
                               "status": RunDir.existing(run0, "package").config().mlperf.status,
                               **system_of(results0, manifest0)})
            for i, (run, *_rest) in enumerate(checked):
                shutil.copyfile(run / MLPERF_LOG, folder / f"result_{i}.txt")
            shutil.copyfile(run0 / CONFIG, folder / "config.yaml")
            fileio.write_json(folder / "summary.json", summary)
    except FileExistsError:
        raise PackageError(f"{out}: appeared while the package was written", "choose a new directory") from None
