"""Fetching cloud_slstr_ds1 from the STFC object store with ``aws s3 sync`` (anonymous, resumable)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from ..errors import DataError
from .files import LAYOUTS

ENDPOINT = "https://s3.echo.stfc.ac.uk"
BUCKET_PREFIX = "s3://sciml-datasets/es/cloud_slstr_ds1"


def download_commands(dest: Path, naming: str, endpoint: str = ENDPOINT, prefix: str = BUCKET_PREFIX,
                      splits: tuple[str, ...] = ("train", "test")) -> list[list[str]]:
    """``aws s3 sync`` commands; sync skips files already complete, so re-running resumes."""
    train, test = LAYOUTS[naming]
    names = [n for s, n in (("train", train), ("test", test)) if s in splits]
    return [["aws", "s3", "sync", "--no-sign-request", "--endpoint-url", endpoint, "--cli-read-timeout", "0",
             f"{prefix}/{name}", str(dest / name)] for name in names]


def probe_command(endpoint: str = ENDPOINT, prefix: str = BUCKET_PREFIX) -> list[str]:
    return ["aws", "s3", "ls", "--no-sign-request", "--endpoint-url", endpoint, f"{prefix}/"]


def detect_naming(endpoint: str = ENDPOINT, prefix: str = BUCKET_PREFIX) -> str:
    """Which prefix naming the bucket uses now (it was renamed one-day/ssts -> training/inference)."""
    out = _run_aws(probe_command(endpoint, prefix), capture=True)
    listed = set(re.findall(r"PRE\s+(\S+)/", out))
    for naming, (train, test) in LAYOUTS.items():
        if train in listed and test in listed:
            return naming
    raise DataError(f"{prefix}/ at {endpoint} lists neither training/+inference/ nor one-day/+ssts/ "
                    f"(found: {', '.join(sorted(listed)) or 'nothing'})",
                    "the bucket moved again: pass --naming and --prefix, or use the Globus mirror in docs/dataset.md")


def _run_aws(cmd: list[str], capture: bool = False) -> str:
    if shutil.which(cmd[0]) is None:
        raise DataError("the AWS command line client 'aws' is not installed",
                        "install it with `pip install awscli` (anonymous access, no account needed)")
    try:
        done = subprocess.run(cmd, check=False, text=True, capture_output=capture)
    except OSError as e:
        raise DataError(f"cannot run {cmd[0]}: {e}") from None
    if done.returncode != 0:
        detail = (done.stderr or "").strip().splitlines()[-1:] if capture else []
        raise DataError(f"`{' '.join(cmd[:3])} ...` failed with exit code {done.returncode}"
                        + (f": {detail[0]}" if detail else ""),
                        "re-run the same command to resume; check the endpoint and your network")
    return done.stdout or ""


def download(dest: str | os.PathLike, naming: str = "auto", endpoint: str = ENDPOINT, prefix: str = BUCKET_PREFIX,
             splits: tuple[str, ...] = ("train", "test"), dry_run: bool = False, echo=print) -> list[list[str]]:
    dest = Path(dest).expanduser()
    if naming == "auto":
        if dry_run:
            echo("# naming auto: would first list the bucket to choose training/inference or one-day/ssts:")
            echo(" ".join(probe_command(endpoint, prefix)))
            naming = "training"
        else:
            naming = detect_naming(endpoint, prefix)
    cmds = download_commands(dest, naming, endpoint, prefix, splits)
    for cmd in cmds:
        echo(" ".join(cmd))
        if not dry_run:
            Path(cmd[-1]).mkdir(parents=True, exist_ok=True)
            _run_aws(cmd)
    return cmds
