"""Token-chunked cross-entropy over the LM head that never materialises [B, T, V] in float32.

The logits of a 7B Qwen2 at T = 4096 are 4096 × 152064 floats per row (2.5 GB in float32), so the
loss is computed a chunk of tokens at a time inside `lax.scan`, and the backward pass recomputes a
chunk's logits instead of keeping them. A `custom_vjp` (rather than `jax.checkpoint` around the
chunk body) owns the backward so that:
- the LM-head gradient is accumulated across chunks in float32 (under `checkpoint`, the cotangent of
  a bfloat16 kernel would be summed chunk by chunk in bfloat16);
- the backward matmuls take bfloat16 operands with float32 accumulation, as torch autocast does
  (otherwise the float32 d_logits would turn them into float32 matmuls).

Chunks are strided (chunk k holds tokens k, k + n, k + 2n, ...): every chunk then spreads over the
whole sequence, so a sequence axis sharded in contiguous blocks keeps every shard busy each step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# The head's einsum letters by its vocabulary axis: 1 for an LM head kernel [H, V], 0 for a tied
# embedding table [V, H], contracted over H where it lies (see `head_logits`).
_HEAD = {0: "vh", 1: "hv"}


def head_logits(h, head, vocab_axis: int, preferred_element_type=None):
    """h [..., H] times the LM head: `head` is a kernel [H, V] (vocab_axis 1) or a tied embedding
    [V, H] (vocab_axis 0), in h's dtype. The table is used as it is stored, never as `head.T`: then
    (with one loss chunk, once XLA has removed the scan) the backward's [H, V] gradient einsum and
    the transpose back to [V, H] fold into one dot with
    both operands transposed (lhs_contracting_dims={0}), which XLA:CPU (jax 0.10.2) leaves out of
    its matmul-library fusions and runs on DotThunk, which has no BF16 x BF16 = F32 kernel: a
    tied model crashed on CPUs in bfloat16 compute. GPUs keep bf16 operands either way."""
    return jnp.einsum(f"...h,{_HEAD[vocab_axis]}->...v", h, head, preferred_element_type=preferred_element_type)


def masked_ce_per_row(hidden, head, targets, weights, chunk_size: int, vocab_axis: int = 1):
    """Per-row sums of weighted token cross-entropy and of the weights.

    hidden [B, T, H] (its dtype is the matmul dtype; the head is cast to it), head the LM head
    kernel [H, V] (vocab_axis 1) or a tied embedding [V, H] (vocab_axis 0), targets int [B, T]
    (any id where the weight is 0), weights [B, T]. Chunks hold at most `chunk_size` tokens; T is
    padded with weight-0 tokens up to a multiple of the chunk count.
    Returns (loss_sum [B] float32, weight_sum [B] float32).
    """
    b, t, h = hidden.shape
    n = -(-t // chunk_size)  # number of chunks
    c = -(-t // n)  # tokens per chunk, <= chunk_size
    pad = n * c - t
    weights = weights.astype(jnp.float32)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    # token i*n + k goes to chunk k, slot i; the chunk axis leads for scan
    hs = hidden.reshape(b, c, n, h).transpose(2, 0, 1, 3)
    ts = targets.reshape(b, c, n).transpose(2, 0, 1)
    ws = weights.reshape(b, c, n).transpose(2, 0, 1)
    return _chunked_ce(hs, head, ts, ws, vocab_axis), weights.sum(axis=-1)


def _logits(h, kernel, vocab_axis):
    return head_logits(h, kernel, vocab_axis, jnp.float32)


def _token_ce(logits, targets):
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1, mode="clip")[..., 0]
    return lse, lse - picked


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_ce(hs, kernel, ts, ws, vocab_axis):
    kernel_c = kernel.astype(hs.dtype)

    def body(acc, xs):
        h, tgt, w = xs
        _, ce = _token_ce(_logits(h, kernel_c, vocab_axis), tgt)
        return acc + (ce * w).sum(axis=-1), None

    acc, _ = jax.lax.scan(body, jnp.zeros(hs.shape[1], jnp.float32), (hs, ts, ws))
    return acc


def _chunked_ce_fwd(hs, kernel, ts, ws, vocab_axis):
    return _chunked_ce(hs, kernel, ts, ws, vocab_axis), (hs, kernel, ts, ws)  # keep inputs only


def _chunked_ce_bwd(vocab_axis, res, g):
    hs, kernel, ts, ws = res
    kernel_c = kernel.astype(hs.dtype)
    v, k = kernel.shape[vocab_axis], _HEAD[vocab_axis]

    def body(d_kernel, xs):
        h, tgt, w = xs
        logits = _logits(h, kernel_c, vocab_axis)
        lse, ce = _token_ce(logits, tgt)
        scale = g[:, None] * w  # d loss_sum[b] / d ce[b, i]
        d_logits = (jnp.exp(logits - lse[..., None]) - jax.nn.one_hot(tgt, v, dtype=jnp.float32))
        d_logits = (d_logits * scale[..., None]).astype(hs.dtype)
        d_h = jnp.einsum(f"bcv,{k}->bch", d_logits, kernel_c, preferred_element_type=jnp.float32)
        d_kernel = d_kernel + jnp.einsum(f"bch,bcv->{k}", h, d_logits, preferred_element_type=jnp.float32)
        return d_kernel, (d_h.astype(hs.dtype), g[:, None] * ce)

    d_kernel, (d_hs, d_ws) = jax.lax.scan(body, jnp.zeros(kernel.shape, jnp.float32), (hs, ts, ws))
    return d_hs, d_kernel.astype(kernel.dtype), None, d_ws


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)
