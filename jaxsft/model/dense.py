"""The dense reference attention: float32 [B, H, T, T] scores, simple enough to read as the
definition every other backend (jaxsft.model.attention.BACKENDS) is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, T, T] boolean: causal, same segment, query not padding."""
    t = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids != 0)[:, :, None]
    return (causal & same & real)[:, None]


def reference_attention(q, k, v, segment_ids):
    """Dense reference: float32 [B, H, T, T] scores and softmax, GQA by grouping query heads per KV
    head. Simple enough to read as the definition; O(T^2) memory."""
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
