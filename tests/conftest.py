"""Shared fixtures: a small real synthetic dataset (real HDF5 files, real shapes) made once per session, and
the tiny-model settings that keep training tests to seconds on 2 CPU cores."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# A tiny U-Net (filters 4, depth 2), small batches and one test image scored: same code paths as the reference
# model, ~100x cheaper. Tests about scoring several images add infer.max_files=null (ALL_TEST_FILES).
TINY = ["model.filters=4", "model.depth=2", "train.batch_size=8", "train.epochs=2", "infer.images_per_call=2",
        "infer.max_files=1"]
ALL_TEST_FILES = "infer.max_files=null"


def pytest_sessionstart(session):
    """The user's caches and the shared temporary directory moved under pytest's temporary root before the tests
    are collected, for this process and every CLI run and job it starts, so the suite never writes into ~/.cache
    or /tmp: $XDG_CACHE_HOME (importing TensorFlow, as some test modules do, writes matplotlib's font cache there;
    bench synthesizes its data there), $CLOUDMASK_CACHE_DIR (data.cache=auto) and $TMPDIR (ReFrame's rfm-*.log,
    Keras's save directory that a killed run leaves behind). The session's tmp_path_factory, as the fixture of
    that name gives it; no fixture exists yet, and pytest's own root is already placed."""
    tmp = session.config._tmp_path_factory
    os.environ["CLOUDMASK_CACHE_DIR"] = str(tmp.mktemp("patch-cache"))
    os.environ["XDG_CACHE_HOME"] = str(tmp.mktemp("xdg-cache"))
    tempfile.tempdir = os.environ["TMPDIR"] = str(tmp.mktemp("tmp"))


# What a test must leave alone: the checkout (but for Python's own caches and the .venv the test command made)
# and the user's ~/.cache. A test that adds a file there fails, named, at its teardown.
REPO = Path(__file__).resolve().parents[1]
_NOT_WATCHED = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}


def _files_under(root: Path) -> set[str]:
    found = set()
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _NOT_WATCHED and not d.endswith(".egg-info")
                   and not d.startswith(".venv")]  # .venv, and .venv-jax of the JAX lane
        found.update(os.path.join(top, f) for f in files)
    return found


def _watched() -> set[str]:
    cache = Path.home() / ".cache"  # its top level (a new tool's cache) and all of cloudmask's
    top = {str(p) for p in cache.iterdir()} if cache.is_dir() else set()
    return _files_under(REPO) | top | _files_under(cache / "cloudmask")


@pytest.fixture(autouse=True)
def writes_nothing_outside_its_tmp(request):
    before = _watched()
    yield
    added = sorted(_watched() - before)
    if added:
        pytest.fail(f"{request.node.nodeid} wrote outside its temporary directory: {', '.join(added[:5])}",
                    pytrace=False)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """5 training files (4 train + 1 validation after the split) and 2 test files, read-only for tests."""
    from cloudmask.dataset.synth import synthesize

    root = tmp_path_factory.mktemp("data") / "synthetic"
    synthesize(root, n_train=5, n_test=2, seed=7)
    return root


@pytest.fixture
def dataset_copy(dataset, tmp_path) -> Path:
    """A private copy a test may damage."""
    target = tmp_path / "data"
    shutil.copytree(dataset, target)
    return target


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd=None) -> subprocess.CompletedProcess:
    """Run the real ``cloudmask`` entry point in a fresh interpreter, as a user would."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cloudmask", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)


def assert_clean_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    """A user error: non-zero exit, one 'cloudmask: error:' line naming the problem, no traceback."""
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("cloudmask: error:")]
    assert len(errors) == 1, done.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture(scope="session")
def prepared(dataset, tmp_path_factory) -> Path:
    """A patch store of ``dataset`` (80 training, 20 validation patches, 2 test images), read-only for tests."""
    out = tmp_path_factory.mktemp("store") / "store"
    done = run_cli("data", "prepare", str(dataset), str(out))
    assert done.returncode == 0, done.stderr
    return out


def require(available: bool, what: str) -> None:
    """Skip a test whose system tool is missing here; in CI (CLOUDMASK_CI=1, where .ci/run installs it) fail."""
    if available:
        return
    if os.environ.get("CLOUDMASK_CI") == "1":
        pytest.fail(f"CLOUDMASK_CI=1 but {what} is not installed")
    pytest.skip(f"{what} is not installed")


# ---------------------------------------------------------------------------------------- memory ceiling
# A laptop with 16 GB must be able to run the suite: no test process (pytest itself, or a `cloudmask` it
# starts) may pass RSS_LIMIT_GIB. getrusage gives the peak of this process and of the largest child waited for;
# the test during which each peak rose is named, so a regression points at its test.
RSS_LIMIT_GIB = float(os.environ.get("CLOUDMASK_TEST_RSS_LIMIT_GIB", "6"))
_peaks = {"self": (0.0, ""), "children": (0.0, "")}


def _peak_gib(who) -> float:
    import resource

    return resource.getrusage(who).ru_maxrss / 2**20  # KiB on Linux


def pytest_runtest_logfinish(nodeid, location):
    import resource

    for key, who in (("self", resource.RUSAGE_SELF), ("children", resource.RUSAGE_CHILDREN)):
        peak = _peak_gib(who)
        if peak > _peaks[key][0] + 0.01:
            _peaks[key] = (peak, nodeid)


def pytest_sessionfinish(session, exitstatus):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a pytest-xdist worker hands its peaks to the controller
        workeroutput["rss_peaks"] = dict(_peaks)
    elif _over_limit() and session.testscollected:
        session.exitstatus = 1


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist's controller: the peaks of each worker as they finish (the controller itself runs no test)."""
    for key, (gib, test) in (getattr(node, "workeroutput", None) or {}).get("rss_peaks", {}).items():
        if gib > _peaks[key][0]:
            _peaks[key] = (gib, test)


@pytest.hookimpl(trylast=True)  # after -m has deselected: only the tests that will run count
def pytest_collection_modifyitems(config, items):
    """The order in which the pytest-xdist workers take the files (test.sh: --dist loadfile
    --no-loadscope-reorder): a file with a ``longest`` test first, so that it never runs alone at the end,
    then the files with more tests before those with fewer (pytest-xdist's own order)."""
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    first = {f for f, its in files.items() if any(i.get_closest_marker("longest") for i in its)}
    ordered = sorted(files, key=lambda f: (f not in first, -len(files[f])))
    items[:] = [item for f in ordered for item in files[f]]


def _over_limit() -> list[str]:
    return [f"{who} {gib:.2f} GiB in {test}" for who, (gib, test) in _peaks.items() if gib > RSS_LIMIT_GIB]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _peaks["self"][1]:
        return  # nothing ran (--collect-only)
    terminalreporter.write_line(
        f"peak RSS of a pytest process {_peaks['self'][0]:.2f} GiB (reached in {_peaks['self'][1] or '-'}), "
        f"of the largest child process {_peaks['children'][0]:.2f} GiB (in {_peaks['children'][1] or '-'}); "
        f"limit {RSS_LIMIT_GIB:g} GiB")
    if _over_limit():
        terminalreporter.write_line(f"FAILED memory ceiling: over {RSS_LIMIT_GIB:g} GiB RSS: "
                                    f"{'; '.join(_over_limit())}", red=True)

