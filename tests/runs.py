"""Training launches that cost less: `python -m jaxsft.train` in this process, and the reference
runs every end-to-end file shares (made once per session, tests/conftest.py).

In-process launches go through `jaxsft.train.main(argv, hooks)`, the function the command runs, so
they take the same path from the command line to the exit code; what only a real process shows
(a signal from outside, kill -9, several processes, the exit status itself) stays with
tests/e2e.py's subprocesses. A launch here computes as such a process does (JAX's default matmul
precision, not conftest.py's), and the process-wide state it changes (JAX's compilation-cache
configuration, the SIGINT/SIGTERM handlers, the working directory, the environment, the run
directory's lock when a launch stops on an error) is put back afterwards, so later tests see none
of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import signal
from pathlib import Path

import jax
from absl import logging as absl_logging
from e2e import train_args

# This process has the 8 devices tests/conftest.py made: the smoke recipe's 16 rows per step give
# each of them 2, so its micro-batch of 4 is lowered to 2 (a test's own setting, later, wins).
EIGHT_DEVICES = ("--config.data.micro_batch_size_per_gpu=2",)

# 24 chats, 8 per step → 3 steps per epoch, 2 epochs: 6 steps, saving at 3 and 6 (with the HF
# export, in 100 KB shards so that it has an index). The unbroken run of tests/test_resume.py,
# tests/test_export_e2e.py and tests/test_model_dir.py (the `reference` fixture of conftest.py).
FAST = ("--config.data.max_length=256", "--config.data.train_batch_size=8", "--config.data.micro_batch_size_per_gpu=1",
        "--config.data.packing=none", "--config.data.train_max_samples=24", "--config.data.val_files=None",
        "--config.trainer.total_epochs=2", "--config.trainer.test_freq=-1")
REFERENCE = (*FAST, "--config.trainer.save_freq=3", "--config.trainer.checkpoint.max_shard_size=100KB")
REFERENCE_STEPS = 6


@dataclasses.dataclass
class Launch:
    """What a finished launch said: subprocess.CompletedProcess's fields the tests read."""
    returncode: int
    stdout: str
    stderr: str


def main(argv: list[str], hooks=(), cwd: Path | None = None) -> Launch:
    """`python -m jaxsft.train ARGV` run by jaxsft.train.main in this process, its output captured.
    An unexpected exception (exit 1 in a process) propagates."""
    from jaxsft import train

    out, err = io.StringIO(), io.StringIO()
    with _restored(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        if cwd is not None:
            os.chdir(cwd)
        code = train.main(list(argv), hooks=hooks)
    return Launch(code, out.getvalue(), err.getvalue())


def train(run_dir: Path, base_model: Path, *overrides: str, hooks=(), check: bool = True) -> Launch:
    """e2e.run_train's launch (the smoke recipe on `base_model`, `overrides` last) in this process;
    with `check`, a non-zero exit fails the test with the output."""
    launch = main([*train_args(run_dir, base_model, *EIGHT_DEVICES, *overrides)[3:]], hooks)  # argv after `-m jaxsft.train`
    if check and launch.returncode != 0:
        raise AssertionError(f"train returned {launch.returncode}\n--- stdout\n{launch.stdout[-4000:]}\n"
                             f"--- stderr\n{launch.stderr[-6000:]}")
    return launch


_OPTIONS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes", "jax_platforms", "jax_default_matmul_precision")


@contextlib.contextmanager
def _restored():
    from jax.experimental.compilation_cache import compilation_cache

    options = {name: getattr(jax.config, name) for name in _OPTIONS}
    # A launch computes as `python -m jaxsft.train` does, not under conftest.py's matmul precision:
    # its numbers compare with those of the launches in a process of their own.
    jax.config.update("jax_default_matmul_precision", None)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    cwd, environ, verbosity = os.getcwd(), dict(os.environ), absl_logging.get_verbosity()
    locks = _run_locks()
    try:
        yield
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for name, value in options.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()  # JAX decides again, at the next compilation, whether it caches
        absl_logging.set_verbosity(verbosity)
        # A launch that stops on an error keeps its run directory's lock open (a process would exit
        # and drop it): close what it opened, so that a later launch on the directory may run.
        for fd in _run_locks().items() - locks.items():
            os.close(fd[0])


def _run_locks() -> dict[int, str]:
    """This process's open file descriptors on run-directory locks (RUN/.jaxsft.lock): fd → path."""
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.endswith("/.jaxsft.lock"):
            found[int(fd)] = target
    return found
