"""The pre-norm decoder-only causal LM in Flax NNX, numerically following transformers'
Qwen2 / Qwen3 / Llama / Mistral / Gemma ForCausalLM: one decoder, the family's pieces (biases, q/k
norm, MLP activation, RMSNorm weight as 1 + w, embedding scale) chosen by `ModelConfig`.

Module and parameter names mirror HF's (`layers.self_attn.q_proj.kernel` is
`model.layers.{i}.self_attn.q_proj.weight` transposed), so HF conversion is a transpose and a
per-layer slice; `jaxsft.hf` holds the name map.

Layers: the decoder layer's parameters are created ONCE, STACKED with a leading layer axis
(`layers.*` have shape [L, ...]). The forward pass does `nnx.split(self.layers)` and either
`jax.lax.scan`s over the stacked state (scan_layers=True) or splits it into L slices and runs a
Python loop (scan_layers=False); each step `nnx.merge`s one layer's slice into the layer module
and runs it under `jax.checkpoint` with the configured remat policy. Both paths use the same
parameter tree, so checkpoints do not depend on the setting.

Precision: parameters are stored in `param_dtype` and cast to `compute_dtype` where used (as
verl's FSDP mixed precision does); RMSNorm statistics, RoPE tables and attention softmax are
float32, as in transformers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxsft import parallel
from jaxsft.errors import ConfigError
from jaxsft.model import attention as attn
from jaxsft.model import lora as lora_lib
from jaxsft.model import moe, moe_parallel, remat, sink_scan
from jaxsft.model.config import ModelConfig, rope_frequencies
from jaxsft.model.grouped_matmul import MATMULS
from jaxsft.model.loss import head_logits
from jaxsft.settings import LoRASettings, ModelSettings

DTYPES = ("float32", "bfloat16")
_ACT = ("batch", "length", None)  # logical layout of the residual stream [B, T, H]
# HF's ACT2FN names: gelu_pytorch_tanh is GeLU's tanh approximation (Gemma)
_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def check_settings(settings: ModelSettings) -> None:
    """ValueError naming the key for a choice this model cannot compute (jaxsft.config reports the
    same checks as ConfigErrors before anything is built)."""
    for key, value in (("model.param_dtype", settings.param_dtype), ("model.compute_dtype", settings.compute_dtype)):
        if value not in DTYPES:
            raise ValueError(f"{key}={value!r}: choose one of {', '.join(DTYPES)}")
    remat.check_policy(settings.remat_policy)
    attn.check_backend(settings.attn_implementation)
    coef = settings.router_aux_loss_coef
    if coef is not None and not coef >= 0:
        raise ValueError(f"model.router_aux_loss_coef={coef!r}: choose a number >= 0 (0 = no load-balancing loss)")
    if settings.expert_matmul not in MATMULS:
        raise ValueError(f"model.expert_matmul={settings.expert_matmul!r}: choose one of {', '.join(MATMULS)}")
    if settings.expert_layout not in moe_parallel.LAYOUTS:
        raise ValueError(f"model.expert_layout={settings.expert_layout!r}: choose one of "
                         f"{', '.join(moe_parallel.LAYOUTS)}")


def check_lora_targets(config: ModelConfig, settings: ModelSettings) -> None:
    """A ConfigError naming the key for LoRA targets this model does not have (jaxsft.setup calls
    it before the data work)."""
    if settings.lora is not None and settings.lora.parameters and not config.num_experts:
        raise ConfigError(f"model.target_parameters={list(settings.lora.parameters)}: these are the routed experts of a "
                         f"mixture-of-experts model; {config.model_type} has none (use model.target_modules)")
    if config.num_experts and settings.lora is not None and set(settings.lora.targets) & _MOE_MLP:
        raise ConfigError(f"model.lora target_modules {sorted(set(settings.lora.targets) & _MOE_MLP)}: LoRA on a "
                         f"{config.model_type} model's experts is model.target_parameters "
                         f"(mlp.experts.gate_up_proj, mlp.experts.down_proj, as PEFT's); model.target_modules takes "
                         f"the attention projections (q_proj, k_proj, v_proj, o_proj)")


_MOE_MLP = {"gate_proj", "up_proj", "down_proj", "gate"}


def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias) (+ the LoRA term). kernel [*stack, in, out] is HF's weight [out, in]
    transposed; with `lora`, lora_a [*stack, in, r] and lora_b [*stack, r, out] (float32) as well."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, bias: bool, stack: tuple[int, ...],
                 dtype, rngs: nnx.Rngs, lora: LoRASettings | None = None):
        lead = ("layers",) * len(stack)
        self.kernel = nnx.Param(_normal(rngs, (*stack, d_in, d_out), dtype), axes=(*lead, *axes))
        self.bias = nnx.Param(jnp.zeros((*stack, d_out), dtype), axes=(*lead, axes[1])) if bias else None
        self.lora = lora
        self.lora_a = None if lora is None else nnx.Param(lora_lib.initial_a(rngs.params(), (*stack, d_in, lora.rank)),
                                                          axes=(*lead, axes[0], None))
        self.lora_b = None if lora is None else nnx.Param(jnp.zeros((*stack, lora.rank, d_out), jnp.float32),
                                                          axes=(*lead, None, axes[1]))

    def __call__(self, x, key=None):
        y = x @ self.kernel[...].astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        if self.lora is not None:
            y = y + lora_lib.delta(x, self.lora_a[...], self.lora_b[...], self.lora, key)
        return y


def _lora_for(settings: ModelSettings, module: str):
    return settings.lora if settings.lora is not None and module in settings.lora.targets else None


class RMSNorm(nnx.Module):
    """HF's Qwen2/Llama RMSNorm: normalise in float32, cast back, then multiply by the weight. With
    `unit_offset` (GemmaRMSNorm): multiply by (1 + weight) in float32, then cast; the weight starts at 0."""

    def __init__(self, dim: int, eps: float, *, stack: tuple[int, ...], dtype, unit_offset: bool = False,
                 axis: str | None = "embed"):
        init = jnp.zeros if unit_offset else jnp.ones
        self.scale = nnx.Param(init((*stack, dim), dtype), axes=(*("layers",) * len(stack), axis))
        self.eps, self.unit_offset = eps, unit_offset

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def _norm(config: ModelConfig, dim: int, **kw) -> RMSNorm:
    return RMSNorm(dim, config.rms_norm_eps, unit_offset=config.unit_offset_norm, **kw)


def rope_tables(config: ModelConfig, positions, dtype):
    """cos, sin [B, T, head_dim] for integer positions [B, T]: float32 math, then cast (as HF)."""
    inv_freq, scaling = rope_frequencies(config)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * scaling).astype(dtype), (jnp.sin(emb) * scaling).astype(dtype)


def apply_rope(x, cos, sin):
    """x [B, T, H, D]; HF's rotate_half convention (halves, not interleaved pairs)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, settings: ModelSettings, *, stack, dtype, rngs):
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        q, kv = self.num_heads * d, self.num_kv_heads * d
        common = dict(stack=stack, dtype=dtype, rngs=rngs)
        bias = config.qkv_bias
        self.q_proj = Linear(h, q, ("embed", "q_heads"), bias=bias, lora=_lora_for(settings, "q_proj"), **common)
        self.k_proj = Linear(h, kv, ("embed", "kv_heads"), bias=bias, lora=_lora_for(settings, "k_proj"), **common)
        self.v_proj = Linear(h, kv, ("embed", "kv_heads"), bias=bias, lora=_lora_for(settings, "v_proj"), **common)
        self.o_proj = Linear(q, h, ("q_heads", "embed"), bias=config.o_bias, lora=_lora_for(settings, "o_proj"),
                             **common)
        # Qwen3: RMSNorm over each head's head_dim on q and k, before RoPE
        norm = dict(stack=stack, dtype=dtype, axis=None)
        self.q_norm = _norm(config, d, **norm) if config.qk_norm else None
        self.k_norm = _norm(config, d, **norm) if config.qk_norm else None
        self.implementation = settings.attn_implementation

    def __call__(self, x, cos, sin, segment_ids, key=None):
        b, t, _ = x.shape
        k_ = lora_lib.sub_key
        q = checkpoint_name(self.q_proj(x, k_(key, 0)), "query_proj").reshape(b, t, self.num_heads, self.head_dim)
        k = checkpoint_name(self.k_proj(x, k_(key, 1)), "key_proj").reshape(b, t, self.num_kv_heads, self.head_dim)
        v = checkpoint_name(self.v_proj(x, k_(key, 2)), "value_proj").reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        ctx = attn.attention(q, k, v, segment_ids, implementation=self.implementation)
        ctx = checkpoint_name(ctx, "context").reshape(b, t, self.num_heads * self.head_dim)
        return checkpoint_name(self.o_proj(ctx, k_(key, 3)), "out_proj")


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, settings: ModelSettings, *, stack, dtype, rngs, inner: int | None = None):
        h, i = config.hidden_size, inner or config.intermediate_size
        common = dict(bias=config.mlp_bias, stack=stack, dtype=dtype, rngs=rngs)
        self.hidden_act = config.hidden_act
        self.gate_proj = Linear(h, i, ("embed", "mlp"), lora=_lora_for(settings, "gate_proj"), **common)
        self.up_proj = Linear(h, i, ("embed", "mlp"), lora=_lora_for(settings, "up_proj"), **common)
        self.down_proj = Linear(i, h, ("mlp", "embed"), lora=_lora_for(settings, "down_proj"), **common)

    def __call__(self, x, key=None):
        k_ = lora_lib.sub_key
        gate = checkpoint_name(self.gate_proj(x, k_(key, 4)), "mlpwi_0")
        up = checkpoint_name(self.up_proj(x, k_(key, 5)), "mlpwi_1")
        return checkpoint_name(self.down_proj(_ACTIVATIONS[self.hidden_act](gate) * up, k_(key, 6)), "mlpwo")


class DecoderLayer(nnx.Module):
    """One pre-norm decoder layer; built with stack=(L,) it holds all L layers' parameters, and a
    merged one-layer slice of its state runs one layer."""

    def __init__(self, config: ModelConfig, settings: ModelSettings, *, stack, dtype, rngs):
        norm = dict(stack=stack, dtype=dtype)
        self.input_layernorm = _norm(config, config.hidden_size, **norm)
        self.self_attn = Attention(config, settings, stack=stack, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = _norm(config, config.hidden_size, **norm)
        self.sparse = bool(config.num_experts)
        common = dict(stack=stack, dtype=dtype, rngs=rngs)
        if not self.sparse:
            self.mlp = MLP(config, settings, **common)
            return
        shared = shared_gate = None
        if config.shared_expert_intermediate_size:  # qwen2_moe: a dense MLP every token runs, gated
            shared = MLP(config, settings, inner=config.shared_expert_intermediate_size, **common)
            shared_gate = Linear(config.hidden_size, 1, ("embed", None), bias=False, **common)
        self.mlp = moe_parallel.SparseMoE(config, **common, activation=_ACTIVATIONS[config.hidden_act],
                                          layout=settings.expert_layout,
                                          capacity_factor=settings.expert_capacity_factor,
                                          matmul=settings.expert_matmul, shared_expert=shared,
                                          shared_expert_gate=shared_gate, lora=settings.lora)

    def __call__(self, x, cos, sin, segment_ids, key=None):
        """`key`: this layer's LoRA-dropout key (None: no dropout). Returns (x, router stats: {}
        for a dense MLP)."""
        x = checkpoint_name(x, "decoder_layer_input")
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, key)
        h = self.post_attention_layernorm(x)
        y, stats = self.mlp(h, segment_ids != 0) if self.sparse else (self.mlp(h, key), {})
        return parallel.constrain(x + y, _ACT), stats


class Embed(nnx.Module):
    """The token embedding; with `pad_id`, the lookup sends no gradient to that row, as torch's
    nn.Embedding(padding_idx=pad_token_id) in transformers (a tied head's use of the row still does)."""

    def __init__(self, vocab: int, dim: int, *, dtype, rngs, pad_id: int | None = None):
        self.embedding = nnx.Param(_normal(rngs, (vocab, dim), dtype), axes=("vocab", "embed"))
        self.pad_id = pad_id

    def __call__(self, ids):
        rows = jnp.take(self.embedding[...], ids, axis=0)
        if self.pad_id is None:
            return rows
        return jnp.where((ids == self.pad_id)[..., None], jax.lax.stop_gradient(rows), rows)


class CausalLM(nnx.Module):
    def __init__(self, config: ModelConfig, settings: ModelSettings, *, rngs: nnx.Rngs):
        check_settings(settings)
        check_lora_targets(config, settings)
        self.config, self.settings = config, settings
        dtype = jnp.dtype(settings.param_dtype)
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs,
                                  pad_id=config.pad_token_id)
        # a MoE model with dense layers: its sparse layers stacked in `layers`, the dense in `dense_layers`
        dense = len(config.dense_layers)
        self.layers = DecoderLayer(config, settings, stack=(config.num_hidden_layers - dense,), dtype=dtype, rngs=rngs)
        self.dense_layers = DecoderLayer(dataclasses.replace(config, num_experts=0), settings, stack=(dense,),
                                         dtype=dtype, rngs=rngs) if dense else None
        self.norm = _norm(config, config.hidden_size, stack=(), dtype=dtype)
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size, ("embed", "vocab"), bias=False, stack=(), dtype=dtype, rngs=rngs)

    def __call__(self, input_ids, positions, segment_ids, dropout_key=None):
        """Logits [B, T, V] in the compute dtype."""
        hidden = self.hidden_states(input_ids, positions, segment_ids, dropout_key)
        head, vocab_axis = self.lm_head_weight()
        return head_logits(hidden, head.astype(hidden.dtype), vocab_axis)

    def lm_head_weight(self):
        """(LM head, its vocabulary axis) in the parameter dtype: the kernel [H, V] (axis 1), or
        when tied the embedding [V, H] itself (axis 0), which `jaxsft.model.loss` contracts over H
        in place (a transposed table crashes XLA:CPU in bfloat16, see `loss.head_logits`)."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...], 0
        return self.lm_head.kernel[...], 1

    def lm_head_kernel(self):
        """[H, V] in the parameter dtype (the embedding transposed when tied); for inspection, the
        step uses `lm_head_weight`."""
        head, vocab_axis = self.lm_head_weight()
        return head.T if vocab_axis == 0 else head

    def hidden_states(self, input_ids, positions, segment_ids, dropout_key=None, grad_sink=None):
        """[B, T, H] after the final norm, in the compute dtype. segment_ids == 0 marks padding.
        `dropout_key`: LoRA dropout's key for this micro-batch (None: no dropout, as in evaluation).
        grad_sink: see `_decoder` (trainer's gradient accumulation only)."""
        return self.hidden_states_and_router(input_ids, positions, segment_ids, dropout_key, grad_sink)[0]

    def hidden_states_and_router(self, input_ids, positions, segment_ids, dropout_key=None, grad_sink=None):
        """(`hidden_states`, the router statistics summed over the layers: jaxsft.model.moe; {} for
        a dense model)."""
        dtype = jnp.dtype(self.settings.compute_dtype)
        x = self.embed_tokens(input_ids).astype(dtype)
        if self.config.scale_embeddings:  # Gemma: × sqrt(hidden), rounded to float32 then to the dtype (as HF)
            x = x * jnp.asarray(np.float32(self.config.hidden_size ** 0.5), dtype)
        x = parallel.constrain(x, _ACT)
        cos, sin = rope_tables(self.config, positions, dtype)
        x, stats = self._decoder((x, moe.zero_stats(self.config.num_experts)), cos, sin, segment_ids, dropout_key,
                                 grad_sink)
        return self.norm(x), stats

    @property
    def router_aux_loss_coef(self) -> float:
        """The load-balancing loss's weight: model.router_aux_loss_coef, else config.json's (0: dense)."""
        coef = self.settings.router_aux_loss_coef
        return float(self.config.router_aux_loss_coef if coef is None else coef) if self.config.num_experts else 0.0

    def _decoder(self, x, cos, sin, segment_ids, dropout_key=None, grad_sink=None):
        """x: the carry (residual stream, router stats sums) → the same after the L layers.
        grad_sink (scan_layers with remat `full`, no LoRA dropout, one stack of layers): the running
        sum of the stacked layers' gradients, which the backward pass adds into in place
        (jaxsft.model.sink_scan). A model with dense and sparse layers runs each run of consecutive
        layers of one kind from its stack (`ModelConfig.layer_slots`)."""
        n = self.config.num_hidden_layers
        keys = None if dropout_key is None else jax.random.split(dropout_key, n)
        stacks = {"layers": nnx.split(self.layers)}
        if grad_sink is not None:
            if not (self.settings.scan_layers and self.settings.remat_policy == "full") or keys is not None \
                    or self.dense_layers is not None:
                raise ValueError("a gradient sink needs scan_layers and remat_policy=full, no LoRA dropout and one "
                                 "stack of layers")
            graphdef, stacked = stacks["layers"]
            return sink_scan.scan_with_sink(lambda h, p, *c: _layer(graphdef)(h, p, None, *c), x, stacked,
                                            (cos, sin, segment_ids), grad_sink)
        if self.dense_layers is None:
            return self._run(x, *stacks["layers"], keys, cos, sin, segment_ids)
        stacks["dense_layers"] = nnx.split(self.dense_layers)
        for stack, first, count, layer0 in _runs(self.config.layer_slots()):
            graphdef, stacked = stacks[stack]
            part = jax.tree.map(lambda a: a[first:first + count], stacked)
            x = self._run(x, graphdef, part, None if keys is None else keys[layer0:layer0 + count], cos, sin,
                          segment_ids)
        return x

    def _run(self, x, graphdef, stacked, keys, cos, sin, segment_ids):
        """The layers of `stacked` (a stack's state, [n, ...] leaves) in order, scanned or unrolled."""
        layer, policy = _layer(graphdef), self.settings.remat_policy
        n = jax.tree.leaves(stacked)[0].shape[0]
        if self.settings.scan_layers:
            step = remat.remat(layer, policy, prevent_cse=False)
            x, _ = jax.lax.scan(lambda h, p: (step(h, p[0], p[1], cos, sin, segment_ids), None), x, (stacked, keys))
            return x
        # jnp.split (not indexing) so the backward pass concatenates the L slices' gradients once.
        leaves, treedef = jax.tree.flatten(stacked)
        per_leaf = [[s[0] for s in jnp.split(a, a.shape[0])] for a in leaves]
        step = remat.remat(layer, policy)
        for i in range(n):
            x = step(x, treedef.unflatten([slices[i] for slices in per_leaf]), None if keys is None else keys[i],
                     cos, sin, segment_ids)
        return x


def _layer(graphdef):
    """One layer of the stack `graphdef`: (carry, its params, dropout key, cos, sin, segment_ids) → carry."""
    def layer(carry, params, key, cos, sin, segment_ids):
        h, stats = nnx.merge(graphdef, params)(carry[0], cos, sin, segment_ids, key)
        return h, moe.add_stats(carry[1], stats)

    return layer


def _runs(slots) -> list[tuple[str, int, int, int]]:
    """(stack, first index there, count, first layer) of each run of consecutive layers in one stack."""
    runs: list[list] = []
    for i, (stack, j) in enumerate(slots):
        if runs and runs[-1][0] == stack:
            runs[-1][2] += 1
        else:
            runs.append([stack, j, 1, i])
    return [tuple(r) for r in runs]
