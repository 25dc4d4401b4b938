"""Grouped matmuls for the routed experts (`model.expert_matmul`): rows sorted by group (expert),
each group's rows times that group's weight [K, N].

- `ragged_dot`: `jax.lax.ragged_dot`, XLA's own. Sparse where the backend has a grouped GEMM;
  XLA:GPU without cuDNN's ragged-dot fusion (a deviceless plan) and XLA:CPU expand it to a dense
  dot of every row with every group's weight: G times the FLOPs and a [rows, G, N] temporary.
- `blocks`: each group's rows padded to whole blocks of `BLOCK` rows (at most one partial block per
  group), then one [BLOCK, K] × [K, N] matmul per block in a loop, the block's weight sliced by its
  group: the active FLOPs plus at most G·BLOCK padding rows, on any backend, with ordinary GEMMs.
  Its gradient (custom_vjp) is two more loops: dx per block with the weight transposed, and dW
  added block by block into a float32 [G, K, N] accumulator in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MATMULS = ("ragged_dot", "blocks")
BLOCK = 256


def grouped_matmul(x, w, sizes, how: str = "ragged_dot"):
    """x [R, K] (rows sorted by group; rows past Σ sizes give 0), w [G, K, N], sizes [G] → [R, N]."""
    if how == "ragged_dot":
        return jax.lax.ragged_dot(x, w, sizes)
    if how != "blocks":
        raise ValueError(f"model.expert_matmul={how!r}: choose one of {', '.join(MATMULS)}")
    rows, groups = x.shape[0], w.shape[0]
    block = min(BLOCK, rows)
    nb = -(-rows // block) + groups  # every group's rows in whole blocks: at most one partial block each
    ends = jnp.cumsum(sizes)
    group = jnp.searchsorted(ends, jnp.arange(rows), side="right")  # G for rows past the groups
    valid = group < groups
    g = jnp.minimum(group, groups - 1)
    blocks = (sizes + block - 1) // block
    padded = (jnp.cumsum(blocks) - blocks)[g] * block + jnp.arange(rows) - (ends - sizes)[g]
    padded = jnp.where(valid, padded, nb * block)  # out of range: not written, read as 0
    xp = jnp.zeros((nb * block, x.shape[1]), x.dtype).at[padded].set(x, mode="drop").reshape(nb, block, -1)
    block_group = jnp.minimum(jnp.searchsorted(jnp.cumsum(blocks), jnp.arange(nb), side="right"), groups - 1)
    yp = _block_matmul(xp, _vary_like(w, xp), block_group.astype(jnp.int32)).reshape(nb * block, -1)
    return jnp.where(valid[:, None], jnp.take(yp, jnp.minimum(padded, nb * block - 1), axis=0), 0).astype(x.dtype)


def _vary_like(a, *refs):
    """Inside shard_map: `a` marked as varying over the mesh axes `refs` vary over (as the loops'
    values and carries must agree), so the gradient of an unvarying weight is summed over them."""
    missing = tuple(sorted(set().union(*map(_varying, refs)) - _varying(a)))
    return jax.lax.pcast(a, missing, to="varying") if missing else a


def _varying(a) -> set:
    """The manual mesh axes `a` varies over (empty outside shard_map)."""
    t = jax.typeof(a)
    manual = getattr(t, "manual_axis_type", None)
    return set(manual.varying) if manual is not None else set(getattr(t, "vma", ()))


def _each_block(f, *xs):
    return jax.lax.scan(lambda _, a: (None, f(*a)), None, xs)[1]


@jax.custom_vjp
def _block_matmul(xp, w, block_group):
    """xp [B, block, K], w [G, K, N], block_group [B] → [B, block, N]: block b times w[block_group[b]]."""
    return _each_block(lambda xb, g: xb @ w[g], xp, block_group)


def _fwd(xp, w, block_group):
    return _block_matmul(xp, w, block_group), (xp, w, block_group)


def _bwd(res, dy):
    xp, w, block_group = res
    dx = _each_block(lambda dyb, g: dyb @ w[g].T, dy, block_group)

    def add(acc, a):
        xb, dyb, g = a
        return acc.at[g].add(jnp.matmul(xb.T, dyb, preferred_element_type=jnp.float32)), None

    dw, _ = jax.lax.scan(add, _vary_like(jnp.zeros(w.shape, jnp.float32), xp, dy, w), (xp, dy, block_group))
    return dx, dw.astype(w.dtype), None


_block_matmul.defvjp(_fwd, _bwd)
