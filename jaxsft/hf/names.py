"""Hugging Face tensor names ↔ jaxsft parameter paths, the one place that knows them (every
supported family shares the Llama layout; a family adds or drops biases and q/k norms, qwen3_moe
has a router and experts in place of the MLP, qwen2_moe also a gated shared expert).

A linear weight is HF's `[out, in]` transposed to a `[in, out]` kernel; a per-layer tensor
`model.layers.{i}.…` is slice i of a stacked `[L, …]` parameter (in a MoE model with dense layers,
slice j of `layers` or `dense_layers`: `ModelConfig.layer_slots`), and an expert's
`model.layers.{i}.mlp.experts.{e}.…` slice [i, e] of an `[L, E, …]` one (the per-expert names the
Hub's Qwen3-MoE checkpoints use; transformers 5 fuses them when it loads). Loading reads
`name_map` HF → jaxsft, export reads it jaxsft → HF.
"""

from __future__ import annotations

from collections.abc import Iterator

from jaxsft.model.config import ModelConfig
from jaxsft.model.lora import EXPERT_PARAMETERS

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# (HF name, parameter path, transposed, present when). "{i}" marks a slice of a stacked per-layer
# parameter, "{e}" of its expert axis; the condition names the ModelConfig flag that gives a family
# the tensor (None: always; "dense" / "moe": MLP layers without / with experts).
_NAMES: tuple[tuple[str, tuple[str, ...], bool, str | None], ...] = (
    ("model.embed_tokens.weight", ("embed_tokens", "embedding"), False, None),
    ("model.layers.{i}.input_layernorm.weight", ("layers", "input_layernorm", "scale"), False, None),
    ("model.layers.{i}.self_attn.q_proj.weight", ("layers", "self_attn", "q_proj", "kernel"), True, None),
    ("model.layers.{i}.self_attn.q_proj.bias", ("layers", "self_attn", "q_proj", "bias"), False, "qkv_bias"),
    ("model.layers.{i}.self_attn.k_proj.weight", ("layers", "self_attn", "k_proj", "kernel"), True, None),
    ("model.layers.{i}.self_attn.k_proj.bias", ("layers", "self_attn", "k_proj", "bias"), False, "qkv_bias"),
    ("model.layers.{i}.self_attn.v_proj.weight", ("layers", "self_attn", "v_proj", "kernel"), True, None),
    ("model.layers.{i}.self_attn.v_proj.bias", ("layers", "self_attn", "v_proj", "bias"), False, "qkv_bias"),
    ("model.layers.{i}.self_attn.o_proj.weight", ("layers", "self_attn", "o_proj", "kernel"), True, None),
    ("model.layers.{i}.self_attn.o_proj.bias", ("layers", "self_attn", "o_proj", "bias"), False, "o_bias"),
    ("model.layers.{i}.self_attn.q_norm.weight", ("layers", "self_attn", "q_norm", "scale"), False, "qk_norm"),
    ("model.layers.{i}.self_attn.k_norm.weight", ("layers", "self_attn", "k_norm", "scale"), False, "qk_norm"),
    ("model.layers.{i}.post_attention_layernorm.weight", ("layers", "post_attention_layernorm", "scale"), False, None),
    ("model.layers.{i}.mlp.gate_proj.weight", ("layers", "mlp", "gate_proj", "kernel"), True, "dense"),
    ("model.layers.{i}.mlp.gate_proj.bias", ("layers", "mlp", "gate_proj", "bias"), False, "mlp_bias"),
    ("model.layers.{i}.mlp.up_proj.weight", ("layers", "mlp", "up_proj", "kernel"), True, "dense"),
    ("model.layers.{i}.mlp.up_proj.bias", ("layers", "mlp", "up_proj", "bias"), False, "mlp_bias"),
    ("model.layers.{i}.mlp.down_proj.weight", ("layers", "mlp", "down_proj", "kernel"), True, "dense"),
    ("model.layers.{i}.mlp.down_proj.bias", ("layers", "mlp", "down_proj", "bias"), False, "mlp_bias"),
    ("model.layers.{i}.mlp.gate.weight", ("layers", "mlp", "gate", "kernel"), True, "moe"),
    ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", ("layers", "mlp", "experts", "gate_proj"), True, "moe"),
    ("model.layers.{i}.mlp.experts.{e}.up_proj.weight", ("layers", "mlp", "experts", "up_proj"), True, "moe"),
    ("model.layers.{i}.mlp.experts.{e}.down_proj.weight", ("layers", "mlp", "experts", "down_proj"), True, "moe"),
    ("model.layers.{i}.mlp.shared_expert.gate_proj.weight", ("layers", "mlp", "shared_expert", "gate_proj", "kernel"),
     True, "shared_expert"),
    ("model.layers.{i}.mlp.shared_expert.up_proj.weight", ("layers", "mlp", "shared_expert", "up_proj", "kernel"),
     True, "shared_expert"),
    ("model.layers.{i}.mlp.shared_expert.down_proj.weight", ("layers", "mlp", "shared_expert", "down_proj", "kernel"),
     True, "shared_expert"),
    ("model.layers.{i}.mlp.shared_expert_gate.weight", ("layers", "mlp", "shared_expert_gate", "kernel"), True,
     "shared_expert"),
    ("model.norm.weight", ("norm", "scale"), False, None),
    ("lm_head.weight", ("lm_head", "kernel"), True, "untied"),
)


def name_map(config: ModelConfig) -> tuple[tuple[str, tuple[str, ...], bool], ...]:
    """(HF name, parameter path, transposed) of every tensor of `config`'s family and options:
    qwen2's q/k/v biases, qwen3's q_norm / k_norm, llama's attention_bias / mlp_bias, no lm_head
    when the embeddings are tied."""
    def present(when):
        special = {None: True, "untied": not config.tie_word_embeddings, "moe": config.num_experts > 0,
                   "dense": config.num_experts == 0 or bool(config.dense_layers),
                   "shared_expert": config.shared_expert_intermediate_size > 0}
        return special[when] if when in special else getattr(config, when)

    return tuple((name, path, transposed) for name, path, transposed, when in _NAMES if present(when))


def entries(config: ModelConfig) -> Iterator[tuple[str, tuple[str, ...], tuple[int, ...], bool]]:
    """(HF name, parameter path, index, transposed), parameter by parameter: the index of the
    tensor's slice in the stacked parameter, () for a whole one, (layer,) or (layer, expert);
    every slice of a parameter together, so an exporter needs only one in memory at a time."""
    slots = config.layer_slots()
    for name, path, transposed in name_map(config):
        if "{i}" not in name:
            yield name, path, (), transposed
            continue
        dense_mlp = path[1] == "mlp" and path[2] in ("gate_proj", "up_proj", "down_proj")
        for stack in STACKS:
            if stack == "dense_layers" and not config.dense_layers:
                continue
            if config.dense_layers and path[1] == "mlp" and (stack == "dense_layers") != dense_mlp:
                continue  # a dense layer has the dense MLP, a sparse one the router and experts
            for i, (where, j) in enumerate(slots):
                if where != stack:
                    continue
                if "{e}" in name:
                    for e in range(config.num_experts):
                        yield name.format(i=i, e=e), (stack, *path[1:]), (j, e), transposed
                else:
                    yield name.format(i=i), (stack, *path[1:]), (j,), transposed


def ignored(name: str, config: ModelConfig) -> bool:
    """Tensors a checkpoint may carry that are no weight: old rotary buffers, and the lm_head
    some tied checkpoints still save (transformers ignores both)."""
    return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_word_embeddings)


def hf_shape(param_shape, index: tuple[int, ...], transposed: bool) -> tuple[int, ...]:
    """The shape HF stores for (the slice `index` of) a parameter of `param_shape`."""
    shape = tuple(param_shape[len(index):])
    return shape[::-1] if transposed else shape


# PEFT's names for LoRA adapters: f"{PEFT_PREFIX}{HF module}.lora_A.weight" (and lora_B).
PEFT_PREFIX = "base_model.model."


def lora_modules(config: ModelConfig, targets) -> Iterator[tuple[str, tuple[str, ...], int]]:
    """(HF module name, parameter path of the module, layer index) of every LoRA-targeted linear
    layer, e.g. ("model.layers.3.self_attn.q_proj", ("layers", "self_attn", "q_proj"), 3)."""
    for name, path, index, _ in entries(config):
        if path[-1] == "kernel" and path[0] in STACKS and path[-2] in targets:
            yield name.removesuffix(".weight"), path[:-1], index[0]


# PEFT's LoRA on the fused expert weights (model.target_parameters): parameter → our adapter module
# and, for each of our per-expert weights, the adapter's output columns (gate_up: gate first).
EXPERT_ADAPTERS = {"mlp.experts.gate_up_proj": "gate_up", "mlp.experts.down_proj": "down"}
_EXPERT_MERGE = {"gate_proj": (EXPERT_PARAMETERS[0], 0), "up_proj": (EXPERT_PARAMETERS[0], 1),
                 "down_proj": (EXPERT_PARAMETERS[1], None)}
STACKS = ("layers", "dense_layers")  # the stacked layer modules (ModelConfig.layer_slots)


def expert_lora_modules(config: ModelConfig, parameters) -> Iterator[tuple[str, tuple[str, ...], int]]:
    """(PEFT module name, adapter path, layer) of every expert adapter. PEFT wraps the targeted
    parameters of one module in nested ParamWrappers, the first (gate_up_proj) innermost: with both
    adapted, gate_up's is `mlp.experts.base_layer`, down's `mlp.experts`."""
    sparse = [(i, j) for i, (stack, j) in enumerate(config.layer_slots()) if stack == "layers" and config.num_experts]
    for i, j in sparse:
        for parameter in parameters:
            nested = ".base_layer" if parameter == EXPERT_PARAMETERS[0] and len(parameters) > 1 else ""
            yield (f"model.layers.{i}.mlp.experts{nested}", ("layers", "mlp", "experts", EXPERT_ADAPTERS[parameter]), j)


def expert_merge(path: tuple[str, ...], lora) -> tuple[tuple[str, ...], int | None] | None:
    """For an expert weight's path: (its adapter's path, which half of the adapter's output: 0 / 1,
    None for all), or None when no adapter targets it."""
    if lora is None or path[:3] != ("layers", "mlp", "experts") or path[-1] not in _EXPERT_MERGE:
        return None
    parameter, half = _EXPERT_MERGE[path[-1]]
    return ((*path[:-1], EXPERT_ADAPTERS[parameter]), half) if parameter in lora.parameters else None


def lora_kernel(path: tuple[str, ...], lora) -> bool:
    """Whether the parameter at `path` is a kernel that carries LoRA adapters."""
    return (lora is not None and path[0] in STACKS and path[-1] == "kernel"
            and path[-2] in lora.targets)
