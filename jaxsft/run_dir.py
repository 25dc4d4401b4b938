"""The run directory (`trainer.default_local_dir`): checked, locked and described before any heavy work.

- It must be a directory this process can write (created if missing); otherwise one sentence.
- One run at a time: process 0 holds an exclusive `fcntl.flock` on `RUN/.jaxsft.lock` for the
  whole run. The kernel drops it when the process ends, however it ends (kill -9 included), so a
  stale lock cannot block the next launch. A second run on the same directory is refused with the
  holder's pid, host and start time. (On a filesystem shared by several hosts only process 0 takes
  it; flock over NFS depends on the server's lock support.)
- `RUN/config.yaml`: the effective configuration of this launch, written at start (other tools
  read this exact name).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

import yaml

from jaxsft.errors import ConfigError

LOCK_FILE = ".jaxsft.lock"
CONFIG_FILE = "config.yaml"


class RunDirectory:
    def __init__(self, path: str | os.PathLike, *, primary: bool = True):
        self.path = Path(path)
        self._lock = None
        self._check(primary)
        if primary:
            self._take_lock()

    def _check(self, primary: bool) -> None:
        key = f"trainer.default_local_dir={str(self.path)!r}"
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{key} is a file, not a directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{key} cannot be created ({e.strerror or e})") from None
        if primary:
            probe = self.path / f".jaxsft-write-test-{os.getpid()}"
            try:
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                raise ConfigError(f"{key} is not writable ({e.strerror or e})") from None

    def _take_lock(self) -> None:
        path = self.path / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ConfigError(f"trainer.default_local_dir={str(self.path)!r} is in use by another run ({holder}); "
                              f"wait for it to finish or give this run another directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": dt.datetime.now().isoformat(timespec="seconds"),
                                 "command": " ".join(sys.argv)}).encode())
        os.fsync(fd)
        self._lock = fd

    def announce(self, settings, mesh, say) -> None:
        """Write config.yaml (process 0) and say what this launch is: its notes, devices and mesh."""
        import jax

        self.record_config(settings.config)
        for note in settings.notes:
            say(f"[jaxsft] note: {note}")
        say(f"[jaxsft] {jax.device_count()} device(s) ({jax.devices()[0].device_kind}), {jax.process_count()} "
            f"process(es), mesh dp={mesh.shape['dp']} sp={mesh.shape['sp']}; run directory {self.path}")

    def record_config(self, config: dict) -> None:
        """config.yaml as the configuration that runs (process 0: the one holding the lock)."""
        if self._lock is not None:
            self.write_config(config)

    def write_config(self, config: dict) -> Path:
        path = self.path / CONFIG_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"
    except (OSError, ValueError):
        return "holder unknown"
