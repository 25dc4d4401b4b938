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


LOSS_TYPES = ("ce", "dft")


def masked_ce_per_row(hidden, head, targets, weights, chunk_size: int, vocab_axis: int = 1, loss_type: str = "ce"):
    """Per-row sums of weighted token losses and of the weights.

    hidden [B, T, H] (its dtype is the matmul dtype; the head is cast to it), head the LM head
    kernel [H, V] (vocab_axis 1) or a tied embedding [V, H] (vocab_axis 0), targets int [B, T]
    (any id where the weight is 0), weights [B, T]. Chunks hold at most `chunk_size` tokens; T is
    padded with weight-0 tokens up to a multiple of the chunk count. `loss_type`: `ce`, the token
    cross-entropy; `dft`, each token's cross-entropy times its own probability exp(-ce), a
    constant to the backward pass (dynamic fine-tuning; TRL's loss_type="dft").
    Returns (loss_sum [B] float32, weight_sum [B] float32).
    """
    loss, weight, _ = masked_loss_sums(hidden, head, targets, weights, chunk_size, vocab_axis, loss_type)
    return loss, weight


def masked_loss_sums(hidden, head, targets, weights, chunk_size: int, vocab_axis: int = 1, loss_type: str = "ce",
                     groups=None, num_groups: int = 1):
    """`masked_ce_per_row`, and the sums of the weighted token losses by group over the whole batch:
    `groups` int [B, T] in [0, num_groups) (e.g. the source file of each token's sample), or None
    (one group). Returns (loss_sum [B], weight_sum [B], group_loss_sum [num_groups]), float32; the
    group sums come from the same pass (each chunk's losses are also added by group)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {LOSS_TYPES}")
    b, t, h = hidden.shape
    n = -(-t // chunk_size)  # number of chunks
    c = -(-t // n)  # tokens per chunk, <= chunk_size
    pad = n * c - t
    weights = weights.astype(jnp.float32)
    if groups is None or num_groups == 1:
        groups, num_groups = None, 1
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
        groups = None if groups is None else jnp.pad(groups, ((0, 0), (0, pad)))

    def by_chunk(x):  # token i*n + k goes to chunk k, slot i; the chunk axis leads for scan
        return jnp.moveaxis(x.reshape(b, c, n, *x.shape[2:]), 2, 0)

    gs = None if groups is None else by_chunk(groups.astype(jnp.int32))
    sums = _chunked_ce(by_chunk(hidden), head, by_chunk(targets), by_chunk(weights), gs, vocab_axis, num_groups,
                       loss_type == "dft")  # [B, num_groups]
    return sums.sum(axis=-1), weights.sum(axis=-1), sums.sum(axis=0)


def _logits(h, kernel, vocab_axis):
    return head_logits(h, kernel, vocab_axis, jnp.float32)


def _token_ce(logits, targets):
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1, mode="clip")[..., 0]
    return lse, lse - picked


def _token_loss(ce, dft: bool):
    """(loss, its derivative by ce): ce itself, or DFT's ce·exp(-ce) with exp(-ce) held constant."""
    if not dft:
        return ce, None
    p = jnp.exp(-ce)
    return ce * p, p


def _by_group(x, grp, num_groups: int):
    """[B, c] token values → [B, num_groups] sums by the tokens' group ids (None: one group)."""
    if grp is None:
        return x.sum(axis=-1, keepdims=True)
    return jnp.einsum("bc,bcg->bg", x, jax.nn.one_hot(grp, num_groups, dtype=x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _chunked_ce(hs, kernel, ts, ws, gs, vocab_axis, num_groups, dft):
    kernel_c = kernel.astype(hs.dtype)

    def body(acc, xs):
        h, tgt, w, grp = xs
        _, ce = _token_ce(_logits(h, kernel_c, vocab_axis), tgt)
        loss, _ = _token_loss(ce, dft)
        return acc + _by_group(loss * w, grp, num_groups), None

    acc, _ = jax.lax.scan(body, jnp.zeros((hs.shape[1], num_groups), jnp.float32), (hs, ts, ws, gs))
    return acc


def _chunked_ce_fwd(hs, kernel, ts, ws, gs, vocab_axis, num_groups, dft):
    return _chunked_ce(hs, kernel, ts, ws, gs, vocab_axis, num_groups, dft), (hs, kernel, ts, ws, gs)  # inputs only


def _chunked_ce_bwd(vocab_axis, num_groups, dft, res, g):
    hs, kernel, ts, ws, gs = res
    kernel_c = kernel.astype(hs.dtype)
    v, k = kernel.shape[vocab_axis], _HEAD[vocab_axis]

    def body(d_kernel, xs):
        h, tgt, w, grp = xs
        logits = _logits(h, kernel_c, vocab_axis)
        lse, ce = _token_ce(logits, tgt)
        loss, d_loss_d_ce = _token_loss(ce, dft)
        g_tok = g[:, :1] if grp is None else jnp.take_along_axis(g, grp, axis=-1)  # d out / d (its token's loss)
        scale = g_tok * w if d_loss_d_ce is None else g_tok * w * d_loss_d_ce  # d out / d ce[b, i]
        d_logits = (jnp.exp(logits - lse[..., None]) - jax.nn.one_hot(tgt, v, dtype=jnp.float32))
        d_logits = (d_logits * scale[..., None]).astype(hs.dtype)
        d_h = jnp.einsum(f"bcv,{k}->bch", d_logits, kernel_c, preferred_element_type=jnp.float32)
        d_kernel = d_kernel + jnp.einsum(f"bch,bcv->{k}", h, d_logits, preferred_element_type=jnp.float32)
        return d_kernel, (d_h.astype(hs.dtype), g_tok * loss)

    d_kernel, (d_hs, d_ws) = jax.lax.scan(body, jnp.zeros(kernel.shape, jnp.float32), (hs, ts, ws, gs))
    return d_hs, d_kernel.astype(kernel.dtype), None, d_ws, None


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)
