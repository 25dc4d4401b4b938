"""GPU plans of the training modes (jaxsft.plan with LoRA, model.trainable, optimizer offload): the
abstract state holds moments for the trainable part only, a LoRA plan is compiled from the run's
settings, and optimizer offload is planned by XLA:GPU with its host memory (lowered on CPU devices,
which have pinned_host, and compiled for the compile-only CUDA devices, which have none).

Needs the test extra's CUDA plugin and ptxas, as tests/test_plan.py.
"""

from __future__ import annotations

import math
import types

import jax
import pytest
from cfg import settings
from test_plan import TINY

from jaxsft import offload, optim, parallel, plan, step
from jaxsft.model.config import ModelConfig
from jaxsft.model.lora import ADAPTERS, LoRASettings
from jaxsft.model.decoder import ModelSettings

CONFIG = ModelConfig.from_hf_dict(TINY)
LORA = LoRASettings(rank=4, alpha=8.0, targets=("q_proj", "down_proj"))


def _moments(state):
    return [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim]


def _shard_bytes(x) -> int:
    return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


def test_abstract_state_has_moments_for_the_trainable_part_only():
    """LoRA: mu and nu of each adapter, with the adapter's sharding; new-token rows: [n, H]
    moments; offload on the CPU (which has pinned_host): the moments' shardings say host memory."""
    mesh = parallel.make_mesh(4, 2)
    tx, _ = optim.make_optimizer(settings().optim, 10, "float32")
    lora_mode = plan.Mode(types.SimpleNamespace(lora=LORA, trainable=("all",)))
    _, _, state, _ = plan.abstract_train_state(CONFIG, ModelSettings(lora=LORA), mesh, tx, lora_mode)
    adapters = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]
                if any(str(k) == f"['{a}']" or getattr(k, "key", None) == a for k in p for a in ADAPTERS)]
    assert len(adapters) == 2 * len(LORA.targets)
    moments = _moments(state)
    assert len(moments) == 2 * len(adapters)
    assert sorted(m.shape for m in moments) == sorted([x.shape for _, x in adapters] * 2)
    assert {m.sharding for m in moments} <= {x.sharding for _, x in adapters}

    rows = plan.Mode(types.SimpleNamespace(lora=None, trainable=("new_token_embeddings",)), new_token_ids=(510, 511))
    _, _, state, _ = plan.abstract_train_state(CONFIG, ModelSettings(), mesh, tx, rows)
    assert [m.shape for m in _moments(state)] == [(2, CONFIG.hidden_size)] * 2  # tied: embed_tokens rows only

    said = []
    full_offload = plan.Mode(optimizer_offload=True)
    _, _, state, shardings = plan.abstract_train_state(CONFIG, ModelSettings(), mesh, tx, full_offload, say=said.append)
    assert {m.sharding.memory_kind for m in _moments(state)} == {offload.HOST} and said
    assert all(s.memory_kind != offload.HOST for s in jax.tree.leaves(shardings["params"]))


@pytest.mark.slow  # an XLA:GPU compile or a sweep over every variant: CI, not the inner loop
def test_h100_plans_of_lora_and_offload():
    """From the run's settings on a deviceless h100:2: a LoRA plan's optimizer state is exactly its
    adapters' moments (float32), far below full fine-tuning's; with optimizer_offload every moment
    is planned in host memory and the device peak drops by about all of them."""
    target = plan.get_target("h100:2")
    keys = {"data.max_length": 128, "data.train_batch_size": 4, "data.micro_batch_size_per_gpu": 1,
            "model.remat_policy": "full", "model.attn_implementation": "xla"}
    mesh = parallel.make_mesh(2, 1, list(target.devices))

    def planned(extra):  # 8 samples, 4 per step: 2 steps of 2 padded rows per rank
        return plan.plan_settings(settings({**keys, **extra}), target, CONFIG, mesh, samples_per_rank=2,
                                  rows_per_rank=2, total_steps=2).plan

    lora = planned({"model.lora_rank": 4, "model.lora_alpha": 8, "model.target_modules": ["q_proj", "down_proj"]})
    assert lora.cuda_binaries and lora.fits and lora.host_peak_bytes == 0 and lora.trained.startswith("LoRA adapters (rank 4)")
    h, i, n = CONFIG.hidden_size, CONFIG.intermediate_size, CONFIG.num_hidden_layers
    q_out = CONFIG.num_attention_heads * (h // CONFIG.num_attention_heads)
    adapter_values = n * 4 * ((h + q_out) + (i + h))  # rank 4: A [in, r] + B [r, out], per layer
    assert 0 < lora.opt_state_bytes <= 2 * 4 * adapter_values  # mu, nu in float32; sharded over 2 devices
    assert lora.opt_state_bytes >= 2 * 4 * adapter_values / 2

    # full fine-tuning with offload: XLA:GPU plans the moments in host memory and the streamed update
    full = planned({})
    off = planned({"model.fsdp_config.optimizer_offload": True})
    assert off.trained == "every parameter" and lora.opt_state_bytes < off.opt_state_bytes / 10
    assert 0 <= off.opt_state_bytes - off.host_argument_bytes < 64  # every moment on the host; Adam's count, lr not
    assert off.host_temp_bytes == 0 and off.host_peak_bytes == off.host_argument_bytes  # updated in place
    assert off.argument_bytes == pytest.approx(full.argument_bytes - off.host_argument_bytes, abs=64)  # bytes: Adam's count and lr stay
    # the update streams the moments through the device a layer at a time: the device peak drops by
    # nearly all of them (94 % at this shape; all at once on the device would save nothing at the update)
    assert off.per_device_peak_bytes < full.per_device_peak_bytes - 0.85 * off.host_argument_bytes
    assert off.cuda_binaries and off.fits and full.host_peak_bytes == 0
    assert any("host memory (pinned_host) per device" in line for line in off.describe())


@pytest.mark.slow  # an XLA:GPU compile or a sweep over every variant: CI, not the inner loop
def test_lowering_on_cpu_devices_compiles_the_same_gpu_program():
    """The route an offload plan takes (lowered for CUDA on CPU devices, compiled by the
    compile-only CUDA client) gives the plain full fine-tuning step exactly the memory plan of the
    usual deviceless compile: the route changes where host memory can be named, nothing else."""
    target = plan.get_target("h100:2")
    mesh = parallel.make_mesh(2, 1, list(target.devices))
    tx, schedule = optim.make_optimizer(settings().optim, 10, "float32")
    ms = ModelSettings(param_dtype="bfloat16", compute_dtype="bfloat16", remat_policy="full", attn_implementation="xla")
    cfg = step.StepConfig("global_tokens", False, 2, 64)

    def analysis(lower_on_cpu):
        compiled, _, _ = plan.compile_train_step(CONFIG, ms, mesh, [2, 2, 128], tx, schedule, cfg,
                                                 lower_on_cpu=lower_on_cpu)
        ma = compiled.memory_analysis()
        return [ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.alias_size_in_bytes, ma.temp_size_in_bytes]

    assert analysis(True) == analysis(False)
