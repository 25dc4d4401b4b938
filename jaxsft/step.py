"""The jitted train and eval steps.

One optimizer step = `lax.scan` over the K micro-batches of a global batch `[K, rows, T]`, summing
float32 gradients of the (already normalised) micro-batch losses, then one clipped AdamW update at
the lr of the global step. Normalisation (`trainer.loss_normalization`):

- `global_tokens`: Σ masked token losses over the global batch ÷ the global count of loss tokens.
  The count is known before the forward pass, so every micro-batch's loss is divided by it and the
  result is independent of the micro-batch split and of the mesh.
- `verl`: verl's per-micro-step formulas (semantics doc §3.1–3.2). Rows of micro-batch k are laid
  out rank by rank (`dp` blocks of `micro_batch_size_per_gpu` rows), so the cells (rank r,
  micro-step k) are recovered by a reshape. `balance_dp_token=False`: mean over cells of each
  cell's token mean. `balance_dp_token=True`: mean over micro-steps of the token mean across ranks.
  verl's sp>1 factor (issue #1963) is not reproduced.

The token loss is `trainer.loss_type`'s (cross-entropy, or DFT: jaxsft.model.loss); the
normalisations above apply to it unchanged. With several mixed training files
(`data.train_weights`) the batch carries each token's source file (`source_ids`) and the step also
returns the loss sums and loss-token counts by source, added up in the same pass as the loss.

A mixture-of-experts model adds its router's load-balancing loss (jaxsft.model.moe) times
`router_aux_loss_coef` to the objective, as transformers does with `output_router_logits`: computed
on each (global) micro-batch as one forward pass of transformers would, and averaged over the K
micro-batches. The `loss` metric stays the token loss; `router_aux_loss` (unweighted, the mean
over micro-batches) and `expert_load_max_mean` (the worst layer's busiest expert over its mean
load, the worst micro-batch) come beside it, and `expert_dropped` (the expert-parallel layout's
assignments over capacity, summed over layers and micro-batches; 0 without a capacity factor).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsft import offload, optim
from jaxsft.model import moe
from jaxsft.model.loss import masked_loss_sums
from jaxsft.train_state import abstract_train_state, init_train_state  # noqa: F401 (part of this API)
from jaxsft.trainable import EVERYTHING, Partition

Batch = dict[str, jax.Array]


def shift_targets(input_ids, segment_ids, loss_mask):
    """Next-token targets and weights: the prediction at t counts iff token t+1 is a target of the
    same (non-padding) sample. Shapes [..., T]; the last position never counts."""
    targets = jnp.concatenate([input_ids[..., 1:], jnp.zeros_like(input_ids[..., :1])], axis=-1)
    same_sample = (segment_ids[..., 1:] == segment_ids[..., :-1]) & (segment_ids[..., 1:] != 0)
    w = (loss_mask[..., 1:] != 0) & same_sample
    weights = jnp.concatenate([w, jnp.zeros_like(w[..., :1])], axis=-1).astype(jnp.float32)
    return targets, weights


@dataclasses.dataclass(frozen=True)
class StepConfig:
    loss_normalization: str  # global_tokens | verl
    balance_dp_token: bool
    dp: int  # data-parallel size (rows of a micro-batch come in dp blocks)
    chunk_size: int  # cross-entropy chunk (tokens)
    dropout_seed: int | None = None  # LoRA dropout: keys from (seed, step, micro-batch); None = no dropout
    grad_accum_dtype: str = "float32"  # the sum of micro-batch gradients (K > 1): float32 | bfloat16
    # K > 1: the backward pass adds the layer gradients into the running sum in place (one
    # weight-sized buffer fewer); needs scan_layers and remat `full` (jaxsft.model.sink_scan), and
    # full fine-tuning without LoRA dropout (otherwise the step sums as usual)
    accumulate_in_backward: bool = False
    loss_type: str = "ce"  # trainer.loss_type: ce | dft
    num_sources: int = 0  # > 0: the batch has `source_ids` and the step returns per-source sums (source_count)

    @classmethod
    def of(cls, settings, mesh) -> "StepConfig":
        t, lora = settings.trainer, settings.model.lora
        return cls(loss_normalization=t.loss_normalization, balance_dp_token=settings.data.balance_dp_token, dp=mesh.shape["dp"],
                   chunk_size=t.loss_chunk_size, dropout_seed=t.seed if lora is not None and lora.dropout > 0 else None,
                   grad_accum_dtype=settings.optim.grad_accum_dtype,
                   accumulate_in_backward=accumulates_in_backward(settings.model), loss_type=t.loss_type,
                   num_sources=source_count(settings.data))


def source_count(data_settings) -> int:
    """Sources the step reports the loss of: the training files when several are mixed
    (data.train_weights), else 0 (none, and no `source_ids` in the batch)."""
    files, weights = data_settings.train_files, data_settings.train_weights
    return len(files) if weights is not None and len(files) > 1 else 0


def accumulates_in_backward(model_settings) -> bool:
    """Whether the train step can add layer gradients into the running sum during the backward
    pass (jaxsft.model.sink_scan): scanned layers under the `full` policy, without LoRA (whose
    adapters are all that trains, so there is no weight-sized sum to save)."""
    return (model_settings.scan_layers and model_settings.remat_policy == "full"
            and getattr(model_settings, "lora", None) is None)


class MicroTerms(NamedTuple):
    """One micro-batch's forward: per-row (Σ masked token losses, Σ weights), the loss sums by
    source [num_sources] (empty when 0), the weighted router loss to add to the objective (0.0 for
    a dense model or a weight of 0) and the router metrics ({} for a dense model), in float32."""
    loss_rows: jax.Array
    w_rows: jax.Array
    by_source: jax.Array
    router_loss: Any
    router: dict


def row_losses(graphdef, params, rest, mb: Batch, chunk_size: int, dropout_key=None, grad_sink=None,
               loss_type: str = "ce", num_sources: int = 0):
    """Per-row (Σ masked token losses, Σ weights) of one micro-batch [rows, T], and the loss sums
    by source [num_sources] (from mb["source_ids"]; empty when num_sources is 0), in float32."""
    return micro_batch_terms(graphdef, params, rest, mb, chunk_size, dropout_key, grad_sink, loss_type,
                             num_sources)[:3]


def micro_batch_terms(graphdef, params, rest, mb: Batch, chunk_size: int, dropout_key=None, grad_sink=None,
                      loss_type: str = "ce", num_sources: int = 0) -> MicroTerms:
    """The MicroTerms of one micro-batch [rows, T]."""
    model = nnx.merge(graphdef, params, rest)
    hidden, stats = model.hidden_states_and_router(mb["input_ids"], mb["positions"], mb["segment_ids"], dropout_key,
                                                   grad_sink=grad_sink)
    targets, weights = shift_targets(mb["input_ids"], mb["segment_ids"], mb["loss_mask"])
    head, vocab_axis = model.lm_head_weight()
    groups = mb["source_ids"] if num_sources else None
    loss_rows, w_rows, by_source = masked_loss_sums(hidden, head, targets, weights, chunk_size, vocab_axis, loss_type,
                                                    groups, max(num_sources, 1))
    by_source = by_source[:num_sources]
    if not stats:
        return MicroTerms(loss_rows, w_rows, by_source, 0.0, {})
    aux = moe.load_balancing_loss(stats)
    coef = model.router_aux_loss_coef
    router = {"router_aux_loss": jax.lax.stop_gradient(aux), "expert_load_max_mean": stats["load_max_mean"],
              "expert_dropped": stats["dropped"]}
    return MicroTerms(loss_rows, w_rows, by_source, coef * aux if coef else 0.0, router)


def source_tokens(batch: Batch, weights, num_sources: int):
    """Loss tokens by source [num_sources] of a batch whose token weights are `weights`."""
    return jax.ops.segment_sum(weights.reshape(-1), batch["source_ids"].reshape(-1), num_segments=num_sources)


def _zero_sums(num_sources: int, sparse: bool) -> dict:
    """The running sums of `accumulate_gradients`' micro-batch metrics before the first one."""
    zero = jnp.zeros((), jnp.float32)
    sums = {"loss": zero}
    if num_sources:
        sums["source_loss_sums"] = jnp.zeros((num_sources,), jnp.float32)
    if sparse:
        sums |= {"router_aux_loss": zero, "expert_load_max_mean": zero, "expert_dropped": zero}
    return sums


def _add(sums: dict, m: dict) -> dict:
    """Micro-batch metrics summed, except the load imbalance: its worst micro-batch."""
    return {k: jnp.maximum(sums[k], m[k]) if k == "expert_load_max_mean" else sums[k] + m[k] for k in sums}


def _micro_objective(loss_rows, w_rows, total_weight, cfg: StepConfig, num_micro: int):
    """This micro-batch's contribution to the step objective (so the step loss is their sum)."""
    if cfg.loss_normalization == "global_tokens":
        return jnp.sum(loss_rows) / jnp.maximum(total_weight, 1.0)
    # verl: cells (rank, micro-step); 1e-8 as in verl so an empty cell contributes 0, not NaN.
    s = loss_rows.reshape(cfg.dp, -1).sum(axis=1)
    n = w_rows.reshape(cfg.dp, -1).sum(axis=1)
    if cfg.balance_dp_token:
        return jnp.sum(s) / (jnp.sum(n) + 1e-8) / num_micro
    return jnp.sum(s / (n + 1e-8)) / (cfg.dp * num_micro)


def accumulate_gradients(graphdef, rest, params, batch: Batch, cfg: StepConfig, partition: Partition = EVERYTHING,
                         dropout_key=None):
    """Σ over the K micro-batches of the normalised loss and its gradients with respect to
    `partition`'s trainable part, summed in cfg.grad_accum_dtype (with K = 1 the gradients stay
    in the parameter dtype): returns (loss, grads, loss-token count, extra metrics). The loss is the
    token-loss part of the objective. The extra metrics: `source_loss_sums` and `source_loss_tokens`
    [num_sources] when cfg.num_sources > 0, the router metrics of a mixture-of-experts model (see the
    module docstring); {} otherwise. `dropout_key`: the step's LoRA dropout key (micro-batch k uses
    fold_in(key, k))."""
    num_micro = batch["input_ids"].shape[0]
    _, all_w = shift_targets(batch["input_ids"], batch["segment_ids"], batch["loss_mask"])
    total_weight = jnp.sum(all_w)
    trainable = partition.select(params)
    per_source = cfg.num_sources > 0

    def finish(sums, grads):
        extra = dict(sums)
        loss = extra.pop("loss")
        if per_source:
            extra["source_loss_tokens"] = source_tokens(batch, all_w, cfg.num_sources)
        if "router_aux_loss" in extra:  # the mean over micro-batches
            extra["router_aux_loss"] = extra["router_aux_loss"] / num_micro
        return loss, grads, total_weight, extra

    def micro(p, mb, key=None, sink=None):
        """(this micro-batch's objective, its metrics to add up: see `_zero_sums`)."""
        t = micro_batch_terms(graphdef, p, rest, mb, cfg.chunk_size, key, sink, cfg.loss_type, cfg.num_sources)
        loss = _micro_objective(t.loss_rows, t.w_rows, total_weight, cfg, num_micro)
        m = {"loss": loss, **t.router}
        if per_source:
            m["source_loss_sums"] = t.by_source
        return loss + t.router_loss / num_micro, m

    def objective(t, mb, k):
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, k)
        return micro(partition.merge(params, t), mb, key)

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if num_micro == 1:  # nothing to sum: skip the accumulator (28 GiB in float32 for a 7B)
        (_, sums), grads = grad_fn(trainable, jax.tree.map(lambda x: x[0], batch), 0)
        return finish(sums, grads)

    acc_dtype = jnp.dtype(cfg.grad_accum_dtype)
    # the in-backward sum needs the whole parameter tree as the trainable part, no dropout keys and one stack
    model_config = nnx.merge(graphdef, params, rest).config
    in_backward = cfg.accumulate_in_backward and partition.whole and dropout_key is None and not model_config.dense_layers

    def accumulate(carry, mb_k):
        sums, grad_sum = carry
        if in_backward:  # the layers' "gradient" of the sink is the new running sum
            (_, m), (grads, layers_sum) = jax.value_and_grad(
                lambda p, sink: micro(p, mb_k[0], sink=sink), argnums=(0, 1), has_aux=True)(
                trainable, grad_sum["layers"])
        else:
            (_, m), grads = grad_fn(trainable, *mb_k)
        grad_sum = jax.tree.map(lambda a, g: a + g.astype(acc_dtype), grad_sum, grads)
        if in_backward:
            grad_sum["layers"] = layers_sum
        return (_add(sums, m), grad_sum), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, acc_dtype), trainable)
    sparse = model_config.num_experts > 0
    (sums, grads), _ = jax.lax.scan(accumulate, (_zero_sums(cfg.num_sources, sparse), zeros),
                                    (batch, jnp.arange(num_micro)))
    return finish(sums, grads)


def make_train_step(graphdef, rest, tx, lr_schedule: Callable, cfg: StepConfig, partition: Partition = EVERYTHING,
                    opt_state_shardings=None):
    """Returns `train_step(state, batch) -> (state, metrics)`; state = {params, opt_state, step}.

    `state["step"]` counts optimizer steps taken (skipped non-finite ones included), so the step
    about to run is g = step + 1 and uses lr_schedule(step) (verl: lr·λ(g−1)). Only `partition`'s
    trainable part is updated. `opt_state_shardings` (from init_train_state): moments kept in
    host memory are streamed through the devices for the update (`offload.streamed_update`).
    """
    stream = offload.is_offloaded(opt_state_shardings)

    def train_step(state: dict[str, Any], batch: Batch):
        params = state["params"]
        key = None if cfg.dropout_seed is None else jax.random.fold_in(jax.random.key(cfg.dropout_seed), state["step"])
        loss, grads, total_weight, extra = accumulate_gradients(graphdef, rest, params, batch, cfg, partition, key)
        lr = lr_schedule(state["step"])
        if stream:  # the moments in host memory: through the device a layer at a time (jaxsft.offload)
            update = offload.streamed_update(tx, partition.select(params), state["opt_state"], grads, lr,
                                             opt_state_shardings)
        else:
            update = optim.apply_update(tx, partition.select(params), state["opt_state"], grads, lr)
        new_trainable, new_opt_state, grad_norm, _ = update
        new_state = {"params": partition.merge(params, new_trainable), "opt_state": new_opt_state,
                     "step": state["step"] + 1}
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "loss_tokens": total_weight, **extra}
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, rest, chunk_size: int, loss_type: str = "ce"):
    """Returns `eval_step(params, batch [rows, T]) -> (Σ masked token losses, Σ loss tokens)`:
    validation loss is token-weighted over all samples (the caller sums both and divides once),
    of the training's token loss (`loss_type`, as TRL evaluates a DFT run)."""

    def eval_step(params, batch: Batch):
        loss_rows, w_rows, _ = row_losses(graphdef, params, rest, batch, chunk_size, loss_type=loss_type)
        return jnp.sum(loss_rows), jnp.sum(w_rows)

    return eval_step


def compile_steps(graphdef, rest, tx, lr_schedule, cfg: StepConfig, shardings, mesh, partition: Partition = EVERYTHING):
    """(train_step, eval_step) jitted: the train step donates the state and keeps its shardings
    (and memory kinds)."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    train_step = jax.jit(make_train_step(graphdef, rest, tx, lr_schedule, cfg, partition, shardings["opt_state"]),
                         donate_argnums=0, out_shardings=(shardings, replicated))
    return train_step, jax.jit(make_eval_step(graphdef, rest, cfg.chunk_size, cfg.loss_type))


def evaluate(eval_step, params, batches) -> tuple[float, float]:
    """(Σ masked CE, Σ loss tokens) over `batches` (global arrays): divide once for the mean."""
    total = count = 0.0
    for batch in batches:
        s, n = eval_step(params, batch)
        total, count = total + float(s), count + float(n)
    return total, count
