"""The naive attention the kernel and Ulysses tests compare against (independent of jaxsft's own
reference, so a shared bug cannot hide)."""

import jax
import jax.numpy as jnp
import numpy as np


def naive_attention(q, k, v, segment_ids):
    """float32 reference: causal, same segment, padding keys masked, padding query rows zero."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    _, t, hq, d = q.shape
    kv_of = jnp.arange(hq) // (hq // k.shape[2])  # GQA: query head h uses KV head h // group
    k, v = k[:, :, kv_of], v[:, :, kv_of]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
    mask = jnp.tril(jnp.ones((t, t), bool)) & (seg_q == seg_k) & (seg_k > 0)
    logits = jnp.where(mask[:, None], logits, -1e30)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    return jnp.where(segment_ids[:, :, None, None] > 0, out, 0.0)
