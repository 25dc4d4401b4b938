"""Attention backends behind one function.

Every backend has the signature `fn(q [B,T,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,D], segment_ids [B,T])
-> [B,T,Hq,D]` and must build its own mask from `segment_ids`: token t attends to token s iff
s <= t, both are in the same segment and the segment is not 0 (padding). Queries of padding
tokens get zeros. GPU kernels register themselves in `BACKENDS` and `AUTO_ORDER`; each must pass
the comparison with `xla` on packed rows.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, T, T] boolean: causal, same segment, query not padding."""
    t = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids != 0)[:, :, None]
    return (causal & same & real)[:, None]


def xla_attention(q, k, v, segment_ids):
    """Reference attention: float32 scores and softmax, GQA by grouping query heads per KV head."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, t, hkv, hq // hkv, d)  # query head h uses KV head h // (hq/hkv), as HF's repeat_kv
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * d**-0.5
    mask = segment_mask(segment_ids)[:, :, None]  # [B,1,1,T,T]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    # Softmax by hand so a row with no allowed key (a padding query) gives 0, not NaN or uniform.
    p = jnp.where(mask, jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v)
    return out.reshape(b, t, hq, d)


BACKENDS: dict[str, AttentionFn] = {"xla": xla_attention}
# `auto` takes the first backend listed for the running platform that is registered.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)}


def resolve(implementation: str) -> str:
    """The backend name `implementation` stands for (`auto` picks by platform)."""
    if implementation == "auto":
        platform = jax.default_backend()
        return next(n for n in AUTO_ORDER.get(platform, ("xla",)) + ("xla",) if n in BACKENDS)
    if implementation not in BACKENDS:
        raise ValueError(f"model.attn_implementation={implementation!r} is not available; choose auto or one of: "
                         f"{', '.join(BACKENDS)}")
    return implementation


def attention(q, k, v, segment_ids, *, implementation: str = "xla"):
    """q [B,T,Hq,D], k/v [B,T,Hkv,D], segment_ids [B,T] (0 = padding) -> [B,T,Hq,D] in q's dtype."""
    return BACKENDS[resolve(implementation)](q, k, v, segment_ids).astype(q.dtype)
