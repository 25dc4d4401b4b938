"""A tiny random transformers model of a supported family (Qwen2 by default) saved as a Hugging
Face directory, for tests.

    from tiny_hf import make_tiny_hf_model
    model_dir = make_tiny_hf_model(tmp_path, num_key_value_heads=1, tie_word_embeddings=True)
    model_dir = make_tiny_hf_model(tmp_path, **FAMILIES["gemma"])

Every weight is random and non-trivial: biases ~ N(0, 0.1) (HF initialises them to 0) and norm
weights HF's init (1; Gemma's 1 + w: 0) + N(0, 0.1), so a model that drops a bias or a norm weight
fails parity; MoE routers ~ N(0, 1), so that routing probabilities are far apart (no near-tie for
float32 rounding to flip).
Saved in float32 with eager attention (the exact reference). Not a pytest fixture: import it.
"""

from __future__ import annotations

from pathlib import Path

DEFAULTS = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                tie_word_embeddings=False, rope_theta=1e4, rms_norm_eps=1e-6, initializer_range=0.02)

# One tiny model per family beyond Qwen2, each with odd shapes and the family's options switched on:
# qwen3 head_dim 10 (q width 40 != hidden 48) with attention_bias (o_proj too); llama tied (3.2 style)
# with llama3 rope scaling whose band covers some of head_dim 16's wavelengths (6.3 ... 6283: scaled
# above 64, blended between 16 and 64) and mlp_bias; mistral with a sliding window of the test's
# row length 16 (so it never cuts); gemma tied, MQA (1 KV head), head_dim 16 (q width 64 != hidden 48).
FAMILIES = {
    "qwen3": dict(model_type="qwen3", hidden_size=48, intermediate_size=80, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=10, attention_bias=True, rope_theta=1e6),
    "llama": dict(model_type="llama", tie_word_embeddings=True, hidden_size=64, intermediate_size=96,
                  num_attention_heads=4, num_key_value_heads=1, mlp_bias=True, max_position_embeddings=128,
                  rope_parameters=dict(rope_type="llama3", rope_theta=1e4, factor=8.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=64)),
    "mistral": dict(model_type="mistral", hidden_size=48, intermediate_size=96, num_attention_heads=6,
                    num_key_value_heads=2, sliding_window=16, rope_theta=1e6),
    "gemma": dict(model_type="gemma", tie_word_embeddings=True, hidden_size=48, intermediate_size=96,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=16, rope_theta=1e4),
}

# Qwen3-MoE (tests/test_moe.py; not in FAMILIES, whose tests put LoRA on the MLP): 6 experts of width
# 20, top-2 renormalised, 3 layers all sparse, head_dim 8 (q width 32 != hidden 24), a router loss
# weight large enough to move the step.
MOE = dict(model_type="qwen3_moe", hidden_size=24, intermediate_size=40, moe_intermediate_size=20, num_experts=6,
           num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, head_dim=8, rope_theta=1e6, router_aux_loss_coef=0.1)
# Qwen2-MoE (Qwen1.5-MoE's family): the same experts, top-2 NOT renormalised, q/k/v biases, and a
# gated shared expert of width 28.
MOE2 = dict(MOE, model_type="qwen2_moe", norm_topk_prob=False, shared_expert_intermediate_size=28)


def hf_config(**kwargs):
    """transformers' config of `model_type` (default qwen2) with `kwargs`, eager attention."""
    import transformers

    kwargs = dict(kwargs)
    return transformers.AutoConfig.for_model(kwargs.pop("model_type", "qwen2"), **kwargs, attn_implementation="eager")


def make_tiny_hf_model(tmp_path, *, seed: int = 0, name: str = "tiny_qwen2", max_shard_size=None,
                       **overrides) -> Path:
    """Write `tmp_path/name` and return it.

    overrides: `model_type` (default qwen2) and any keyword of its transformers config (e.g.
    `rope_parameters={...}` for yarn, `head_dim=...`), replacing DEFAULTS. `max_shard_size` (e.g. "20KB") makes transformers write
    several shards plus `model.safetensors.index.json`. `seed` seeds torch.
    """
    import torch
    import transformers

    kwargs = {**DEFAULTS, **overrides}
    if "rope_parameters" in overrides:
        kwargs.pop("rope_theta")
    config = hf_config(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.normal_(0, 0.1)
            elif pname.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
            elif pname.endswith("mlp.gate.weight"):
                p.normal_(0, 1.0)
    path = Path(tmp_path) / name
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **save_kwargs)
    return path


def load_hf_model(model_dir):
    """transformers' float32 eager ForCausalLM of the directory's family (the reference), in eval mode."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager",
                                                             dtype=torch.float32).eval()
