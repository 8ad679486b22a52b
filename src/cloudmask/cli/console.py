"""What reaches the console: the package's log lines on stdout (once per process) and in ``console.log`` of the
run; and stderr without the frameworks' start-up messages (``filter_framework_noise``)."""

from __future__ import annotations

import logging
import os
import sys

from ..dataset import object_storage
from ..fileio import AppendLog
from ..run.run_dir import CONSOLE_LOG, RunDir

LOGGER = "cloudmask"
FILE_ONLY = "file_only"  # ``extra={FILE_ONLY: True}``: a record for console.log, not the screen (machine-readable)


class _Flush(logging.StreamHandler):
    def emit(self, record):
        super().emit(record)
        try:
            self.flush()
        except BrokenPipeError:
            stdout_gone()

    def handleError(self, record):
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            stdout_gone()  # not logging's traceback for every later line
        else:
            super().handleError(record)


def stdout_gone() -> None:
    """stdout's reader has left (``cloudmask train | head``): what follows goes nowhere, quietly, and the run goes
    on (console.log keeps every line)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def setup() -> None:
    """Package log lines to stdout, once per process."""
    logger = logging.getLogger(LOGGER)
    if not any(getattr(h, "_cloudmask_console", False) for h in logger.handlers):
        handler = _Flush(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(lambda record: not getattr(record, FILE_ONLY, False))
        handler._cloudmask_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def quiet() -> None:
    """Only warnings and errors on stdout (a worker that is not the chief: every line would repeat the chief's;
    a JSON report on stdout)."""
    for h in logging.getLogger(LOGGER).handlers:
        if getattr(h, "_cloudmask_console", False):
            h.setLevel(logging.WARNING)


def _redacted(record: logging.LogRecord) -> bool:
    """Drop the credentials of any URL in the line (remote.py already keeps them out of paths and configs)."""
    text = record.getMessage()
    if "@" in text:
        record.msg, record.args = object_storage.redact(text), None
    return True


def attach(run: RunDir) -> logging.Handler:
    """Send the package's log lines to ``console.log`` in the run directory (appending on resume). A write that
    fails there (a full disk) drops the file's later lines; stdout still has them, and the failing write of a
    checkpoint or result stops the run with the reason."""
    handler = AppendLog(run / CONSOLE_LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.addFilter(_redacted)
    logging.getLogger(LOGGER).addHandler(handler)
    return handler


def detach(handler: logging.Handler) -> None:
    logging.getLogger(LOGGER).removeHandler(handler)
    handler.close()


# ------------------------------------------------------------------------- framework start-up messages

# What TensorFlow, XLA and absl write straight to file descriptor 2 at start-up, before any Python logging
# setting applies: info lines, and warnings nobody running the benchmark can act on. Any other warning or error
# line passes (a cuInit failure in a container started without --nv, an out-of-memory error, a crash).
_NOISE = r"""(?x)
    ^WARNING:\ All\ log\ messages\ before\ absl::InitializeLog\(\)
  | ^I\d{4}\ \S+\s+\d+\ \S+:\d+\]                                       # absl info lines
  | ^\d{4}-\d\d-\d\d\ \d\d:\d\d:\d\d\.\d+:\ I\ \S+:\d+\]                 # TensorFlow's own info lines
  | ^To\ enable\ the\ following\ instructions:                          # cpu_feature_guard's second line
  | ^(?:[WE]\d{4}\ \S+\s+\d+\ \S+:\d+\]|\d{4}-\d\d-\d\d\ [\d:.]+:\ [WE]\ \S+:\d+\])\ .*(?:
        oneDNN\ supports\ DT_INT32\ only\ on\ platforms\ with\ AVX-512
      | Unable\ to\ register\ cu(?:DNN|FFT|BLAS)\ factory
      | Attempting\ to\ register\ factory\ for\ plugin
      | TF-TRT\ Warning:\ Could\ not\ find\ TensorRT
      | computation\ placer\ already\ registered
      | Skipping\ the\ delay\ kernel)
"""

# The filter itself runs in a child process reading our fd 2: a thread would die with us and lose the last
# lines before a crash (an abort message, a segfault's traceback), which are the ones that matter.
_FILTER = r"""
import os, re, select, signal, sys
for s in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2"):
    signal.signal(getattr(signal, s), signal.SIG_IGN)  # outlive the parent: drain until its last write
noise = re.compile(sys.argv[1].encode())
out, pending = sys.stdout.buffer, b""
def emit(data):
    out.write(data)
    out.flush()
while True:
    chunk = os.read(0, 65536)
    if not chunk:
        break
    *lines, pending = (pending + chunk).split(b"\n")
    emit(b"".join(line + b"\n" for line in lines if not noise.match(line)))
    if pending and not select.select([0], [], [], 0.1)[0]:
        emit(pending)  # a prompt or a live line without its newline yet
        pending = b""
if pending and not noise.match(pending):
    emit(pending)
"""

_filter_process = None


def filter_framework_noise() -> None:
    """From now on, this process's stderr without the frameworks' start-up lines (``--verbose`` keeps them)."""
    global _filter_process
    import subprocess

    if _filter_process is not None:
        return
    try:
        sys.stderr.flush()
        _filter_process = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FILTER, _NOISE],
                                           stdin=subprocess.PIPE, stdout=sys.stderr.fileno(), close_fds=True)
        os.dup2(_filter_process.stdin.fileno(), 2)
        _filter_process.stdin.close()  # fd 2 is now the pipe's only write end: the filter ends when we do
    except (OSError, ValueError):
        _filter_process = None  # no filter (no fd 2, no fork): every line passes, as with --verbose
