"""Orbax's and tensorstore's storage failures as one line: a file that cannot be read, a full
disk, and the log noise their background threads print around such a failure."""

from __future__ import annotations

import errno
import logging
import re
import sys
from pathlib import Path

# tensorstore reports storage failures as ValueError("CODE: ..."); other codes are not the disk's.
_STORAGE_CODES = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE", "PERMISSION_DENIED", "FAILED_PRECONDITION")
_LOCAL_FILE = re.compile(r'local file "([^"]+)"')


def read_failure(e: BaseException | None, step_dir: Path) -> str | None:
    """One clause naming what of `step_dir` could not be read, when `e` (or an exception it was
    raised from) is a failure to read the files themselves — an OSError, or one of tensorstore's
    storage codes; else None (a bug keeps its traceback)."""
    while e is not None and not isinstance(e, OSError) and str(e).split(":", 1)[0] not in _STORAGE_CODES:
        e = e.__cause__ or e.__context__
    if e is None:
        return None
    root = f"{step_dir}/"
    if isinstance(e, OSError):
        path, why = e.filename, e.strerror or str(e)
    else:
        why = str(e).split(" [tensorstore_spec=")[0].splitlines()[0].replace(root, "")
        files = _LOCAL_FILE.findall(str(e).split(" [tensorstore_spec=")[0])
        path = files[-1] if files else None
    if path is None:
        return f"a file under it cannot be read ({why})"
    shown = str(path).replace(root, "")
    return f"{shown} is missing" if not Path(path).exists() else f"{shown} cannot be read ({why})"


_FULL_DISK = ("No space left on device", "Disk quota exceeded")


def disk_full(e: BaseException | None) -> bool:
    """ENOSPC / EDQUOT, as Python's OSError or as tensorstore's RESOURCE_EXHAUSTED text."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(e) for t in _FULL_DISK):
            return True
        e = e.__cause__ or e.__context__
    return False


class _QuietFullDisk(logging.Filter):
    """Orbax logs a failed background write (with tracebacks) from each of its threads; a full disk
    is reported once, as one line, by the Checkpointer."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (disk_full(exc) or any(t in record.getMessage() for t in _FULL_DISK))


_QUIET_FULL_DISK = _QuietFullDisk()


def _hush_closed_loop_callbacks() -> None:
    """When a write or read fails, tensorstore's callbacks for the operations still in flight find
    Orbax's event loop already closed and each prints an "Event loop is closed" traceback (dozens
    for one full disk); the failure itself surfaces as one exception, so those are dropped. Every
    other unraisable exception still prints."""
    previous = sys.unraisablehook
    if getattr(previous, "jaxsft_hush", False):
        return

    def hook(unraisable) -> None:
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook.jaxsft_hush = True
    sys.unraisablehook = hook


def quiet_storage_noise() -> None:
    """Drop the log lines and tracebacks that repeat a storage failure the Checkpointer reports
    itself in one line (idempotent)."""
    for name in ("absl", "asyncio"):  # asyncio: "Task exception was never retrieved" for each failed write
        logging.getLogger(name).addFilter(_QUIET_FULL_DISK)
    _hush_closed_loop_callbacks()


def size_text(n: int) -> str:
    """A size for a message: GiB from one GiB up, else MiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

