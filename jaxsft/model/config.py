"""The Qwen2 architecture hyper-parameters, read from a Hugging Face `config.json`.

Only what changes the computation is kept. Anything jaxsft would compute differently from
transformers (sliding-window attention, rope types other than `default` and `yarn`, another model
family or activation) is refused with a sentence instead of silently training a different model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jaxsft.errors import UserError

SUPPORTED_ROPE_TYPES = ("default", "yarn")


class UnsupportedConfigError(UserError):
    """config.json describes a model jaxsft does not compute exactly like transformers."""


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # None for plain RoPE; else the scaling parameters with `rope_type` (only "yarn" today).
    rope_scaling: dict | None
    tie_word_embeddings: bool
    max_position_embeddings: int

    def __hash__(self):
        # The dict field would make the generated hash fail; configs are used as static metadata.
        scaling = tuple(sorted(self.rope_scaling.items())) if self.rope_scaling else None
        return hash((dataclasses.astuple(dataclasses.replace(self, rope_scaling=None)), scaling))

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "Qwen2Config":
        """Build from a `config.json` dict (old top-level `rope_theta` / `rope_scaling`, or
        transformers-5 `rope_parameters`); raises UnsupportedConfigError with a sentence."""
        model_type = d.get("model_type", "qwen2")
        if model_type != "qwen2":
            raise UnsupportedConfigError(
                f"config.json has model_type={model_type!r}; jaxsft supports only Qwen2 / Qwen2.5 (model_type 'qwen2').")
        if d.get("use_sliding_window", False):
            raise UnsupportedConfigError(
                "config.json sets use_sliding_window: true; jaxsft implements full causal attention only, "
                "so set use_sliding_window to false (Qwen2.5 checkpoints ship with false).")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedConfigError(f"config.json has hidden_act={act!r}; the Qwen2 MLP here is SwiGLU (silu).")
        heads = d["num_attention_heads"]
        theta, scaling = _rope_settings(d)
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
        )


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
            f"{' and '.join(map(repr, SUPPORTED_ROPE_TYPES))}.")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedConfigError("config.json sets partial_rotary_factor != 1; Qwen2 rotates the whole head.")
    if rope_type == "default":
        return float(theta), None
    # transformers fills original_max_position_embeddings from max_position_embeddings if absent.
    params.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 32768))
    return float(theta), {"rope_type": rope_type, **params}


def rope_frequencies(config: Qwen2Config) -> tuple[np.ndarray, float]:
    """(inverse frequencies float32 [head_dim/2], attention scaling for cos/sin), as transformers'
    `_compute_default_rope_parameters` / `_compute_yarn_parameters` compute them."""
    dim, base = config.head_dim, config.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if config.rope_scaling is None:
        return (1.0 / pos_freqs).astype(np.float32), 1.0
    return _yarn(config, dim, base, pos_freqs)


def _yarn(config: Qwen2Config, dim: int, base: float, pos_freqs: np.ndarray) -> tuple[np.ndarray, float]:
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
