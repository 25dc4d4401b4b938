"""A larger (or smaller) vocabulary: the embedding table and the untied LM head resized as
transformers' `model.resize_token_embeddings(n, mean_resizing=True)` does.

transformers (5.23, `_get_resized_embeddings` / `_init_added_embeddings_weights_with_mean`): the
first min(old, n) rows are kept; when the table grows, each added row is drawn from a
multivariate normal with the old rows' mean μ and covariance 10⁻⁹·Σ (Σ = the centred rows' Gram
matrix ÷ old rows, in float32), or set to μ when 10⁻⁹·Σ is not positive definite (a Cholesky
factorisation fails). The LM head's rows (HF's `lm_head.weight`) get the same treatment with their
own statistics and draw. With Σ scaled by 10⁻⁹ the added rows are μ to within ~3·10⁻⁵ of the rows'
spread; the draw itself comes from numpy (seeded by trainer.seed), not from torch's generator, so
only its distribution, not its digits, equals transformers'.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

EPSILON = 1e-9  # transformers' scale of the covariance


@functools.partial(jax.jit, static_argnums=1)
def _moments(rows, axis: int):
    """(mean [H], covariance [H, H]) of the vocabulary rows of a table, in float32 (as transformers)."""
    x = rows.astype(jnp.float32)
    x = x if axis == 0 else x.T
    mean = jnp.mean(x, axis=0)
    centred = x - mean
    return mean, centred.T @ centred / x.shape[0]


def added_rows(table, count: int, axis: int, seed) -> np.ndarray:
    """float32 [count, H]: transformers' initial values for `count` rows appended along `axis`
    (0: an embedding [V, H]; 1: a kernel [H, V])."""
    mean, cov = (np.asarray(jax.device_get(a)) for a in _moments(table, axis))
    try:
        scale_tril = np.linalg.cholesky((EPSILON * cov).astype(np.float32))
    except np.linalg.LinAlgError:  # not positive definite: transformers uses the mean alone
        return np.repeat(mean[None, :], count, axis=0)
    eps = np.random.default_rng(seed).standard_normal((count, mean.shape[0])).astype(np.float32)
    return mean[None, :] + eps @ scale_tril.T


def resized(table, new_size: int, axis: int, seed, sharding) -> jax.Array:
    """`table` with its vocabulary axis resized to `new_size` (kept rows bit-identical), in `sharding`."""
    old = table.shape[axis]
    if new_size <= old:
        keep = jax.jit(lambda t: jax.lax.slice_in_dim(t, 0, new_size, axis=axis), out_shardings=sharding)
        return keep(table)
    rows = added_rows(table, new_size - old, axis, seed).astype(table.dtype)
    extra = rows if axis == 0 else rows.T
    grow = jax.jit(lambda t, e: jnp.concatenate([t, e], axis=axis), out_shardings=sharding)
    return grow(table, jnp.asarray(extra))
