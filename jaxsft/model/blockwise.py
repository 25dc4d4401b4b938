"""Blockwise (flash-style) attention in plain JAX: no [T, T] array, memory linear in T.

Same contract as the dense reference in `jaxsft.model.attention`: q [B,T,Hq,D], k/v [B,T,Hkv,D],
segment_ids [B,T] (0 = padding); token t sees token s iff s <= t and both are in the same
non-padding segment; padding queries give 0; query head h uses KV head h // (Hq/Hkv).

How. Rows are cut into blocks of `block` tokens. A work list holds every (row, query block, key
block) of the causal lower triangle whose segments can meet, compacted to the front; a
`fori_loop` walks it, keeping a running max, sum and output per query block (online softmax). The
forward saves only the output and the row log-sum-exp; the backward (`custom_vjp`) walks the same
list and recomputes each block's probabilities from the log-sum-exp, as flash attention does. So:
- the causal upper triangle is never computed, and neither is a block pair whose segment ids
  cannot meet — a packed row of short samples costs about what its samples cost;
- a block pair below the diagonal that lies inside one segment skips the mask arithmetic;
- the forward's residuals are named `attention_out` / `attention_lse` (`checkpoint_name`), so a
  remat policy that saves them (see `jaxsft.model.remat`) keeps the backward from re-running the
  forward.
GQA without repeating K/V: the G = Hq/Hkv query heads of one KV head are stacked as the rows of one
matrix against that KV head's keys.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

# Tokens per block, by platform. CPU: measured (docs/PERFORMANCE.md, "Blockwise attention"): 64
# is fastest on packed rows and short rows; from 2048 tokens a row 256 (fewer, larger products:
# the tiny step at T = 2048 runs 1.30 s instead of 1.85 s). GPU: larger blocks keep the per-step
# kernels big; not measured (no GPU was lent).
BLOCK = {"cpu": 64, "gpu": 512}
LONG_ROW_BLOCK = {"cpu": (2048, 256)}  # platform: (from this row length, this block)
DEFAULT_BLOCK = 128
_TARGET_PLATFORM = contextvars.ContextVar("blockwise_target_platform", default=None)


@contextlib.contextmanager
def compiling_for(platform: str):
    """Size blocks for `platform` ("cpu" | "gpu") while tracing: a deviceless GPU plan traces on
    the CPU backend but must plan the blocks a GPU would run."""
    token = _TARGET_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def default_block(seq_len: int) -> int:
    platform = _TARGET_PLATFORM.get() or jax.default_backend()
    long_rows = LONG_ROW_BLOCK.get(platform)
    if long_rows and seq_len >= long_rows[0]:
        return long_rows[1]
    return BLOCK.get(platform, DEFAULT_BLOCK)


def _work_list(segb: jax.Array):
    """Which (row b, query block i, key block j) to visit, as flat indices w = (b*n + i)*n + j
    compacted to the front; how many; and, per w, whether the pair needs no mask.

    segb [B, n, block]. Per row and block, the smallest and largest real segment id: a query block
    and a key block can meet only if j <= i and those ranges overlap (exact for packed rows, where
    ids increase along the row; a superset otherwise). A pair below the diagonal needs no mask when
    both blocks hold one and the same segment and no padding.
    """
    real = segb != 0
    lo = jnp.min(jnp.where(real, segb, jnp.iinfo(jnp.int32).max), axis=-1)  # [B, n]
    hi = jnp.max(jnp.where(real, segb, 0), axis=-1)
    one = jnp.all(real, axis=-1) & (lo == hi)
    n = segb.shape[1]
    below = jnp.tril(jnp.ones((n, n), bool))  # [i, j]: j <= i
    meet = below & (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])
    full = below & ~jnp.eye(n, dtype=bool) & one[:, :, None] & one[:, None, :] & (lo[:, :, None] == lo[:, None, :])
    meet, full = meet.reshape(-1), full.reshape(-1)
    return jnp.argsort(~meet, stable=True), jnp.sum(meet), full


def _unflat(w, n):
    return w // (n * n), (w // n) % n, w % n


def _mask_parts(segb, heads_per_kv):
    """What the in-block masks are made of, computed once per call.

    Returns the query code per block row [B, n, G*block] (its segment id, tiled over the G heads,
    -1 for padding, so a padding query matches no key) and the causal pattern of a diagonal block
    [G*block, block]. Built outside the loop: fused into the per-element comparison, the tiling
    and slicing cost XLA:CPU several ns an element (measured in the backward).
    """
    block = segb.shape[-1]
    q_code = jnp.tile(jnp.where(segb == 0, -1, segb), heads_per_kv)
    diagonal = jnp.tile(jnp.arange(block), heads_per_kv)[:, None] >= jnp.arange(block)[None, :]
    return q_code, diagonal


def _mask(q_code_i, seg_k_j, diagonal, i, j, keys_first=False):
    """[1, G*block, block] boolean (or [1, block, G*block] with keys_first): query block i of a row
    against its key block j — same segment, query not padding, causal on the diagonal."""
    if keys_first:
        mask = (seg_k_j[:, None] == q_code_i[None, :]) & (diagonal.T | (j < i))
    else:
        mask = (q_code_i[:, None] == seg_k_j[None, :]) & (diagonal | (j < i))
    return mask[None]


def _get(x, b, i):
    """x[b, i] for traced b, i."""
    return jax.lax.dynamic_slice(x, (b, i) + (0,) * (x.ndim - 2), (1, 1) + x.shape[2:])[0, 0]


def _set(x, b, i, value):
    return jax.lax.dynamic_update_slice(x, value[None, None], (b, i) + (0,) * (x.ndim - 2))


def _forward(qb, kb, vb, segb, block, scale):
    """Online softmax over the work list: out [B,n,Hkv,R,D] float32 and lse [B,n,Hkv,R] (R = G*block;
    lse = +inf for a row that sees nothing, i.e. a padding query)."""
    heads_per_kv = qb.shape[-2] // block
    n = qb.shape[1]
    order, count, full = _work_list(segb)
    q_code, diagonal = _mask_parts(segb, heads_per_kv)
    state = (jnp.full(qb.shape[:-1], -jnp.inf, jnp.float32), jnp.zeros(qb.shape[:-1], jnp.float32),
             jnp.zeros(qb.shape, jnp.float32))

    def step(p, state):
        w = order[p]
        b, i, j = _unflat(w, n)
        m, l, acc = state
        q, k, v = _get(qb, b, i), _get(kb, b, j), _get(vb, b, j)
        m_i, l_i, acc_i = _get(m, b, i), _get(l, b, i), _get(acc, b, i)

        def update(mask):
            # Scores stay unscaled (max and mask commute with the scale), so the scale folds into
            # the exp instead of costing a pass of its own.
            s = jnp.einsum("hrd,hsd->hrs", q, k, preferred_element_type=jnp.float32)
            if mask is not None:
                s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m_i, jnp.max(s, axis=-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row that has seen nothing yet
            p_ = jnp.exp((s - m_safe[..., None]) * scale)  # 0 where masked
            corr = jnp.exp((m_i - m_safe) * scale)
            pv = jnp.einsum("hrs,hsd->hrd", p_.astype(v.dtype), v, preferred_element_type=jnp.float32)
            return m_new, l_i * corr + jnp.sum(p_, axis=-1), acc_i * corr[..., None] + pv

        masked = lambda: update(_mask(_get(q_code, b, i), _get(segb, b, j), diagonal, i, j))
        m_new, l_new, acc_new = jax.lax.cond(full[w], lambda: update(None), masked)
        return _set(m, b, i, m_new), _set(l, b, i, l_new), _set(acc, b, i, acc_new)

    m, l, acc = jax.lax.fori_loop(0, count, step, state)
    real = l > 0
    l = jnp.where(real, l, 1.0)
    return acc / l[..., None], jnp.where(real, m * scale + jnp.log(l), jnp.inf)


def _backward(qb, kb, vb, segb, out, lse, dout, block, scale):
    """dq, dk, dv (float32, block layout) from the saved output and log-sum-exp."""
    heads_per_kv = qb.shape[-2] // block
    n = qb.shape[1]
    order, count, full = _work_list(segb)
    q_code, diagonal = _mask_parts(segb, heads_per_kv)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # rowsum(dO * O)
    grads = tuple(jnp.zeros(x.shape, jnp.float32) for x in (qb, kb, vb))

    def step(p, grads):
        w = order[p]
        b, i, j = _unflat(w, n)
        dq, dk, dv = grads
        q, k, v, do = _get(qb, b, i), _get(kb, b, j), _get(vb, b, j), _get(dout, b, i)
        lse_i, delta_i = _get(lse, b, i), _get(delta, b, i)

        def block_grads(mask):
            # Keys first ([key, query]), so every product contracts the minor axis of its left
            # operand: XLA:CPU runs the other form at about half speed. dq = ds k is computed as
            # (k^T ds_t)^T; the barriers keep XLA from folding the transposes back into the dot.
            s_t = jnp.einsum("hsd,hrd->hsr", k, q, preferred_element_type=jnp.float32)
            if mask is not None:
                s_t = jnp.where(mask, s_t, -jnp.inf)
            p_t = jnp.exp(s_t * scale - lse_i[:, None, :])  # 0 where masked and for padding queries
            dp_t = jnp.einsum("hsd,hrd->hsr", v, do, preferred_element_type=jnp.float32)
            ds_t = p_t * (dp_t - delta_i[:, None, :]) * scale
            dv_j = jnp.einsum("hsr,hrd->hsd", p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
            dk_j = jnp.einsum("hsr,hrd->hsd", ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32)
            k_t = jax.lax.optimization_barrier(jnp.swapaxes(k, -1, -2))
            dq_t = jnp.einsum("hds,hsr->hdr", k_t, ds_t.astype(k.dtype), preferred_element_type=jnp.float32)
            dq_i = jnp.swapaxes(jax.lax.optimization_barrier(dq_t), -1, -2)
            return dq_i, dk_j, dv_j

        masked = lambda: block_grads(_mask(_get(q_code, b, i), _get(segb, b, j), diagonal, i, j, keys_first=True))
        dq_i, dk_j, dv_j = jax.lax.cond(full[w], lambda: block_grads(None), masked)
        return (_set(dq, b, i, _get(dq, b, i) + dq_i), _set(dk, b, j, _get(dk, b, j) + dk_j),
                _set(dv, b, j, _get(dv, b, j) + dv_j))

    return jax.lax.fori_loop(0, count, step, grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_blocks(qb, kb, vb, segb, block):
    out, _ = _forward(qb, kb, vb, segb, block, qb.shape[-1] ** -0.5)
    return out.astype(qb.dtype)


def _attention_blocks_fwd(qb, kb, vb, segb, block):
    out, lse = _forward(qb, kb, vb, segb, block, qb.shape[-1] ** -0.5)
    out = checkpoint_name(out.astype(qb.dtype), "attention_out")
    return out, (qb, kb, vb, segb, out, checkpoint_name(lse, "attention_lse"))


def _attention_blocks_bwd(block, residuals, dout):
    qb, kb, vb, segb, out, lse = residuals
    grads = _backward(qb, kb, vb, segb, out, lse, dout, block, qb.shape[-1] ** -0.5)
    return tuple(g.astype(x.dtype) for g, x in zip(grads, (qb, kb, vb))) + (None,)


_attention_blocks.defvjp(_attention_blocks_fwd, _attention_blocks_bwd)


def _to_blocks(x, n, block, num_kv_heads):
    """[B, T, H, D] -> [B, n, Hkv, G*block, D]: a block's rows are G-major, then position."""
    b, _, h, d = x.shape
    g = h // num_kv_heads
    x = x.reshape(b, n, block, num_kv_heads, g, d).transpose(0, 1, 3, 4, 2, 5)
    return x.reshape(b, n, num_kv_heads, g * block, d)


def _from_blocks(x, num_heads):
    """[B, n, Hkv, G*block, D] -> [B, n*block, Hq, D]."""
    b, n, hkv, r, d = x.shape
    g = num_heads // hkv
    x = x.reshape(b, n, hkv, g, r // g, d).transpose(0, 1, 4, 2, 3, 5)
    return x.reshape(b, n * (r // g), num_heads, d)


def blockwise_attention(q, k, v, segment_ids, *, block: int | None = None):
    """q [B,T,Hq,D], k/v [B,T,Hkv,D], segment_ids [B,T] (0 = padding) -> [B,T,Hq,D] in q's dtype.

    block: tokens per block (default: `default_block(T)` for the platform); shrunk to T rounded up to 8 for
    short rows. A T that is not a multiple is padded at the end with segment 0 and cut back.
    """
    b, t, hq, _ = q.shape
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"num_heads={hq} must be a multiple of num_kv_heads={hkv}")
    block = min(block or default_block(t), -(-t // 8) * 8)
    n = -(-t // block)
    pad = n * block - t
    segment_ids = segment_ids.astype(jnp.int32)
    if pad:  # segment 0 at the end: no real query sees it, and its own queries give 0
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
    qb, kb, vb = (_to_blocks(x, n, block, hkv) for x in (q, k, v))
    out = _attention_blocks(qb, kb, vb, segment_ids.reshape(b, n, block), block)
    return _from_blocks(out, hq)[:, :t]

