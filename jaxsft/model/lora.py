"""LoRA adapters on the decoder's linear layers (`model.lora_rank > 0`), computed as PEFT does.

A targeted linear layer with kernel W `[*, in, out]` gains `lora_a [*, in, r]` and `lora_b [*, r, out]`
(PEFT's `lora_A.weight` / `lora_B.weight` transposed), stored in float32 whatever
`model.param_dtype` is, and computes y = x·W + b + ((drop(x)·A)·B)·α/r in the compute dtype.
Initialisation as PEFT's default: A Kaiming-uniform with a = √5, i.e. U(−1/√in, 1/√in), and B = 0,
so before the first update the model computes the base model's values exactly. Dropout (PEFT's
`lora_dropout`, verl has none) draws its mask from a key the train step derives from
(trainer.seed, step, micro-batch), so a run is reproducible and resumes exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsft.settings import LoRASettings

# HF module names of Qwen2's decoder linear layers; PEFT's `all-linear` is all of them (not lm_head).
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"
ADAPTERS = ("lora_a", "lora_b")
# PEFT's `target_parameters` for the routed experts of qwen2_moe / qwen3_moe (transformers 5 holds
# them fused: gate_up_proj [E, 2I, H], down_proj [E, H, I]); jaxsft.model.moe applies them.
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def target_names(target_modules) -> tuple[str, ...]:
    """`model.target_modules` (all-linear, or module names, also comma-separated) → names in
    MODULES' order; ValueError naming what is not a Qwen2 linear layer."""
    names = [n.strip() for item in target_modules for n in str(item).split(",") if n.strip()]
    if names == [ALL_LINEAR]:
        return MODULES
    unknown = [n for n in names if n not in MODULES]
    if unknown or not names:
        raise ValueError(f"model.target_modules={list(target_modules)!r}: {unknown or 'nothing'} is not a Qwen2 decoder "
                         f"linear layer; use {ALL_LINEAR} or names from {', '.join(MODULES)}")
    return tuple(n for n in MODULES if n in names)


def target_parameters(values) -> tuple[str, ...]:
    """`model.target_parameters` → names in EXPERT_PARAMETERS' order; ValueError naming the others."""
    names = [n.strip() for item in values for n in str(item).split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERT_PARAMETERS]
    if unknown:
        raise ValueError(f"model.target_parameters={list(values)!r}: {unknown} is not a parameter jaxsft adapts; use "
                         f"names from {', '.join(EXPERT_PARAMETERS)} (a mixture-of-experts model's experts)")
    return tuple(n for n in EXPERT_PARAMETERS if n in names)


def initial_a(key, shape, dtype=jnp.float32):
    """PEFT's kaiming_uniform_(a=√5) on lora_A.weight [r, in]: U(−1/√in, 1/√in); `shape` is ours [*, in, r]."""
    bound = 1.0 / (shape[-2] ** 0.5)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def delta(x, a, b, settings: LoRASettings, key=None):
    """((drop(x)·A)·B)·α/r in x's dtype; dropout only when a key is given (training)."""
    if key is not None and settings.dropout > 0:
        keep = jax.random.bernoulli(key, 1.0 - settings.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - settings.dropout), jnp.zeros_like(x))
    return ((x @ a.astype(x.dtype)) @ b.astype(x.dtype)) * jnp.asarray(settings.scale, x.dtype)


def sub_key(key, i: int):
    return None if key is None else jax.random.fold_in(key, i)
