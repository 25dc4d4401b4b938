"""JAX's persistent compilation cache as the Trainer sets it (issue 14): every executable is
written (also a tiny one), entries appear whole or not at all, the setting turns it off, and a
directory that cannot be used is refused naming the key. A second launch reading the cache
through the command line: tests/test_data_mixture.py (the resume after SIGKILL)."""

import pathlib

import jax
import jax.numpy as jnp
import pytest
from jax._src import lru_cache
from jax.experimental.compilation_cache import compilation_cache as cc

from jaxsft import compile_cache
from jaxsft.config import ConfigError


@pytest.fixture
def cache_dir(tmp_path):
    session = jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else None
    yield tmp_path / "compile_cache"
    compile_cache.enable(session, say=lambda *a: None)  # later tests use the session's cache again (conftest.py)
    if session is None:
        jax.config.update("jax_compilation_cache_dir", None)
        cc.reset_cache()


def entries(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith("-cache"))


@pytest.mark.slow  # over ~3 s on 2 cores: CI's full run, not the ≤ 3-minute inner loop
def test_a_tiny_step_is_cached_and_read_back(cache_dir, caplog):
    compile_cache.enable(str(cache_dir), say=lambda *a: None)

    def f(x):
        return jnp.sin(x) * 3.0 + 1.0

    jax.jit(f)(jnp.arange(7.0)).block_until_ready()
    (entry,) = [e for e in entries(cache_dir) if e.startswith("jit_f-")]
    assert not [p for p in cache_dir.iterdir() if p.name.endswith(".tmp")]
    # A fresh jit of the same program (as a second launch compiles it) reads the entry.
    jax.clear_caches()
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        jax.jit(f)(jnp.arange(7.0)).block_until_ready()
    assert "Persistent compilation cache hit for 'jit_f'" in caplog.text
    assert [e for e in entries(cache_dir) if e.startswith("jit_f-")] == [entry]


def test_an_entry_is_written_whole_or_not_at_all(cache_dir, monkeypatch):
    """A write that dies half-way (the process killed, the disk full) leaves no entry under the
    entry's name, so no later launch reads a torn executable (JAX 0.10 alone would leave one)."""
    compile_cache.enable(str(cache_dir), say=lambda *a: None)
    cache = lru_cache.LRUCache(str(cache_dir), max_size=-1)
    real = pathlib.Path.write_bytes

    def dies_half_way(self, data):
        real(self, data[:len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", dies_half_way)
    with pytest.raises(OSError):
        cache.put("somekey", b"x" * 1000)
    monkeypatch.setattr(pathlib.Path, "write_bytes", real)
    assert list(cache_dir.iterdir()) == [] and cache.get("somekey") is None
    cache.put("somekey", b"y" * 1000)
    assert cache.get("somekey") == b"y" * 1000


def test_off_means_off(cache_dir):
    """trainer.compile_cache=false, also over a directory set through JAX's own configuration."""
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    compile_cache.enable(None)
    assert jax.config.jax_enable_compilation_cache is False
    jax.jit(lambda x: x * 5.0 - 2.0)(jnp.arange(3.0)).block_until_ready()
    assert not cache_dir.exists() or entries(cache_dir) == []


def test_an_unusable_directory_is_refused_naming_the_key(tmp_path, cache_dir):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=rf"^trainer.compile_cache_dir='{blocker}/cc' cannot be created \(Not a "
                                          rf"directory\); give another directory or set trainer.compile_cache=false$"):
        compile_cache.enable(str(blocker / "cc"))


@pytest.mark.slow  # two trainer processes (one compiles): CI, not the inner loop
def test_a_relaunched_qwen3_runs_its_cached_step(tmp_path):
    """The fault soak's hang (docs/HOSTILE.md): a tiny Qwen3 (untied LM head) relaunched on 8 CPU
    devices read its train step back from the cache, and XLA:CPU's concurrency-optimized scheduler
    let the devices reach two collectives in different orders: a deadlock, aborted by XLA after
    40 s (exit -6), on every relaunch. jaxsft now turns that scheduler off itself
    (jaxsft.xla_flags): the processes here get XLA_FLAGS without it, and the second launch must
    read the cached step and train."""
    import pyarrow.parquet as pq
    from e2e import CPU_TEST_FLAGS, run_train
    from tiny_hf import FAMILIES, make_tiny_hf_model

    from jaxsft import bundled, hf, xla_flags

    tok = hf.open_tokenizer(bundled.path("tokenizer"))
    model = make_tiny_hf_model(tmp_path, seed=2, name="qwen3", **dict(FAMILIES["qwen3"], vocab_size=len(tok),
                                                                       max_position_embeddings=512))
    tok.save_pretrained(model)
    rows = pq.read_table(bundled.path("humaneval_chat", "train.parquet"))
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(rows.slice(0, 24), a)
    pq.write_table(rows.slice(24, 16), b)
    flags = f"--xla_force_host_platform_device_count=8 {CPU_TEST_FLAGS}"
    assert xla_flags.CPU_SCHEDULER_OFF not in flags
    args = (f"--config.trainer.compile_cache_dir={tmp_path / 'cache'}", f"--config.data.train_files=['{a}','{b}']",
            "--config.data.train_weights=[3,1]", "--config.data.max_length=256", "--config.data.train_batch_size=8",
            "--config.data.micro_batch_size_per_gpu=1", "--config.data.packing=first_fit", "--config.data.val_files=None",
            "--config.trainer.total_training_steps=1", "--config.trainer.test_freq=-1")
    run_train(tmp_path / "first", model, *args, XLA_FLAGS=flags)
    again = run_train(tmp_path / "again", model, *args, XLA_FLAGS=flags, timeout=180)
    assert "reading the train step from the compilation cache" in again.stdout and "done at step 1" in again.stdout
