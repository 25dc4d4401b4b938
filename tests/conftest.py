"""Test set-up: 8 emulated CPU devices, set before anything imports jax."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def base_model(tmp_path_factory):
    """A tiny random Qwen2 HF directory built from the bundled tokenizer, shared by the end-to-end
    tests (made once here, so the processes of a multi-process job never race to create it)."""
    from jaxsft import bundled, tiny

    return tiny.ensure_tiny_model(tmp_path_factory.mktemp("base") / "model", bundled.path("tokenizer"))
