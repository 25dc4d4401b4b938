"""The routed experts on the (dp, sp) mesh, in one of two layouts (`model.expert_layout`):

- `fsdp`: every expert weight is split over all devices like any other weight (jaxsft.parallel);
  each device gathers a layer's experts and runs its own tokens through them.
- `expert` (expert parallelism): each device holds E / (dp·sp) whole experts (the expert dimension
  is sharded); tokens travel to the device of each expert they chose and back, by all-to-all.

Both run inside `jax.shard_map` over the token shards (rows over dp, tokens over sp), so the
sort by expert and the grouped matmuls (jaxsft.model.moe.expert_mlp) stay local to a device.

Expert parallelism, per device with n tokens and k experts each: the n·k assignments are sorted
by expert (so by destination device) and written into a send buffer [D, C, H] (D = dp·sp peers, C
slots per peer) with the local expert id of each slot; one all-to-all delivers to each device the
slots of its experts from every peer, which it runs as one grouped matmul per projection, and a
second all-to-all returns the outputs, which are put back in slot order and combined as in the
fsdp layout. C = n·k (the default, `model.expert_capacity_factor` null) holds every assignment
even if all go to one device, so no token is dropped; a capacity factor f sets C = ceil(f·n·k/D),
the balanced share times f, and assignments beyond a peer's C slots are dropped (their expert
output is 0; the residual stream carries the token on) and counted in the router statistics.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsft import parallel
from jaxsft.model import moe

LAYOUTS = ("fsdp", "expert")
TOKENS = P("dp", "sp", None)  # [B, T, ...]: rows over dp, tokens over sp
EXPERTS = P(parallel.FSDP)  # [E, ...]: whole experts per device


def check_layout(layout: str, num_experts: int, devices: int) -> None:
    """ValueError naming the key unless `layout` can hold `num_experts` experts on `devices` devices."""
    if layout not in LAYOUTS:
        raise ValueError(f"model.expert_layout={layout!r}: choose one of {', '.join(LAYOUTS)}")
    if layout == "expert" and num_experts % devices:
        raise ValueError(f"model.expert_layout=expert: num_experts={num_experts} does not divide over the "
                         f"{devices} devices of the mesh; use model.expert_layout=fsdp or a device count "
                         f"that divides {num_experts}")


def experts(x, chosen, weights, gate, up, down, activation, layout: str = "fsdp", capacity_factor=None,
            matmul: str = "blocks", real=None):
    """x [B, T, H], chosen / weights [B, T, k], expert weights [E, H, I] / [E, I, H] → (y [B, T, H],
    assignments of real tokens dropped (float32 count; `real` [B, T], False on padding, None: all real)). Without a (dp, sp) mesh, or when B or T does not divide
    over it, the experts run as one program that XLA partitions (no token dropped)."""
    b, t, h = x.shape
    mesh = parallel.active_mesh()
    dtype = x.dtype
    gate, up, down = gate.astype(dtype), up.astype(dtype), down.astype(dtype)
    dp, sp = (1, 1) if mesh is None else (mesh.shape["dp"], mesh.shape["sp"])
    if layout == "expert":
        check_layout(layout, gate.shape[0], dp * sp)

    def all_experts(x, chosen, weights, gate, up, down):  # every expert's weights here: nothing travels
        k = chosen.shape[-1]
        y = moe.grouped_experts(x.reshape(-1, h), chosen.reshape(-1, k), weights.reshape(-1, k), gate, up, down,
                                activation, matmul)
        return y.reshape(x.shape)

    if mesh is None or b % dp or t % sp or dp * sp == 1:
        return all_experts(x, chosen, weights, gate, up, down), jnp.zeros((), jnp.float32)
    if layout == "fsdp":
        y = jax.shard_map(all_experts, in_specs=(TOKENS, TOKENS, TOKENS, P(), P(), P()), out_specs=TOKENS)(
            x, chosen, weights, gate, up, down)
        return y, jnp.zeros((), jnp.float32)

    def local(x, chosen, weights, gate, up, down, real):
        y, dropped = _exchange(x, chosen, weights, gate, up, down, activation, dp * sp, capacity_factor, matmul, real)
        return y, jax.lax.psum(dropped, parallel.FSDP)

    real = jnp.ones((b, t), bool) if real is None else real
    return jax.shard_map(local, in_specs=(TOKENS, TOKENS, TOKENS, EXPERTS, EXPERTS, EXPERTS, P("dp", "sp")),
                         out_specs=(TOKENS, P()))(x, chosen, weights, gate, up, down, real)


class SparseMoE(nnx.Module):
    """transformers' Qwen3MoeSparseMoeBlock: `gate` (the router) and `experts`, laid out by `layout`;
    with `shared_expert` (a dense MLP module) and `shared_expert_gate` (a linear H → 1),
    Qwen2MoeSparseMoeBlock, which adds sigmoid(gate(x)) · shared_expert(x) to the experts' output."""

    def __init__(self, config, *, stack, dtype, rngs, activation, layout: str = "fsdp", capacity_factor=None,
                 matmul: str = "blocks", shared_expert=None, shared_expert_gate=None, lora=None):
        h, e = config.hidden_size, config.num_experts
        self.gate = moe.Router(h, e, stack=stack, dtype=dtype, rngs=rngs)
        self.experts = moe.Experts(h, config.moe_intermediate_size, e, stack=stack, dtype=dtype, rngs=rngs,
                                   layout=layout, lora=lora)
        self.k, self.normalise, self.activation = config.num_experts_per_tok, config.norm_topk_prob, activation
        self.layout, self.capacity_factor, self.matmul = layout, capacity_factor, matmul
        self.shared_expert, self.shared_expert_gate = shared_expert, shared_expert_gate

    def __call__(self, x, real):
        """x [B, T, H], real [B, T] (False on padding) → (y [B, T, H], this layer's router stats)."""
        b, t, h = x.shape
        probs, chosen, weights = moe.route(x.reshape(-1, h), self.gate.kernel[...], self.k, self.normalise)
        y, dropped = experts(x, chosen.reshape(b, t, -1), weights.reshape(b, t, -1), *self.experts.weights(),
                             self.activation, self.layout, self.capacity_factor, self.matmul, real)
        if self.shared_expert is not None:  # the GSPMD-sharded dense MLP, as any other layer's
            y = y + jax.nn.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y, moe.layer_stats(probs, chosen, real.reshape(-1), dropped)


def capacity(n: int, k: int, devices: int, capacity_factor) -> int:
    """Slots per peer for n tokens × k assignments: all of them (no drop), or f times the balanced share."""
    return n * k if capacity_factor is None else min(n * k, math.ceil(capacity_factor * n * k / devices))


def _exchange(x, chosen, weights, gate, up, down, activation, devices: int, capacity_factor, matmul, real):
    """One device's part of expert parallelism (module docstring): local tokens x [b, t, H] →
    (their experts' weighted sum [b, t, H], assignments of real tokens (`real` [b, t]) dropped here)."""
    b, t, h = x.shape
    k, local_experts = chosen.shape[-1], gate.shape[0]
    n, flat = b * t, chosen.reshape(-1)  # slot s = token s // k
    c = capacity(n, k, devices, capacity_factor)
    order = jnp.argsort(flat, stable=True)  # slots by expert, so by destination device
    dest = flat[order] // local_experts
    sizes = jnp.bincount(flat // local_experts, length=devices)
    pos = jnp.arange(n * k) - (jnp.cumsum(sizes) - sizes)[dest]  # the slot's place in its peer's block
    send = jnp.zeros((devices, c, h), x.dtype).at[dest, pos].set(x.reshape(n, h)[order // k], mode="drop")
    ids = jnp.full((devices, c), local_experts, jnp.int32).at[dest, pos].set(flat[order] % local_experts, mode="drop")
    axes = parallel.FSDP
    recv = jax.lax.all_to_all(send, axes, 0, 0, tiled=True)  # recv[s]: what peer s sent here
    recv_ids = jax.lax.all_to_all(ids, axes, 0, 0, tiled=True).reshape(-1)
    rows = devices * c
    out = moe.expert_mlp(recv.reshape(rows, h), jnp.arange(rows), recv_ids, gate, up, down, activation, matmul)
    back = jax.lax.all_to_all(out.reshape(devices, c, h), axes, 0, 0, tiled=True)  # back[d]: what peer d computed
    kept = pos < c
    ys = jnp.where(kept[:, None], back[dest, jnp.minimum(pos, c - 1)], 0)
    ys = jnp.zeros_like(ys).at[order].set(ys)  # slot order again
    y = moe.combine(ys.reshape(n, k, h), weights.reshape(n, k))
    # padding's assignments travel and may be dropped like any (routing cannot tell), but are not counted
    return y.reshape(b, t, h), jnp.sum(~kept & real.reshape(n)[order // k]).astype(jnp.float32)
