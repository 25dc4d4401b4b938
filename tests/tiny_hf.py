"""A tiny random transformers Qwen2 saved as a Hugging Face directory, for tests.

    from tiny_hf import make_tiny_hf_model
    model_dir = make_tiny_hf_model(tmp_path, num_key_value_heads=1, tie_word_embeddings=True)

Every weight is random and non-trivial: q/k/v biases ~ N(0, 0.1) (HF initialises them to 0) and
norm weights 1 + N(0, 0.1) (HF: 1), so a model that drops a bias or a norm weight fails parity.
Saved in float32 with eager attention (the exact reference). Not a pytest fixture: import it.
"""

from __future__ import annotations

from pathlib import Path

DEFAULTS = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                tie_word_embeddings=False, rope_theta=1e4, rms_norm_eps=1e-6, initializer_range=0.02)


def make_tiny_hf_model(tmp_path, *, seed: int = 0, name: str = "tiny_qwen2", max_shard_size=None,
                       **overrides) -> Path:
    """Write `tmp_path/name` and return it.

    overrides: any transformers `Qwen2Config` keyword (e.g. `rope_parameters={...}` for yarn,
    `head_dim=...`), replacing DEFAULTS. `max_shard_size` (e.g. "20KB") makes transformers write
    several shards plus `model.safetensors.index.json`. `seed` seeds torch.
    """
    import torch
    import transformers

    kwargs = {**DEFAULTS, **overrides}
    if "rope_parameters" in overrides:
        kwargs.pop("rope_theta")
    config = transformers.Qwen2Config(**kwargs, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).float()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.normal_(0, 0.1)
            elif pname.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    path = Path(tmp_path) / name
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **save_kwargs)
    return path


def load_hf_model(model_dir):
    """transformers' float32 eager Qwen2ForCausalLM from `model_dir` (the reference), in eval mode."""
    import torch
    import transformers

    return transformers.Qwen2ForCausalLM.from_pretrained(model_dir, attn_implementation="eager",
                                                         dtype=torch.float32).eval()
