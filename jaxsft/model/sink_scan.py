"""The layer scan whose backward pass adds each layer's weight gradient into an accumulator in
place, so gradient accumulation over micro-batches needs one buffer the size of the weights, not two.

With plain autodiff, micro-batch k's gradient of the stacked layer weights is a fresh [L, ...]
buffer written by the backward scan, and only then added to the running sum: the sum and one
micro-batch's gradient are alive together (for a 7B in bf16: 2 × 14.2 GiB). Here the backward
scan carries the running sum itself and does `acc[l] += g_l` as it reaches layer l (an in-place
dynamic-update-slice), the way torch's autograd accumulates into `.grad`.

Contract: `scan_with_sink(layer, x, stacked, consts, sink)` computes exactly the forward of
`lax.scan(layer)` (layer(h, p, *consts) -> h; h may be a pytree of float arrays, the carry). Under autodiff, `stacked` gets a zero cotangent
and what comes back as the "gradient" of `sink` is `sink + ∂loss/∂stacked`: the new running sum
(in the sink's dtype), not a gradient. Only the trainer's accumulation loop may call it. The
backward recomputes each layer from its saved input (the `full` remat policy).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def scan_with_sink(layer, x, stacked, consts, sink):
    del sink
    return jax.lax.scan(lambda h, p: (layer(h, p, *consts), None), x, stacked)[0]


def _fwd(layer, x, stacked, consts, sink):
    def body(h, p):
        return layer(h, p, *consts), h  # keep every layer's input (the `full` policy)

    y, inputs = jax.lax.scan(body, x, stacked)
    return y, (inputs, stacked, consts, sink)


def _bwd(layer, res, ct_y):
    inputs, stacked, consts, sink = res
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    float_consts = [c for c in consts if jnp.issubdtype(c.dtype, jnp.inexact)]

    def body(carry, i):
        ct_h, acc, ct_consts = carry
        h = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), inputs)
        p = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), stacked)
        _, vjp = jax.vjp(lambda h, p, *c: layer(h, p, *_merge(consts, c)), h, p, *float_consts)
        ct_h, g_p, *g_c = vjp(ct_h)
        acc = jax.tree.map(lambda a, g: jax.lax.dynamic_update_index_in_dim(
            a, jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False) + g.astype(a.dtype), i, 0), acc, g_p)
        ct_consts = [a + g for a, g in zip(ct_consts, g_c)]
        return (ct_h, acc, ct_consts), None

    zeros = [jnp.zeros_like(c) for c in float_consts]
    (ct_x, acc, ct_float), _ = jax.lax.scan(body, (ct_y, sink, zeros), jnp.arange(num_layers), reverse=True)
    it = iter(ct_float)
    ct_consts = tuple(next(it) if jnp.issubdtype(c.dtype, jnp.inexact) else None for c in consts)
    return ct_x, None, ct_consts, acc


def _merge(consts, float_values):
    """consts with its floating-point entries replaced by float_values (in order)."""
    it = iter(float_values)
    return tuple(next(it) if jnp.issubdtype(c.dtype, jnp.inexact) else c for c in consts)


scan_with_sink.defvjp(_fwd, _bwd)
