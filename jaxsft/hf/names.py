"""Hugging Face Qwen2 tensor names ↔ jaxsft parameter paths, the one place that knows them.

A linear weight is HF's `[out, in]` transposed to a `[in, out]` kernel; a per-layer tensor
`model.layers.{i}.…` is slice i of a stacked `[L, …]` parameter. Loading reads `NAME_MAP`
HF → jaxsft, export reads it jaxsft → HF.
"""

from __future__ import annotations

from collections.abc import Iterator

from jaxsft.model.config import Qwen2Config

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# (HF name, parameter path, transposed). "{i}" marks a slice of a stacked per-layer parameter.
NAME_MAP: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("model.embed_tokens.weight", ("embed_tokens", "embedding"), False),
    ("model.layers.{i}.input_layernorm.weight", ("layers", "input_layernorm", "scale"), False),
    ("model.layers.{i}.self_attn.q_proj.weight", ("layers", "self_attn", "q_proj", "kernel"), True),
    ("model.layers.{i}.self_attn.q_proj.bias", ("layers", "self_attn", "q_proj", "bias"), False),
    ("model.layers.{i}.self_attn.k_proj.weight", ("layers", "self_attn", "k_proj", "kernel"), True),
    ("model.layers.{i}.self_attn.k_proj.bias", ("layers", "self_attn", "k_proj", "bias"), False),
    ("model.layers.{i}.self_attn.v_proj.weight", ("layers", "self_attn", "v_proj", "kernel"), True),
    ("model.layers.{i}.self_attn.v_proj.bias", ("layers", "self_attn", "v_proj", "bias"), False),
    ("model.layers.{i}.self_attn.o_proj.weight", ("layers", "self_attn", "o_proj", "kernel"), True),
    ("model.layers.{i}.post_attention_layernorm.weight", ("layers", "post_attention_layernorm", "scale"), False),
    ("model.layers.{i}.mlp.gate_proj.weight", ("layers", "mlp", "gate_proj", "kernel"), True),
    ("model.layers.{i}.mlp.up_proj.weight", ("layers", "mlp", "up_proj", "kernel"), True),
    ("model.layers.{i}.mlp.down_proj.weight", ("layers", "mlp", "down_proj", "kernel"), True),
    ("model.norm.weight", ("norm", "scale"), False),
    ("lm_head.weight", ("lm_head", "kernel"), True),  # absent when tied
)


def entries(config: Qwen2Config) -> Iterator[tuple[str, tuple[str, ...], int | None, bool]]:
    """(HF name, parameter path, layer index or None, transposed), parameter by parameter: every
    layer of a stacked parameter together, so an exporter needs only one in memory at a time.
    No LM head when the embeddings are tied."""
    for name, path, transposed in NAME_MAP:
        if "{i}" in name:
            for i in range(config.num_hidden_layers):
                yield name.format(i=i), path, i, transposed
        elif not (path[0] == "lm_head" and config.tie_word_embeddings):
            yield name, path, None, transposed


def ignored(name: str, config: Qwen2Config) -> bool:
    """Tensors a checkpoint may carry that are no weight: old rotary buffers, and the lm_head
    some tied checkpoints still save (transformers ignores both)."""
    return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_word_embeddings)


def hf_shape(param_shape, layer: int | None, transposed: bool) -> tuple[int, ...]:
    """The shape HF stores for (a layer slice of) a parameter of `param_shape`."""
    shape = tuple(param_shape[1:] if layer is not None else param_shape)
    return shape[::-1] if transposed else shape
