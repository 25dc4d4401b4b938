"""Build a tiny random Qwen2 as a Hugging Face directory (for the smoke recipe and the benchmark).

The directory is written by the same code as an export (`jaxsft.hf`: `model.safetensors`, then
config.json, generation_config.json and the tokenizer saved by transformers), so the smoke run
exercises the real HF loading path. Weights follow HF's init (normal, std = initializer_range; norms 1;
biases small random) from a fixed numpy seed, so no torch is needed at run time.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxsft import hf


def tiny_qwen2_config(vocab_size: int, *, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, rope_theta=1e6, **token_ids):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                       num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
                       tie_word_embeddings=tie_word_embeddings, rope_theta=rope_theta, rms_norm_eps=1e-6,
                       initializer_range=0.02, **token_ids)


def random_hf_tensors(config, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named float32 tensors for `config` (a transformers Qwen2Config)."""
    rng = np.random.default_rng(seed)
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    d = h // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    std = config.initializer_range

    def normal(*shape):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    t = {"model.embed_tokens.weight": normal(v, h), "model.norm.weight": np.ones(h, np.float32)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        t.update({
            p + "self_attn.q_proj.weight": normal(q, h), p + "self_attn.q_proj.bias": normal(q),
            p + "self_attn.k_proj.weight": normal(kv, h), p + "self_attn.k_proj.bias": normal(kv),
            p + "self_attn.v_proj.weight": normal(kv, h), p + "self_attn.v_proj.bias": normal(kv),
            p + "self_attn.o_proj.weight": normal(h, q),
            p + "mlp.gate_proj.weight": normal(i, h), p + "mlp.up_proj.weight": normal(i, h),
            p + "mlp.down_proj.weight": normal(h, i),
            p + "input_layernorm.weight": np.ones(h, np.float32),
            p + "post_attention_layernorm.weight": np.ones(h, np.float32),
        })
    if not config.tie_word_embeddings:
        t["lm_head.weight"] = normal(v, h)
    return t


def ensure_tiny_model(model_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, seed: int = 0,
                      **shape) -> Path:
    """Write a tiny random Qwen2 HF directory at `model_dir` unless one is already there."""
    from transformers import GenerationConfig

    model_dir = Path(model_dir)
    if (model_dir / "config.json").exists():
        return model_dir
    tok = hf.open_tokenizer(tokenizer_dir)
    vocab = ((len(tok) + 63) // 64) * 64  # padded like Qwen's embedding tables
    ids = dict(bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = tiny_qwen2_config(vocab, **shape, **ids)
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    hf.write_weights(random_hf_tensors(config, seed).items(), tmp, dtype="float32")
    generation = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    hf.BaseModelFiles(config, generation, tok).write(tmp, dtype="float32")
    os.replace(tmp, model_dir)  # atomic: a half-written model directory is never used
    return model_dir
