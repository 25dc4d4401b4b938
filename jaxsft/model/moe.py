"""The routed-expert MLP of qwen3_moe, as transformers' Qwen3MoeSparseMoeBlock computes it, with
each token running only its k experts, and the router's load-balancing loss.

Router: logits = x · W_gate [H, E] (compute dtype), probabilities softmax(logits) in float32, the
k largest kept (renormalised to sum 1 with `norm_topk_prob`) and cast to the compute dtype.

Experts (sparse, no token dropped): the N·k (token, expert) assignments are sorted by expert, the
tokens gathered in that order, and each projection is one grouped matmul (rows of group e times
expert e's weight; `model.expert_matmul`, jaxsft.model.grouped_matmul), so the FLOPs are those of
the k active experts. The outputs are put back in token order and summed over the k slots,
weighted by the routing weights. Where the experts live on the mesh and how tokens reach them:
jaxsft.model.moe_parallel.

Router statistics, carried through the layer scan as sums (`add_stats`): per expert the count of
(real) tokens that chose it and the sum of its probabilities, the count of real tokens, and the
worst layer's load max/mean, and the assignments the expert-parallel layout's capacity dropped.
`load_balancing_loss` turns the sums into transformers'
`load_balancing_loss_func` with the attention mask (padding excluded), summed over the sparse layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxsft.model import lora as lora_lib
from jaxsft.model.grouped_matmul import block_matmul, blocks_of, gather_rows, grouped_matmul

STATS = ("expert_tokens", "expert_probs", "tokens", "load_max_mean", "dropped")


def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)


class Router(nnx.Module):
    """HF's `mlp.gate` (weight [E, H]) as kernel [*stack, H, E]."""

    def __init__(self, hidden: int, experts: int, *, stack, dtype, rngs):
        lead = ("layers",) * len(stack)
        self.kernel = nnx.Param(_normal(rngs, (*stack, hidden, experts), dtype), axes=(*lead, "embed", None))


class ExpertAdapter(nnx.Module):
    """PEFT's LoRA on a stacked expert weight [*stack, E, in, out] (its ParamWrapper: one rank-r pair
    per expert): lora_a [*stack, E, in, r] (Kaiming-uniform as PEFT's), lora_b [*stack, E, r, out]
    (0), float32."""

    def __init__(self, d_in: int, d_out: int, experts: int, rank: int, *, stack, lead, axes, rngs):
        self.lora_a = nnx.Param(lora_lib.initial_a(rngs.params(), (*stack, experts, d_in, rank)),
                                axes=(*lead, axes[0], None))
        self.lora_b = nnx.Param(jnp.zeros((*stack, experts, rank, d_out), jnp.float32), axes=(*lead, None, axes[1]))

    def delta(self, scale: float):
        """α/r · A·B per expert, [*, E, in, out] float32 (PEFT's delta weight, transposed as our kernels)."""
        return jnp.einsum("...ir,...ro->...io", self.lora_a[...], self.lora_b[...]) * scale


class Experts(nnx.Module):
    """E SwiGLU MLPs stacked: gate_proj / up_proj [*stack, E, H, I], down_proj [*stack, E, I, H]
    (HF's `mlp.experts.{e}.gate_proj.weight` [I, H] is slice e transposed). The expert dimension is
    named `experts` (sharded: whole experts per device) only in the expert-parallel layout.

    With LoRA on `mlp.experts.gate_up_proj` (`model.target_parameters`), one adapter `gate_up` of
    width 2I serves gate and up (transformers 5 fuses them, gate first, and PEFT adapts the fused
    weight); on `mlp.experts.down_proj`, `down`. `weights()` merges them, W + α/r·A·B, as PEFT's
    forward does, in float32 before the cast to the compute dtype."""

    def __init__(self, hidden: int, inner: int, experts: int, *, stack, dtype, rngs, layout: str = "fsdp",
                 lora=None):
        lead = (*("layers",) * len(stack), "experts" if layout == "expert" else None)
        self.gate_proj = nnx.Param(_normal(rngs, (*stack, experts, hidden, inner), dtype), axes=(*lead, "embed", "mlp"))
        self.up_proj = nnx.Param(_normal(rngs, (*stack, experts, hidden, inner), dtype), axes=(*lead, "embed", "mlp"))
        self.down_proj = nnx.Param(_normal(rngs, (*stack, experts, inner, hidden), dtype), axes=(*lead, "mlp", "embed"))
        targets, self.lora = (lora.parameters if lora is not None else ()), lora
        adapter = dict(stack=stack, lead=lead, rngs=rngs, rank=lora.rank if lora is not None else 0)
        self.gate_up = (ExpertAdapter(hidden, 2 * inner, experts, axes=("embed", "mlp"), **adapter)
                        if "mlp.experts.gate_up_proj" in targets else None)
        self.down = (ExpertAdapter(inner, hidden, experts, axes=("mlp", "embed"), **adapter)
                     if "mlp.experts.down_proj" in targets else None)

    def weights(self):
        """(gate, up, down) with any LoRA merged (float32 then), else as stored."""
        gate, up, down = self.gate_proj[...], self.up_proj[...], self.down_proj[...]
        if self.gate_up is not None:
            d, inner = self.gate_up.delta(self.lora.scale), gate.shape[-1]
            gate, up = gate.astype(jnp.float32) + d[..., :inner], up.astype(jnp.float32) + d[..., inner:]
        if self.down is not None:
            down = down.astype(jnp.float32) + self.down.delta(self.lora.scale)
        return gate, up, down


def route(x, kernel, k: int, normalise: bool):
    """x [N, H] → (probabilities [N, E] float32, chosen experts [N, k], weights [N, k] in x's dtype)."""
    logits = x @ kernel.astype(x.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, chosen = jax.lax.top_k(probs, k)
    if normalise:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    return probs, chosen, top.astype(x.dtype)


def grouped_experts(x, chosen, weights, gate, up, down, activation, matmul: str = "ragged_dot"):
    """Σ over each token's k experts of weight · down(act(gate(x)) · up(x)): x [N, H], chosen and
    weights [N, k], expert weights [E, H, I] and [E, I, H]. Sorted by expert, one ragged_dot per
    projection over the N·k assignments (`matmul`: jaxsft.model.grouped_matmul)."""
    n, k = chosen.shape
    # slot s = token s // k
    ys = expert_mlp(x, jnp.arange(n * k) // k, chosen.reshape(-1), gate, up, down, activation, matmul)
    return combine(ys.reshape(n, k, -1), weights)


def expert_mlp(x, source, ids, gate, up, down, activation, matmul: str = "ragged_dot"):
    """Slot s runs row source[s] of x [M, H] through expert ids[s] (an id >= E: no expert, output 0):
    the slots sorted by expert, each projection one grouped matmul. Returns [S, H] in slot order."""
    experts, dtype = gate.shape[0], x.dtype
    gate, up, down = gate.astype(dtype), up.astype(dtype), down.astype(dtype)
    if matmul == "blocks":  # gathered straight into the padded block layout, and out of it
        b = blocks_of(ids, experts)
        xp = gather_rows(x, jnp.take(source, b.slot_of_row, mode="fill", fill_value=x.shape[0]))
        g = checkpoint_name(block_matmul(xp, gate, b), "mlpwi_0")
        u = checkpoint_name(block_matmul(xp, up, b), "mlpwi_1")
        return gather_rows(checkpoint_name(block_matmul(activation(g) * u, down, b), "mlpwo"), b.row_of_slot)
    order = jnp.argsort(ids, stable=True)  # slots grouped by expert (empty slots last)
    sizes = jnp.bincount(ids, length=experts).astype(jnp.int32)
    xs = jnp.take(x, source[order], axis=0)
    g = checkpoint_name(grouped_matmul(xs, gate, sizes, matmul), "mlpwi_0")
    u = checkpoint_name(grouped_matmul(xs, up, sizes, matmul), "mlpwi_1")
    ys = checkpoint_name(grouped_matmul(activation(g) * u, down, sizes, matmul), "mlpwo")
    back = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return jnp.take(ys, back, axis=0)


def combine(ys, weights):
    """ys [N, k, H] (each token's k expert outputs), weights [N, k] → [N, H]: the k contributions
    added one by one in the compute dtype (HF: index_add_ expert by expert)."""
    out = ys[:, 0] * weights[:, :1]
    for j in range(1, ys.shape[1]):
        out = out + ys[:, j] * weights[:, j:j + 1]
    return out


def layer_stats(probs, chosen, real, dropped) -> dict:
    """One layer's router statistics over the real tokens (see the module docstring); `dropped`:
    the assignments the expert-parallel layout's capacity dropped (jaxsft.model.moe_parallel)."""
    mask = real.astype(jnp.float32)
    experts = probs.shape[-1]
    counts = jnp.zeros(experts, jnp.float32).at[chosen.reshape(-1)].add(jnp.repeat(mask, chosen.shape[-1]))
    counts = jax.lax.stop_gradient(counts)
    return {"expert_tokens": counts, "expert_probs": jnp.sum(probs * mask[:, None], axis=0), "tokens": jnp.sum(mask),
            "load_max_mean": jnp.max(counts) / jnp.maximum(jnp.mean(counts), 1e-9), "dropped": dropped}


def zero_stats(num_experts: int) -> dict:
    """The scan's starting sums ({} for a dense model: nothing is carried)."""
    if not num_experts:
        return {}
    z = jnp.zeros((), jnp.float32)
    return {"expert_tokens": jnp.zeros(num_experts, jnp.float32), "expert_probs": jnp.zeros(num_experts, jnp.float32),
            "tokens": z, "load_max_mean": z, "dropped": z}


def add_stats(acc: dict, layer: dict) -> dict:
    if not acc or not layer:  # a dense model, or a dense layer of a MoE model
        return acc
    return {k: jnp.maximum(acc[k], layer[k]) if k == "load_max_mean" else acc[k] + layer[k] for k in STATS}


def load_balancing_loss(stats: dict):
    """transformers' `load_balancing_loss_func(router_logits, E, k, attention_mask)`: E · Σ_e
    (share of assignments to e) · (mean probability of e), both over every sparse layer's real tokens."""
    rows = jnp.maximum(stats["tokens"], 1.0)
    experts = stats["expert_tokens"].shape[-1]
    return experts * jnp.sum((stats["expert_tokens"] / rows) * (stats["expert_probs"] / rows))
