"""The decoder's hyper-parameters, read from a Hugging Face `config.json`, for the families
jaxsft computes exactly like transformers: qwen2, qwen3, qwen2_moe, qwen3_moe, llama, mistral and
gemma (Gemma 1).

Only what changes the computation is kept. The families differ in a few pieces (`FAMILIES`): which
projections carry a bias, a per-head RMSNorm on q and k (qwen3), the MLP activation, RMSNorm's
weight as `1 + w` and embeddings scaled by sqrt(hidden) (gemma), routed-expert MLPs (qwen2_moe and
qwen3_moe, jaxsft.model.moe; qwen2_moe adds a gated shared expert), and the defaults transformers fills in for keys a config.json leaves out.
Anything jaxsft would compute differently (another model_type, sliding-window layers, a rope type
other than default / yarn / llama3, another activation) is refused with a sentence instead of
silently training a different model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jaxsft.errors import UserError

SUPPORTED_ROPE_TYPES = ("default", "yarn", "llama3")


class UnsupportedConfigError(UserError):
    """config.json describes a model jaxsft does not compute exactly like transformers."""


@dataclasses.dataclass(frozen=True)
class Family:
    """How one model_type differs from the common pre-norm decoder (transformers' modeling_<type>.py)."""
    qkv_bias: bool | None  # True/False fixed (qwen2: q/k/v always); None: config.json's attention_bias
    qk_norm: bool = False  # qwen3: RMSNorm over head_dim on q and k, before RoPE
    activations: tuple[str, ...] = ("silu",)  # hidden_act values accepted, all computing the first
    unit_offset_norm: bool = False  # gemma: x̂·(1 + w) in float32, then cast
    scale_embeddings: bool = False  # gemma: embeddings × sqrt(hidden_size)
    mlp_bias: bool = False  # llama reads config.json's mlp_bias
    moe: bool = False  # qwen3_moe: MLPs are routed experts (num_experts, decoder_sparse_step, mlp_only_layers)
    shared_expert: bool = False  # qwen2_moe: + sigmoid(x · w) · a dense MLP of shared_expert_intermediate_size
    bias_key: str = "attention_bias"  # the config.json key of qkv_bias=None (qwen2_moe: qkv_bias, o_proj never)
    # transformers' defaults for keys config.json may omit
    defaults: tuple[tuple[str, Any], ...] = ()


_COMMON_DEFAULTS = (("rms_norm_eps", 1e-6), ("tie_word_embeddings", False), ("head_dim", None))
FAMILIES: dict[str, Family] = {
    "qwen2": Family(qkv_bias=True, defaults=(("max_position_embeddings", 32768),)),
    "qwen3": Family(qkv_bias=None, qk_norm=True, defaults=(("max_position_embeddings", 32768), ("head_dim", 128))),
    # transformers' Qwen3MoeAttention: head_dim falls back to hidden / heads (not 128 as qwen3)
    "qwen3_moe": Family(qkv_bias=None, qk_norm=True, moe=True, defaults=(
        ("max_position_embeddings", 32768), ("decoder_sparse_step", 1), ("moe_intermediate_size", 768),
        ("num_experts_per_tok", 8), ("norm_topk_prob", False), ("router_aux_loss_coef", 0.001),
        ("mlp_only_layers", []))),
    # transformers' Qwen2MoeConfig: qkv_bias (default true) on q/k/v only, 60 experts of which 4 per token
    "qwen2_moe": Family(qkv_bias=None, bias_key="qkv_bias", moe=True, shared_expert=True, defaults=(
        ("max_position_embeddings", 32768), ("decoder_sparse_step", 1), ("moe_intermediate_size", 1408),
        ("shared_expert_intermediate_size", 5632), ("num_experts", 60), ("num_experts_per_tok", 4),
        ("norm_topk_prob", False), ("router_aux_loss_coef", 0.001), ("mlp_only_layers", []), ("qkv_bias", True))),
    "llama": Family(qkv_bias=None, mlp_bias=True, defaults=(("max_position_embeddings", 2048),)),
    # Mistral's sliding_window defaults to 4096 in transformers (v0.3's config.json says null)
    "mistral": Family(qkv_bias=False, defaults=(("max_position_embeddings", 4096 * 32), ("sliding_window", 4096))),
    # transformers reads Gemma 1's legacy hidden_act "gelu" as the tanh approximation
    "gemma": Family(qkv_bias=None, activations=("gelu_pytorch_tanh", "gelu"), unit_offset_norm=True,
                    scale_embeddings=True, defaults=(("max_position_embeddings", 8192), ("head_dim", 256),
                                                     ("tie_word_embeddings", True), ("pad_token_id", 0))),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # None for plain RoPE; else the scaling parameters with `rope_type` ("yarn" or "llama3").
    rope_scaling: dict | None
    tie_word_embeddings: bool
    max_position_embeddings: int
    model_type: str = "qwen2"
    qkv_bias: bool = True  # q/k/v projections carry a bias
    o_bias: bool = False  # o_proj too (llama / qwen3 / gemma attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"  # "silu" or "gelu_pytorch_tanh"
    unit_offset_norm: bool = False
    scale_embeddings: bool = False
    # mistral: a token attends to at most this many tokens (itself included); None: no window.
    # The run checks that no row is longer (jaxsft.setup), so attention here stays full causal.
    sliding_window: int | None = None
    # qwen3_moe (jaxsft.model.moe): every layer's MLP is num_experts routed experts of width
    # moe_intermediate_size, each token running its num_experts_per_tok best; 0 experts: dense MLPs
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the k routing weights to sum to 1
    router_aux_loss_coef: float = 0.0  # the load-balancing loss's weight (model.router_aux_loss_coef overrides)
    shared_expert_intermediate_size: int = 0  # qwen2_moe's shared expert (0: none)
    # a MoE model's layers with a dense MLP (of intermediate_size) instead of experts: transformers'
    # mlp_only_layers and decoder_sparse_step; () when every layer is sparse
    dense_layers: tuple[int, ...] = ()
    # config.json's pad_token_id: transformers builds nn.Embedding(..., padding_idx=pad_token_id), whose
    # lookup sends no gradient to that row (a tied head still does); None: every row learns.
    pad_token_id: int | None = None

    def __hash__(self):
        # The dict field would make the generated hash fail; configs are used as static metadata.
        scaling = tuple(sorted(self.rope_scaling.items())) if self.rope_scaling else None
        return hash((dataclasses.astuple(dataclasses.replace(self, rope_scaling=None)), scaling))

    def layer_slots(self) -> tuple[tuple[str, int], ...]:
        """Each layer's place: (the stacked module holding it, its index there). A MoE model with
        dense layers keeps its sparse layers in `layers` and the dense ones in `dense_layers`; any
        other model has every layer in `layers`."""
        slots, count = [], {"layers": 0, "dense_layers": 0}
        for i in range(self.num_hidden_layers):
            stack = "dense_layers" if i in self.dense_layers else "layers"
            slots.append((stack, count[stack]))
            count[stack] += 1
        return tuple(slots)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a `config.json` dict (old top-level `rope_theta` / `rope_scaling`, or
        transformers-5 `rope_parameters`); raises UnsupportedConfigError with a sentence."""
        model_type = d.get("model_type", "qwen2")
        family = FAMILIES.get(model_type)
        if family is None:
            raise UnsupportedConfigError(
                f"config.json has model_type={model_type!r}; jaxsft supports {', '.join(map(repr, FAMILIES))} "
                f"(Qwen2/2.5, Qwen3, Qwen1.5/Qwen2-MoE, Qwen3-MoE, Llama 3.x, Mistral, Gemma 1).")
        d = {**dict(_COMMON_DEFAULTS), **dict(family.defaults), **{k: v for k, v in d.items() if v is not None
                                                                    or k in ("sliding_window", "pad_token_id")}}
        _refuse_unsupported(model_type, family, d)
        heads = d["num_attention_heads"]
        theta, scaling = _rope_settings(d)
        attention_bias = bool(d.get(family.bias_key, False))
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=float(d["rms_norm_eps"]),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(d["tie_word_embeddings"]),
            max_position_embeddings=d["max_position_embeddings"],
            model_type=model_type,
            qkv_bias=attention_bias if family.qkv_bias is None else family.qkv_bias,
            o_bias=attention_bias if family.qkv_bias is None and family.bias_key == "attention_bias" else False,
            mlp_bias=family.mlp_bias and bool(d.get("mlp_bias", False)),
            qk_norm=family.qk_norm,
            hidden_act="silu" if family.activations[0] == "silu" else "gelu_pytorch_tanh",
            unit_offset_norm=family.unit_offset_norm,
            scale_embeddings=family.scale_embeddings,
            sliding_window=d.get("sliding_window") if model_type == "mistral" else None,
            pad_token_id=_pad_token_id(d),
            **(_moe_fields(d, family) if family.moe else {}),
        )


def _moe_fields(d: dict[str, Any], family: Family) -> dict[str, Any]:
    """The ModelConfig fields of a qwen2_moe / qwen3_moe config.json. transformers makes layer i sparse unless
    i is in mlp_only_layers or (i + 1) % decoder_sparse_step != 0: the others are `dense_layers`
    (all dense: a dense model, num_experts 0)."""
    n, step, dense_only = d["num_hidden_layers"], d["decoder_sparse_step"], set(d["mlp_only_layers"])
    # the Hub's files say num_experts; transformers 5 writes its alias num_local_experts
    experts = d.get("num_local_experts", d.get("num_experts", 128))
    sparse = [i not in dense_only and experts > 0 and (i + 1) % step == 0 for i in range(n)]
    if not any(sparse):
        return {}
    k = d["num_experts_per_tok"]
    if not 0 < k <= experts:
        raise UnsupportedConfigError(f"config.json has num_experts_per_tok={k}; it must be between 1 and "
                                     f"num_experts={experts}.")
    return dict(num_experts=experts, num_experts_per_tok=k, moe_intermediate_size=d["moe_intermediate_size"],
                norm_topk_prob=bool(d["norm_topk_prob"]), router_aux_loss_coef=float(d["router_aux_loss_coef"]),
                shared_expert_intermediate_size=d["shared_expert_intermediate_size"] if family.shared_expert else 0,
                dense_layers=tuple(i for i, s in enumerate(sparse) if not s))


def _refuse_unsupported(model_type: str, family: Family, d: dict[str, Any]) -> None:
    """One sentence for a feature of a listed family that jaxsft does not compute."""
    if d.get("use_sliding_window", False):
        raise UnsupportedConfigError(
            "config.json sets use_sliding_window: true; jaxsft implements full causal attention only, "
            "so set use_sliding_window to false (Qwen2.5 and Qwen3 checkpoints ship with false).")
    layer_types = set(d.get("layer_types") or ()) - {"full_attention"}
    if layer_types:
        raise UnsupportedConfigError(f"config.json has layer_types {sorted(layer_types)}; jaxsft implements "
                                     f"full_attention layers only.")
    act = d.get("hidden_act", family.activations[0])
    if act not in family.activations:
        raise UnsupportedConfigError(f"config.json has hidden_act={act!r}; the {model_type} MLP here is "
                                     f"{family.activations[0]}-gated.")
    if d.get("use_bidirectional_attention"):
        raise UnsupportedConfigError("config.json sets use_bidirectional_attention; jaxsft trains causal LMs only.")


def _pad_token_id(d: dict[str, Any]) -> int | None:
    """The embedding's padding_idx as torch reads it (negative counts from the end); an id outside
    the table (torch refuses to build it) never occurs in a valid row, so it is dropped."""
    pad, vocab = d.get("pad_token_id"), d["vocab_size"]
    if not isinstance(pad, int) or isinstance(pad, bool) or not -vocab <= pad < vocab:
        return None
    return pad % vocab


def _rope_settings(d: dict[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from any of the three spellings HF has used."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
    # Old files say "type"; transformers 5 says "rope_type".
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"config.json asks for rope type {rope_type!r}; jaxsft supports only "
            f"{', '.join(map(repr, SUPPORTED_ROPE_TYPES))}.")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedConfigError("config.json sets partial_rotary_factor != 1; jaxsft rotates the whole head.")
    if rope_type == "default":
        return float(theta), None
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in params]
    if rope_type == "llama3" and missing:
        raise UnsupportedConfigError(f"config.json's {rope_type} rope scaling has no {', '.join(missing)}.")
    # transformers fills original_max_position_embeddings from max_position_embeddings if absent.
    params.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 32768))
    return float(theta), {"rope_type": rope_type, **params}


def rope_frequencies(config: ModelConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies float32 [head_dim/2], attention scaling for cos/sin), as transformers'
    `_compute_default_rope_parameters` / `_compute_yarn_parameters` compute them."""
    dim, base = config.head_dim, config.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if config.rope_scaling is None:
        return (1.0 / pos_freqs).astype(np.float32), 1.0
    if config.rope_scaling["rope_type"] == "llama3":
        return _llama3(config.rope_scaling, 1.0 / pos_freqs), 1.0
    return _yarn(config, dim, base, pos_freqs)


def _llama3(s: dict, inv_freq: np.ndarray) -> np.ndarray:
    """Llama 3.1's scaling (transformers' `_compute_llama3_parameters`): wavelengths longer than
    original/low_freq_factor are divided by `factor`, shorter than original/high_freq_factor kept,
    and the band between blended linearly in original/wavelength."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    original = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def _yarn(config: ModelConfig, dim: int, base: float, pos_freqs: np.ndarray) -> tuple[np.ndarray, float]:
    s = config.rope_scaling
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or config.max_position_embeddings / original

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations):  # the dimension that turns `rotations` times over `original` tokens
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency (fast dims); 0: interpolate by `factor`
    inv_freq = (1 / (factor * pos_freqs)) * (1 - extrapolation) + (1 / pos_freqs) * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)
