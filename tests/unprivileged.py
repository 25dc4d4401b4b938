"""Children that file permissions bind, also when the tests run as root.

Root reads and writes through `chmod` (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so a test of a
permission refusal run as root would see nothing refused. `python tests/unprivileged.py CMD...`
drops those two capabilities from its bounding set and execs CMD: the child stays uid 0, so it
still owns (and can use) every file the tests made, but mode bits now apply to it as to any owner
(`chmod 000` stops it reading, `chmod 555` stops it writing). As another user it just execs CMD.
(A fresh process does this, not a `preexec_fn`: forking the multithreaded test process is unsafe.)
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


def drop_file_overrides() -> None:
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap}) failed: cannot drop root's file overrides")


def bound(cmd: list[str]) -> list[str]:
    """`cmd`, run so that file permissions bind it."""
    return [sys.executable, str(Path(__file__).resolve()), *cmd]


def run_python(code: str, **kw) -> subprocess.CompletedProcess:
    """`python -c code` bound by file permissions; stdout/stderr captured as text."""
    return subprocess.run(bound([sys.executable, "-c", code]), capture_output=True, text=True,
                          timeout=kw.pop("timeout", 300), **kw)


if __name__ == "__main__":
    drop_file_overrides()
    os.execv(sys.argv[1], sys.argv[1:])
