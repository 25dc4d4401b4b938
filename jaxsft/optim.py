"""verl's optimizer: AdamW over every parameter, torch-style global-norm clipping, cosine / WSD lr.

The learning rate is not driven by optax's own step count: the train step sets it from its global
step each update (verl advances the scheduler even on skipped non-finite steps, while Adam's count
stays put), so `adamw` sits inside `optax.inject_hyperparams` and `apply_update` writes the lr.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

_TORCH_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_ divides by (norm + 1e-6)


def warmup_steps(total_steps: int, ratio: float, steps: int = -1) -> int:
    """verl: int(total × ratio); optim.lr_warmup_steps > 0 overrides it (verl's engine trainer)."""
    return steps if steps > 0 else int(total_steps * ratio)


def lr_multiplier(step, total_steps: int, warmup_steps: int, kind: str, min_lr_ratio: float = 0.0,
                  num_cycles: float = 0.5):
    """verl's λ(s) for scheduler counter s (0-based; traced or python int) as a float32 scalar
    (verl 0.7.0 `get_cosine_schedule_with_warmup` / `get_wsd_schedule_with_warmup`, m = min_lr_ratio,
    c = num_cycles).

    Warmup: s/W. cosine: max(m, m + (1 − m)·½(1 + cos(2π·c·p))), p = (s − W)/max(1, T − W). wsd:
    1 for 90% of the steps after warmup, then m + (1 − m)·max(0, ½(1 + cos(2π·c·p))) over the rest,
    and m from T on. For the half cosine (c = ½), ½(1 + cos(π·p)) is evaluated as sin²(π/2·(1 − p))
    with 1 − p formed from integers: identical in exact arithmetic, but float32 keeps full relative
    precision near the end of the decay, where the cosine form cancels to a few significant digits.
    """
    s = jnp.asarray(step, jnp.float32)
    warm = s / max(1, warmup_steps)

    def decay_from(start, length):  # m + (1 − m)·½(1 + cos(2π·c·(s − start)/length)), floored at m
        if num_cycles == 0.5:
            half = jnp.sin(0.5 * jnp.pi * ((start + length) - s) / length) ** 2
        else:
            half = 0.5 * (1.0 + jnp.cos(2.0 * jnp.pi * num_cycles * (s - start) / length))
        return min_lr_ratio + (1.0 - min_lr_ratio) * jnp.maximum(half, 0.0)

    if kind == "cosine":
        decay = decay_from(warmup_steps, max(1, total_steps - warmup_steps))
    elif kind == "wsd":
        remaining = max(0, total_steps - warmup_steps)
        stable = int(remaining * 0.9)
        cos = decay_from(warmup_steps + stable, max(1, remaining - stable))
        decay = jnp.where(s < warmup_steps + stable, 1.0, jnp.where(s < total_steps, cos, min_lr_ratio))
    else:
        raise ValueError(f"optim.lr_scheduler={kind!r} is not one of cosine, wsd")
    return jnp.where(s < warmup_steps, warm, decay)


def make_optimizer(optim_cfg, total_steps: int, param_dtype):
    """(tx, lr_schedule) for the optim settings; lr_schedule(g − 1) is the lr of optimizer step g (1-based).

    tx = torch-exact global-norm clipping, then AdamW (decay on every parameter, as verl's single
    param group). First moments use optim.mu_dtype, else the parameter dtype; second moments always
    take the parameter dtype (optax), as torch does.
    """
    w = warmup_steps(total_steps, optim_cfg.lr_warmup_steps_ratio, optim_cfg.lr_warmup_steps)
    base_lr, kind = float(optim_cfg.lr), optim_cfg.lr_scheduler
    m, c = float(optim_cfg.min_lr_ratio), float(optim_cfg.num_cycles)

    def lr_schedule(count):
        return base_lr * lr_multiplier(count, total_steps, w, kind, m, c)

    b1, b2 = (float(b) for b in optim_cfg.betas)
    # Only the lr is injected, and in float32: by default inject_hyperparams would store every float
    # hyperparameter in the parameter dtype, i.e. bfloat16 (b2 = 0.95 would become 0.9492).
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("b1", "b2", "eps", "eps_root", "weight_decay"),
                                     hyperparam_dtype=jnp.float32)
    max_norm = float(optim_cfg.clip_grad)
    adam = adamw(learning_rate=base_lr, b1=b1, b2=b2, eps=float(optim_cfg.eps),
                 weight_decay=float(optim_cfg.weight_decay), mu_dtype=jnp.dtype(optim_cfg.mu_dtype or param_dtype))
    chain = optax.chain(clip_by_global_norm_torch(max_norm), adam)
    return ClippedAdamW(chain.init, chain.update, max_norm, adam), lr_schedule


class ClippedAdamW(NamedTuple):
    """`optax.chain(clip_by_global_norm_torch(max_norm), adamw)` (init, update: an optax
    GradientTransformation; state = (EmptyState, AdamW's state)) with its two parts kept: the
    streamed update of jaxsft.offload clips by the global norm once and applies `adamw` to one
    part of the tree at a time."""
    init: Callable
    update: Callable
    max_norm: float
    adamw: optax.GradientTransformation


def global_norm(tree):
    """L2 norm over every leaf, accumulated in float32 whatever the leaf dtype."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """grads · min(1, max_norm / (norm + 1e-6)), exactly torch.nn.utils.clip_grad_norm_.

    optax.clip_by_global_norm scales by max_norm / norm instead; the 1e-6 matters for parity.
    """

    def update(updates, state, params=None):
        del params
        return clipped(updates, clip_factor(global_norm(updates), max_norm)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def clip_factor(norm, max_norm: float):
    """torch's clip_grad_norm_ scale for a gradient of global norm `norm`."""
    return jnp.minimum(1.0, max_norm / (norm + _TORCH_CLIP_EPS))


def clipped(grads, factor):
    return jax.tree.map(lambda g: (g * factor).astype(g.dtype), grads)


def set_learning_rate(opt_state, lr):
    """opt_state with the injected AdamW lr replaced (tx from make_optimizer)."""
    clip_state, adam_state = opt_state
    hyper = dict(adam_state.hyperparams, learning_rate=jnp.asarray(lr, jnp.float32))
    return clip_state, adam_state._replace(hyperparams=hyper)


def apply_update(tx, params, opt_state, grads, lr):
    """One AdamW step at `lr` -> (new_params, new_opt_state, grad_norm, finite).

    grad_norm is the pre-clip global norm (float32). When it is NaN/Inf the update is skipped as in
    verl: params and the whole opt_state (moments, Adam count) come back unchanged; the caller still
    advances its global step, so the next lr follows the schedule.
    """
    grad_norm = global_norm(grads)
    finite = jnp.isfinite(grad_norm)
    updates, new_state = tx.update(grads, set_learning_rate(opt_state, lr), params)
    new_params = optax.apply_updates(params, updates)

    def keep_if_finite(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    return keep_if_finite(new_params, params), keep_if_finite(new_state, opt_state), grad_norm, finite
