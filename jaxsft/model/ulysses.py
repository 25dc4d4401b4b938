"""Ulysses sequence parallelism around any attention function.

Activations outside attention are token-sharded over the mesh axis 'sp'. Attention needs every
token of a row, so inside `shard_map` we trade the token split for a head split (one all-to-all),
run an ordinary local attention on all tokens of Hq/sp heads, and trade back (verl's Ulysses).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

SP_AXIS = "sp"
DP_AXIS = "dp"

# inner(q [b,T,hq,D], k [b,T,hkv,D], v [b,T,hkv,D], segment_ids [b,T]) -> [b,T,hq,D]
AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def check_ulysses(num_heads: int, num_kv_heads: int, sp: int) -> None:
    """Raise ValueError unless heads can be split over `sp` ranks (verl's constraints)."""
    if sp < 1:
        raise ValueError(f"ulysses_sequence_parallel_size must be >= 1, got {sp}.")
    if num_heads % sp:
        raise ValueError(
            f"ulysses_sequence_parallel_size={sp} must divide num_attention_heads={num_heads} "
            f"(each sp rank takes an equal share of query heads).")
    if num_kv_heads % sp and sp % num_kv_heads:
        raise ValueError(
            f"ulysses_sequence_parallel_size={sp} must divide num_key_value_heads={num_kv_heads} "
            f"or be a multiple of it (then K/V heads are replicated); "
            f"valid sizes here divide {num_heads} and are divisors or multiples of {num_kv_heads}.")


def valid_sp(num_heads: int, num_kv_heads: int) -> list[int]:
    """Every ulysses_sequence_parallel_size `check_ulysses` accepts for these heads (beyond the KV
    head count, K/V heads are replicated)."""
    return [sp for sp in range(1, num_heads + 1)
            if num_heads % sp == 0 and (num_kv_heads % sp == 0 or sp % num_kv_heads == 0)]


def _kv_repeats(num_kv_heads: int, sp: int) -> int:
    # With fewer KV heads than ranks, copy each KV head so every rank owns one. jnp.repeat keeps
    # copies adjacent, so rank i holds original KV head i // r — exactly the head its query heads
    # [i*Hq/sp, (i+1)*Hq/sp) use under GQA (query h uses KV h // (Hq/Hkv)).
    return sp // num_kv_heads if num_kv_heads < sp else 1


def ulysses_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                      mesh, inner: AttentionFn) -> jax.Array:
    """Attention over token-sharded inputs via head-sharded local attention.

    q: [B,T,Hq,D], k/v: [B,T,Hkv,D] sharded P('dp','sp',None,None); segment_ids [B,T] sharded
    P('dp','sp') (0 = padding). Returns [B,T,Hq,D] sharded like q. `inner` is any attention with
    the contract signature; it sees Hq/sp query heads, the matching KV heads and whole rows.
    A Pallas `inner` needs this shard_map even at sp = 1: XLA cannot partition a custom kernel.
    """
    sp = mesh.shape[SP_AXIS]
    _, seq_len, num_heads, _ = q.shape
    num_kv_heads = k.shape[2]
    check_ulysses(num_heads, num_kv_heads, sp)
    if seq_len % sp:
        raise ValueError(
            f"sequence length {seq_len} must be a multiple of ulysses_sequence_parallel_size={sp}.")
    repeats = _kv_repeats(num_kv_heads, sp)

    def to_heads(x):  # [b, T/sp, H, D] -> [b, T, H/sp, D]
        return jax.lax.all_to_all(x, SP_AXIS, split_axis=2, concat_axis=1, tiled=True)

    def to_tokens(x):  # [b, T, H/sp, D] -> [b, T/sp, H, D]
        return jax.lax.all_to_all(x, SP_AXIS, split_axis=1, concat_axis=2, tiled=True)

    def local(q, k, v, seg):
        if repeats > 1:
            k = jnp.repeat(k, repeats, axis=2)
            v = jnp.repeat(v, repeats, axis=2)
        seg_full = jax.lax.all_gather(seg, SP_AXIS, axis=1, tiled=True)
        out = inner(to_heads(q), to_heads(k), to_heads(v), seg_full)
        return to_tokens(out)

    act = P(DP_AXIS, SP_AXIS, None, None)
    # check_vma=False: with it on, a Pallas inner fails in jax 0.10.2 ("Primitive pad requires
    # varying manual axes to match" from the Pallas interpreter). Gradients are tested equal.
    return jax.shard_map(local, mesh=mesh, in_specs=(act, act, act, P(DP_AXIS, SP_AXIS)),
                         out_specs=act, check_vma=False)(q, k, v, segment_ids)
