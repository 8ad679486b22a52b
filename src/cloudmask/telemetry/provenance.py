"""Provenance of a run (``manifest.json``): code, environment, hardware, scheduler and inputs, so that every
number can be traced to what produced it."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import psutil

from .. import __version__
from ..dataset import object_storage
from ..training.runtime import cpu_model
from . import energy_sources


def _package_versions() -> dict:
    out = {}
    for dist in ("tensorflow", "tensorflow-cpu", "keras", "jax", "jaxlib", "torch", "numpy", "h5py",
                 "mlperf-logging", "nvidia-ml-py", "psutil", "pyyaml", "protobuf"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _git_revision() -> dict:
    source = Path(__file__).resolve().parent
    if os.environ.get("CLOUDMASK_GIT_REVISION"):  # baked into container images at build time
        return {"revision": os.environ["CLOUDMASK_GIT_REVISION"], "dirty": None, "source": "image"}
    try:
        rev = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return {"revision": None, "dirty": None, "source": "no git checkout"}
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip()), "source": "checkout"}
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None, "source": "git not available"}


def container_context(environ=os.environ, labels: Path = Path("/.singularity.d/labels.json")) -> dict:
    """The container this process runs in: runtime, image and the image's cloudmask label."""
    out = {"runtime": "none", "image": None, "image_label": environ.get("CLOUDMASK_IMAGE")}
    prefix = "APPTAINER" if environ.get("APPTAINER_CONTAINER") else "SINGULARITY"
    if environ.get(f"{prefix}_CONTAINER"):
        out.update(_apptainer_image(environ[f"{prefix}_CONTAINER"], environ.get(f"{prefix}_NAME"), labels))
        out["runtime"] = prefix.lower()
    elif Path("/run/.containerenv").exists():
        out.update(runtime="podman", image=_containerenv_image())
    elif Path("/.dockerenv").exists():
        out["runtime"] = "docker"
    return out


def _apptainer_image(container: str, name: str | None, labels: Path) -> dict:
    """APPTAINER_CONTAINER is the image the user ran, except where Apptainer could not mount it (no squashfuse,
    or --unsquash): then it is a temporary sandbox and only APPTAINER_NAME still names the image."""
    out = {"image": container}
    if name and Path(container).name != name:
        out.update(image=name, unpacked_to=container)
    try:
        built = json.loads(labels.read_text()).get("org.label-schema.usage.apptainer.version")
    except (OSError, ValueError, AttributeError):
        built = None
    if built:
        out["built_with"] = f"apptainer {built}"
    return out


def _containerenv_image() -> str | None:
    try:
        for line in Path("/run/.containerenv").read_text().splitlines():
            if line.startswith("image="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return None


SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
              "SLURM_JOB_NAME", "SLURM_JOB_PARTITION", "SLURM_JOB_ACCOUNT", "SLURM_CLUSTER_NAME", "SLURM_JOB_NODELIST",
              "SLURM_NNODES", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_CPUS_PER_TASK", "SLURM_MEM_PER_NODE",
              "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_RESTART_COUNT", "SLURMD_NODENAME")


def host_context() -> dict:
    return {"hostname": socket.gethostname(), "os": platform.platform(), "kernel": platform.release(),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 2)}


def gpu_context(nvml=None) -> dict:
    """GPUs of this job as NVML reports them (names, UUIDs, driver, memory), or why there are none."""
    try:
        nv = nvml or energy_sources._load_nvml()
    except ImportError:
        return {"available": False, "reason": "pynvml not installed", "devices": []}
    try:
        nv.nvmlInit()
    except nv.NVMLError as e:
        return {"available": False, "reason": energy_sources._text(e), "devices": []}
    try:
        gpus = energy_sources.NvmlGpus(nvml=nv)
        gpus._select(nv)
        devices = []
        for info, h in zip(gpus.info, gpus.handles):
            devices.append({**info, "memory_gib": round(nv.nvmlDeviceGetMemoryInfo(h).total / 2**30, 2)})
        return {"available": True, "driver": energy_sources._text(nv.nvmlSystemGetDriverVersion()),
                "cuda_driver": nv.nvmlSystemGetCudaDriverVersion(), "devices": devices}
    except nv.NVMLError as e:
        return {"available": False, "reason": energy_sources._text(e), "devices": []}
    finally:
        nv.nvmlShutdown()


def framework_context() -> dict:
    out = {"keras_backend": None, "build": {}}
    try:
        import keras

        out["keras_backend"] = keras.backend.backend()
        if out["keras_backend"] == "tensorflow":
            import tensorflow as tf

            info = tf.sysconfig.get_build_info()
            out["build"] = {k: info.get(k) for k in ("cuda_version", "cudnn_version", "is_cuda_build")}
    except ImportError:
        pass
    return out


def collect_provenance(cfg, dataset_root: Path | None, dataset_digest: str | None, started: float,
                     nvml=None) -> dict:
    """Provenance of a run: code, environment, hardware, scheduler, inputs."""
    return {
        "schema_version": 1,
        "cloudmask_version": __version__,
        "git": _git_revision(),
        "command": [object_storage.redact(arg) for arg in sys.argv],
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "packages": _package_versions(),
        "framework": framework_context(),
        "container": container_context(),
        "host": host_context(),
        "gpus": gpu_context(nvml),
        "slurm": {k: os.environ[k] for k in SLURM_VARS if k in os.environ},
        "environment": {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "KERAS_BACKEND", "TF_DETERMINISTIC_OPS",
                                                   "XLA_FLAGS", "OMP_NUM_THREADS") if k in os.environ},
        "seed": cfg.seed,
        "config_sha256": cfg.sha256(),
        "dataset": {"root": str(dataset_root) if dataset_root else None, "manifest_sha256": dataset_digest},
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "end_time": None,
    }


def finish_provenance(manifest: dict) -> dict:
    manifest["end_time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return manifest
