"""The run's devices: the (dp, sp) mesh for the settings, and what the devices must support
(the attention backend, the heads' split over sp) — each refused in one sentence naming the key."""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from jaxsft import distributed, parallel
from jaxsft.errors import ConfigError
from jaxsft.model.attention import BACKENDS
from jaxsft.model.moe_parallel import check_layout
from jaxsft.model.ulysses import check_ulysses
from jaxsft.settings import check_devices


def mesh_for(settings) -> Mesh:
    """The run's mesh: dp = devices / sp, after the batch settings are checked against it."""
    dp, sp = check_devices(settings, jax.device_count())
    check_attention(settings.model.attn_implementation)
    mesh = parallel.make_mesh(dp, sp)
    distributed.check_process_rows(mesh)
    return mesh


_BACKEND_NEEDS = {"flash": "a CUDA GPU of compute capability 8.0 (sm80) or newer"}


def check_attention(implementation: str) -> None:
    """A backend named in model.attn_implementation must run on these devices; otherwise one
    ConfigError now, instead of a kernel failing (or crawling in interpret mode) at the first step."""
    backend = BACKENDS.get(implementation)  # unknown names were refused with the settings
    if backend is None or backend.available():
        return
    needs = _BACKEND_NEEDS.get(implementation, "other devices")
    raise ConfigError(f"model.attn_implementation={implementation} needs {needs}; this machine's devices are "
                      f"{jax.default_backend()} ({jax.devices()[0].device_kind}): use model.attn_implementation=auto "
                      f"(picks what runs here) or xla")


def check_heads(model_config, mesh: Mesh, expert_layout: str = "fsdp") -> None:
    """The model's heads must split over sp (Ulysses), and in the expert-parallel layout its experts
    over the devices; a ConfigError naming the key otherwise."""
    try:
        check_ulysses(model_config.num_attention_heads, model_config.num_key_value_heads, mesh.shape["sp"])
        if model_config.num_experts:
            check_layout(expert_layout, model_config.num_experts, mesh.shape["dp"] * mesh.shape["sp"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
