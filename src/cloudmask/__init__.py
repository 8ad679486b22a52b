"""cloudmask-bench: the MLCommons Science CloudMask benchmark, faithful, reproducible and fast."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path


def _version() -> str:
    # VERSION at the repository root is the single source; installed metadata is generated from it.
    try:
        return metadata.version("cloudmask-bench")
    except metadata.PackageNotFoundError:
        version_file = Path(__file__).resolve().parents[2] / "VERSION"
        return version_file.read_text().strip() if version_file.is_file() else "0+unknown"


__version__ = _version()
