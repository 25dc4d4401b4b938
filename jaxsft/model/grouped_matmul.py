"""Grouped matmuls for the routed experts (`model.expert_matmul`): rows sorted by group (expert),
each group's rows times that group's weight [K, N].

- `ragged_dot`: `jax.lax.ragged_dot`, XLA's own. Sparse where the backend has a grouped GEMM;
  XLA:GPU without cuDNN's ragged-dot fusion (a deviceless plan) and XLA:CPU expand it to a dense
  dot of every row with every group's weight: G times the FLOPs and a [rows, G, N] temporary.
- `blocks`: each group's rows padded to whole blocks of `BLOCK` rows (at most one partial block per
  group), then one [BLOCK, K] × [K, N] matmul per block in a loop, the block's weight sliced by its
  group: the active FLOPs plus at most G·BLOCK padding rows, on any backend, with ordinary GEMMs.
  Its gradient (custom_vjp) is two more loops: dx per block with the weight transposed, and dW
  added block by block into a float32 [G, K, N] accumulator in place. The layout (`blocks_of`) maps
  slots in any order to padded rows, so an expert MLP gathers its tokens straight into it, runs its
  three projections there (padding rows stay 0) and gathers the outputs back
  (jaxsft.model.moe.expert_mlp).
"""

from __future__ import annotations

from typing import NamedTuple

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
    b = blocks_of(jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(x.shape[0]), side="right"), w.shape[0])
    return gather_rows(block_matmul(gather_rows(x, b.slot_of_row), w, b), b.row_of_slot)


class Blocks(NamedTuple):
    """Where S slots (each for one group, or none) sit in the padded block layout."""
    slot_of_row: jax.Array  # [nb·block]: the slot a padded row holds; S on padding
    row_of_slot: jax.Array  # [S]: the padded row of a slot; nb·block for a slot of no group
    block_group: jax.Array  # [nb]: each block's group


def blocks_of(ids, groups: int) -> Blocks:
    """The block layout of slots whose groups are `ids` [S] (an id >= groups: no group), in any order:
    slots sorted by group (stably), each group's run starting a new block."""
    slots = ids.shape[0]
    block = min(BLOCK, slots)
    nb = -(-slots // block) + groups  # every group in whole blocks: at most one partial block each
    order = jnp.argsort(ids, stable=True)
    sizes = jnp.bincount(ids, length=groups)
    group = ids[order]
    g = jnp.minimum(group, groups - 1)
    blocks = (sizes + block - 1) // block
    row = (jnp.cumsum(blocks) - blocks)[g] * block + jnp.arange(slots) - (jnp.cumsum(sizes) - sizes)[g]
    row = jnp.where(group < groups, row, nb * block).astype(jnp.int32)
    block_group = jnp.minimum(jnp.searchsorted(jnp.cumsum(blocks), jnp.arange(nb), side="right"), groups - 1)
    return Blocks(jnp.full(nb * block, slots, jnp.int32).at[row].set(order.astype(jnp.int32), mode="drop"),
                  jnp.zeros(slots, jnp.int32).at[order].set(row), block_group.astype(jnp.int32))


def gather_rows(x, index):
    """x[index] along the first axis, 0 where the index is out of range."""
    return jnp.take(x, index, axis=0, mode="fill", fill_value=0)


def block_matmul(rows, w, b: Blocks):
    """rows [nb·block, K] in `b`'s padded layout times each block's group's weight of w [G, K, N]."""
    nb = b.block_group.shape[0]
    xp = rows.reshape(nb, -1, rows.shape[-1])
    return _block_matmul(xp, _vary_like(w, xp), b.block_group).reshape(rows.shape[0], -1)


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
