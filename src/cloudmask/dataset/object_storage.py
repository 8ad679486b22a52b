"""Object storage as a dataset or store location: ``s3://bucket/prefix`` (or any fsspec URL) becomes a path
object with the ``pathlib`` API (universal-pathlib over fsspec/s3fs), so discovery, the split and screening are
the code that serves local directories.

Access: anonymous for a public bucket (``data.remote.anonymous: auto`` signs requests only when the usual AWS
chain finds credentials: environment, profile, instance role), an endpoint for S3-compatible stores (MinIO,
Ceph), a bounded number of attempts per request. Credentials written into a URL (``s3://KEY:SECRET@bucket``)
are taken out as soon as the config is built and kept in this process only, so no file of a run can hold them.
Every failure becomes one line naming the URL: no bucket, no object, access denied, unreachable endpoint.
"""

from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
from pathlib import Path

from ..errors import DataError

CLOUD_EXTRA = "pip install 'cloudmask-bench[cloud]' (s3fs, universal-pathlib, zarr)"
# the container images are built without it by default (containers/Dockerfile, containers/cloudmask.def)
IMAGE_CLOUD_EXTRA = "build the image with --build-arg EXTRAS=report,cloud: docs/containers.md"
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s]*@", re.IGNORECASE)


class StorageError(DataError):
    """Object storage failed (not the file): never a reason to skip a file as bad."""


_settings = {"anonymous": "auto", "retries": 5, "endpoint_url": None}
# a request's bound: botocore's attempts (data.remote.retries) × (connect + read); s3fs's own retries, which
# would multiply it (5 × by default: a stopped server held a read for 10 minutes), are switched off in location()
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 10, 30
_secrets: dict[str, dict] = {}  # "scheme://bucket" -> {"key", "secret"} taken out of a URL
_anonymous_found: list[bool] = []


def cloud_extra_hint() -> str:
    """How to get the cloud extra: inside one of our images (they set CLOUDMASK_IMAGE) pip is not the way."""
    return IMAGE_CLOUD_EXTRA if os.environ.get("CLOUDMASK_IMAGE") else CLOUD_EXTRA


def is_url(value) -> bool:
    """An object-storage URL (``file://`` and plain paths are local)."""
    return isinstance(value, str) and bool(_URL.match(value)) and not value.lower().startswith("file://")


def is_remote(path) -> bool:
    """A path object that lives on object storage rather than a mounted file system."""
    return path is not None and not isinstance(path, Path)


def redact(text: str) -> str:
    """``text`` with the ``user:secret@`` part of every URL in it removed."""
    return _USERINFO.sub(r"\1", text)


def take_credentials(value):
    """``value`` without credentials in its URL; they are remembered for this process, per bucket."""
    if not is_url(value):
        return value
    parts = urllib.parse.urlsplit(value)
    if "@" not in parts.netloc:
        return value
    userinfo, _, host = parts.netloc.rpartition("@")
    key, _, secret = userinfo.partition(":")
    _secrets[f"{parts.scheme}://{host}"] = {"key": urllib.parse.unquote(key),
                                            "secret": urllib.parse.unquote(secret)}
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


def configure(remote_cfg) -> None:
    """Take ``data.remote`` of a run's config (anonymous, retries, endpoint_url) for this process."""
    _settings.update(anonymous=remote_cfg.anonymous, retries=remote_cfg.retries,
                     endpoint_url=remote_cfg.endpoint_url)
    _anonymous_found.clear()


def _anonymous() -> bool:
    if _settings["anonymous"] != "auto":
        return bool(_settings["anonymous"])
    if not _anonymous_found:  # botocore's own lookup: environment, shared files, SSO, container and instance roles
        import botocore.exceptions
        import botocore.session

        try:
            _anonymous_found.append(botocore.session.Session().get_credentials() is None)
        except botocore.exceptions.BotoCoreError as e:  # AWS_PROFILE naming no profile, a broken config file
            raise DataError(f"AWS credentials: {e}", "fix AWS_PROFILE / ~/.aws/config, or set "
                            "data.remote.anonymous=true for a public bucket") from None
    return _anonymous_found[0]


def storage_options(url: str) -> dict:
    """fsspec options for ``url`` (credentials-free) under this process's settings."""
    scheme, host = urllib.parse.urlsplit(url)[:2]
    if scheme not in ("s3", "s3a"):
        return {}
    endpoint = (_settings["endpoint_url"] or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL"))
    options: dict = {"config_kwargs": {"retries": {"max_attempts": _settings["retries"], "mode": "standard"},
                                       "connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S}}
    if endpoint:
        options["endpoint_url"] = endpoint
    secret = _secrets.get(f"{scheme}://{host}")
    if secret:
        options.update(secret)
    else:
        options["anon"] = _anonymous()
    return options


def location(value):
    """A dataset or store location as a path object: ``pathlib.Path`` for a local path, a universal-pathlib
    path for a URL. Path objects pass through."""
    if isinstance(value, os.PathLike) and not isinstance(value, Path):
        value = os.fspath(value)
    if not isinstance(value, str):
        return value  # a Path, or a remote path object already
    if not is_url(value):
        return Path(value.removeprefix("file://")).expanduser()
    url = take_credentials(value)
    try:
        from upath import UPath

        path = UPath(url, **storage_options(url))
        if hasattr(path.fs, "retries"):
            path.fs.retries = 1  # one s3fs try: botocore's attempts are the only retries (see CONNECT_TIMEOUT_S)
        return path
    except ImportError as e:
        raise DataError(f"{url}: reading object storage needs packages that are not installed ({e})",
                        cloud_extra_hint()) from None
    except ValueError as e:
        raise DataError(f"{url}: not a usable URL ({e})", "give s3://BUCKET/PREFIX or another fsspec URL") from None


def _connection_errors() -> tuple:
    kinds: list = [ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        import botocore.exceptions as be

        kinds += [be.ConnectionError, be.HTTPClientError]
    with contextlib.suppress(ImportError):
        import aiohttp

        kinds.append(aiohttp.ClientError)
    return tuple(kinds)


@contextlib.contextmanager
def errors(path):
    """Object-storage failures inside the block as one DataError naming ``path`` (local paths: no change)."""
    if not is_remote(path):
        yield
        return
    try:
        yield
    except DataError:
        raise
    except FileNotFoundError as e:
        raise StorageError(f"{str(path)}: {_not_found(path, e)}",
                           "check the URL and the endpoint (data.remote.endpoint_url / AWS_ENDPOINT_URL)") from None
    except PermissionError as e:
        if storage_options(str(path)).get("anon"):
            raise StorageError(f"{str(path)}: access denied to an unsigned request ({_first_line(e)})",
                               "the bucket is not public: set credentials (AWS_ACCESS_KEY_ID + "
                               "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)") from None
        raise StorageError(f"{str(path)}: access denied ({_first_line(e)})",
                           "these credentials may not read it: check them, or set data.remote.anonymous=true "
                           "for a public bucket") from None
    except _connection_errors() as e:
        attempts = _settings["retries"]
        bound = attempts * (CONNECT_TIMEOUT_S + READ_TIMEOUT_S)
        raise StorageError(f"{str(path)}: the object store did not answer after {attempts} attempts of at most "
                           f"{CONNECT_TIMEOUT_S} s to connect + {READ_TIMEOUT_S} s to read (≤ {bound} s; "
                           f"{redact(_first_line(e))})",
                           "check the network and the endpoint; data.remote.retries sets the attempts") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _not_found(path, e: Exception) -> str:
    text = _first_line(e)
    if "bucket" in text.lower():
        return f"no such bucket ({text})"
    return "no such object or prefix"


def probe(path) -> None:
    """Fail with the precise reason when a remote directory cannot be listed (a missing bucket, denied access,
    no endpoint); a prefix with no objects is left to the caller's message. Local paths: nothing to do."""
    if not is_remote(path):
        return
    with errors(path):
        bucket = path.path.split("/", 1)[0]
        path.fs.ls(bucket, detail=False)


def read_bytes(path) -> bytes:
    """The whole object in one request (the HDF5 files are contiguous and every byte of them is read)."""
    with errors(path):
        return path.fs.cat_file(path.path)


def open_file(path, block_size: int = 1 << 20):
    """A read-only file object with read-ahead for h5py to parse headers from, a block per request."""
    with errors(path):
        return path.fs.open(path.path, "rb", block_size=block_size, cache_type="readahead")
