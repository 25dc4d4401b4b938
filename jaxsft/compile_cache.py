"""JAX's persistent compilation cache for the run's train and eval steps (`trainer.compile_cache`,
`trainer.compile_cache_dir`, default RUN_DIR/compile_cache).

A launch or resume on the same program (model shape, mesh, batch shape, dtypes, XLA flags, jax
version) reads the compiled executables back instead of compiling them. The thresholds are set so
that every executable is written, also the small ones of tests and the smoke model (JAX's defaults
skip those compiling in under a second).

Across processes: within a job only process 0 writes (JAX's rule; the others, on any host, read),
and an entry is written to a temporary file and renamed into place (`_atomic_entries`), so a
reader never sees a partial entry and a process killed while writing leaves none. JAX 0.10 writes
entries in place; a torn entry then fails to read at every later launch (a warning and a full
compile each time) and is never replaced. An entry that cannot be read is recompiled by JAX.
"""

from __future__ import annotations

import os
import pathlib

import jax

from jaxsft import distributed
from jaxsft.errors import ConfigError


def enable(directory: str | None, say=print) -> None:
    """Point JAX's compilation cache at `directory` (None: turn it off) before anything compiles."""
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()  # JAX decides once, at the first compilation, whether it caches
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    directory = os.path.abspath(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"trainer.compile_cache_dir={directory!r} cannot be created ({e.strerror or e}); give another "
                          f"directory or set trainer.compile_cache=false") from None
    if distributed.is_primary() and not os.access(directory, os.W_OK):
        raise ConfigError(f"trainer.compile_cache_dir={directory!r} is not writable; give another directory or set "
                          f"trainer.compile_cache=false")
    _atomic_entries()
    jax.config.update("jax_enable_compilation_cache", True)
    compilation_cache.set_cache_dir(directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    say(f"[jaxsft] compiled steps are cached in {directory} (trainer.compile_cache_dir)")


def compile_line(directory: str | None) -> str:
    """What is said before the first train step: compiling it, or reading it from the cache."""
    if directory is None:
        return "[jaxsft] compiling the train step (trainer.compile_cache=false: every launch compiles it)"
    if not os.path.isdir(directory) or not os.listdir(directory):
        return "[jaxsft] compiling the train step (first launch; later launches use the cache)"
    return ("[jaxsft] reading the train step from the compilation cache (compiling it if this program is not "
            "there yet)")


def _atomic_entries() -> None:
    """Make JAX's file cache write each entry to a temporary file and rename it into place (see the
    module docstring). Only the no-eviction cache (JAX's default, `jax_compilation_cache_max_size`
    = -1) is changed; with eviction JAX holds its own file lock around the write."""
    from jax._src import lru_cache

    cls = lru_cache.LRUCache
    if getattr(cls, "_jaxsft_atomic", False):
        return
    original = cls.put

    def put(self, key: str, value: bytes) -> None:
        if self.eviction_enabled or not key or "://" in str(self.path):  # gs:// and the like: JAX's own write
            return original(self, key, value)
        folder = pathlib.Path(str(self.path))
        path = folder / f"{key}{lru_cache._CACHE_SUFFIX}"
        if path.exists():
            return
        tmp = folder / f".{key}.{os.getpid()}.tmp"
        try:
            tmp.write_bytes(value)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    cls.put, cls._jaxsft_atomic = put, True
