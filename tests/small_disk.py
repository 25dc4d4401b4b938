"""A small real filesystem for tests of a full disk: a tmpfs mounted in a private mount namespace
(`unshare -m` as root, a user namespace `unshare -rm` otherwise), so it vanishes with the command
and nothing outside sees it."""

from __future__ import annotations

import os
import subprocess


def command(shell: str) -> list[str]:
    """`sh -c shell` in its own mount namespace; `shell` mounts what it needs (`mount -t tmpfs -o size=...`)."""
    return ["unshare", "-m" if os.geteuid() == 0 else "-rm", "sh", "-c", shell]


def unavailable(path) -> str | None:
    """None when a tmpfs can be mounted at `path` here, else why not."""
    try:
        probe = subprocess.run(command(f"mount -t tmpfs -o size=1m tmpfs '{path}' && echo ok"), capture_output=True,
                               text=True, timeout=60)
    except FileNotFoundError as e:
        return str(e)
    return None if probe.stdout.strip() == "ok" else (probe.stderr.strip() or f"exit {probe.returncode}")
