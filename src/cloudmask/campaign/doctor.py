"""``cloudmask doctor``: is this machine (or container) ready to run the benchmark, and if not, why.

Each check gives a status — ok, info, warn or fail — and one line of detail. ``fail`` means a run would not
work (exit 1); ``warn`` means it would run but slower or with less information (no GPU, small /dev/shm).
A short form (``preflight``) runs at the start of ``train`` and ``bench`` and only logs warnings.
"""

from __future__ import annotations

import logging
import os
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..dataset.files import day_or_night, find_files, read_sample, resolve_layout, verify
from ..errors import DataError
from ..telemetry.provenance import SLURM_VARS, container_context, framework_context, gpu_context
from ..training import runtime

log = logging.getLogger(__name__)

SHM_MIN_BYTES = 1 << 30  # data loaders stall on Docker's default 64 MB /dev/shm
DISK_WARN_BYTES = 10 << 30
DISK_FAIL_BYTES = 1 << 30


@dataclass
class Check:
    name: str
    status: str  # ok | info | warn | fail
    detail: str


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def check_backend() -> tuple[list[Check], list[str] | None]:
    """The Keras backend and its build, and the GPUs it sees (None when it cannot be imported)."""
    try:
        runtime.quiet_tensorflow()
        name = runtime.backend()
        devices = runtime.accelerators()
    except Exception as e:  # an import failure of the framework is the finding itself
        return [Check("keras backend", "fail", f"cannot import the Keras backend: {type(e).__name__}: {e}"[:300])], None
    build = framework_context().get("build") or {}
    out = [Check("keras backend", "ok", f"{name} (cloudmask {__version__})")]
    if build:
        cuda = "CUDA build" if build.get("is_cuda_build") else "CPU-only build"
        out.append(Check("TensorFlow build", "info", f"{cuda}, CUDA {build.get('cuda_version') or '-'}, "
                                                     f"cuDNN {build.get('cudnn_version') or '-'}"))
    return out, devices


def check_gpus(devices: list[str] | None, nvml=None) -> list[Check]:
    """What the backend and NVML see. No GPU anywhere is one line saying why (the common case of a login node,
    a CPU machine or a container started without --nv / --gpus)."""
    ctx = gpu_context(nvml)
    if not ctx["available"] and not devices:
        reason = ctx.get("reason") or "unknown"
        why = ("no NVIDIA driver, or no --nv / --gpus" if "Library Not Found" in reason
               else "pynvml not installed" if "not installed" in reason else f"NVML: {reason}")
        return [Check("GPU", "warn", f"no GPU ({why}): runs on the CPU, no energy")]
    out = []
    if devices is not None:
        out.append(Check("GPUs (backend)", "ok", f"{len(devices)}: {', '.join(devices)}") if devices else
                   Check("GPUs (backend)", "warn", "the Keras backend sees none of the GPUs NVML lists (a CPU-only "
                                                   "build, or CUDA_VISIBLE_DEVICES): the run uses the CPU"))
    if not ctx["available"]:
        return out + [Check("GPUs (NVML)", "warn", f"NVML: {ctx.get('reason')}; energy is not measured")]
    if not ctx["devices"]:
        return out + [Check("GPUs (NVML)", "warn", "NVML works but this job sees no GPU (CUDA_VISIBLE_DEVICES?)")]
    names = ", ".join(f"{d.get('name')} ({d.get('memory_gib')} GiB)" for d in ctx["devices"])
    cuda = ctx.get("cuda_driver")
    cuda_text = f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) else str(cuda)
    return out + [Check("GPUs (NVML)", "ok", f"{len(ctx['devices'])}: {names}"),
                  Check("NVIDIA driver", "ok", f"{ctx.get('driver')}, supports CUDA {cuda_text}")]


def check_shm(path: str = "/dev/shm") -> list[Check]:
    try:
        total = shutil.disk_usage(path).total
    except OSError:
        return [Check("/dev/shm", "warn", f"{path} not found; data loaders that share memory may fail")]
    if total < SHM_MIN_BYTES:
        return [Check("/dev/shm", "warn", f"{_fmt_bytes(total)}: too small (< 1 GB); start the container with "
                                          "--shm-size=8g or --ipc=host")]
    return [Check("/dev/shm", "ok", _fmt_bytes(total))]


def check_disk(results: str | os.PathLike) -> list[Check]:
    path = Path(results).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if not os.access(probe, os.W_OK):
        return [Check("results path", "fail", f"{path}: not writable ({probe}); set output.root or --out")]
    status = "fail" if free < DISK_FAIL_BYTES else "warn" if free < DISK_WARN_BYTES else "ok"
    return [Check("results path", status, f"{path}: {_fmt_bytes(free)} free" +
                  ("" if status == "ok" else " (a run with masks and checkpoints needs a few GB)"))]


def check_data(root: str | None, full: bool = False) -> list[Check]:
    if not root:
        return [Check("dataset", "info", "none given (--data DIR); `cloudmask bench` uses synthetic data")]
    try:
        layout = resolve_layout(root)
    except DataError as e:
        return [Check("dataset", "fail", str(e))]
    if full:
        report = verify(root)
        bad = len(report.bad)
        counts = ", ".join(f"{split} {dn} {n}" for (split, dn), n in sorted(report.counts().items()))
        return [Check("dataset", "fail" if bad else "ok", f"{root}: {len(report.checks)} files verified ({counts})"
                      + (f"; {bad} bad, e.g. {report.bad[0].path}: {report.bad[0].problem}" if bad else ""))]
    counts = []
    first_bad = None
    for name, directory in (("train", layout.train_dir), ("test", layout.test_dir)):
        files = find_files(directory)
        days = sum(day_or_night(f) == "day" for f in files)
        counts.append(f"{name} {len(files)} ({days} day, {len(files) - days} night)")
        if files and first_bad is None:
            try:
                read_sample(files[0])
            except DataError as e:
                first_bad = str(e)
    detail = f"{root} ({layout.naming} layout): " + ", ".join(counts)
    if first_bad:
        return [Check("dataset", "fail", f"{detail}; {first_bad}")]
    return [Check("dataset", "ok", detail + "; first files readable (--full verifies every file)")]


def check_context() -> list[Check]:
    c = container_context()
    image = c.get("image") or c.get("image_label") or "-"
    detail = "none" if c["runtime"] == "none" else f"{c['runtime']}, image {image}"
    if c.get("unpacked_to"):
        detail += f" (unpacked to {c['unpacked_to']}: no squashfuse, or --unsquash)"
    out = [Check("container", "info", detail)]
    slurm = {k: os.environ[k] for k in SLURM_VARS if k in os.environ}
    if slurm:
        job = slurm.get("SLURM_ARRAY_JOB_ID") and f"{slurm['SLURM_ARRAY_JOB_ID']}_{slurm.get('SLURM_ARRAY_TASK_ID')}"
        out.append(Check("SLURM", "info", f"job {job or slurm.get('SLURM_JOB_ID')} on "
                                          f"{slurm.get('SLURMD_NODENAME', '?')}, "
                                          f"GPUs {slurm.get('SLURM_JOB_GPUS', '-')}, "
                                          f"CPUs {slurm.get('SLURM_CPUS_PER_TASK', '-')}"))
    else:
        out.append(Check("SLURM", "info", "not inside a SLURM job"))
    return out


def run_checks(data_root: str | None, results: str, full: bool = False, nvml=None) -> list[Check]:
    backend, devices = check_backend()
    return [*backend, *check_gpus(devices, nvml), *check_shm(), *check_disk(results), *check_data(data_root, full),
            *check_context()]


def table(checks: list[Check], width: int = 78) -> str:
    """A fixed-width table; long details wrap under their own column."""
    name_w = max(len(c.name) for c in checks)
    lines = ["cloudmask doctor", f"{'check'.ljust(name_w)}  status  detail", f"{'-' * name_w}  ------  {'-' * 40}"]
    for c in checks:
        wrapped = textwrap.wrap(c.detail, width) or [""]
        lines.append(f"{c.name.ljust(name_w)}  {c.status.upper().ljust(6)}  {wrapped[0]}")
        lines += [f"{'':{name_w}}  {'':6}  {more}" for more in wrapped[1:]]
    return "\n".join(lines)


def preflight(results: str) -> None:
    """The cheap checks, at the start of a run: warnings go to the log, nothing stops the run."""
    for c in [*check_shm(), *check_disk(results)]:
        if c.status in ("warn", "fail"):
            log.warning("preflight: %s: %s", c.name, c.detail)
