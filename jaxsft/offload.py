"""Optimizer-state offload (`model.fsdp_config.optimizer_offload`, verl's FSDP-engine key; seed 003's
`adam_offload`): the Adam moments live in host memory and are streamed through the device for the
update, a part of the tree at a time.

The moments' shardings keep their FSDP layout but take the `pinned_host` memory kind. The jitted
train step computes the gradients with no optimizer state on the device, clips them by their global
norm, then updates (`streamed_update`):

- every stacked `[L, ...]` layer parameter in one `lax.scan` over the layers: each iteration copies
  one layer's moments to the device and its new moments back into the host arrays, updating
  parameters and moments in place;
- each other parameter (embeddings, lm_head, final norm) whole, its moments copied in and out.

The device so holds the parameters, the gradients and a layer's moments during the update instead
of every moment at once. XLA:GPU's plan of the 7B step on one H100 (full remat, micro-batch 1,
docs/PERFORMANCE.md): 47.5 GiB on the device with offload against 75.9 without; copying the whole
moment tree in for the update instead planned 63.8 GiB. The result equals `optim.apply_update` to
float32 rounding (same skip of a non-finite step, lr included): bit for bit in most layouts
(tests/test_offload.py; tests/hostile/offload_parity.py, docs/HOSTILE.md), a few ulps apart where
XLA rounds an embedding or lm_head updated whole differently — neither nearer a float64 step. Scalars (Adam's count, the
injected lr) stay on the device. Checkpoints save and restore host-resident arrays like any other
(Orbax reads the shardings, memory kind included).

A platform without a `pinned_host` memory kind keeps the moments in device memory, and the run says
so once. The CPU has one, but it is the same RAM as its "device" memory: the offload runs (the
copies are real) and saves nothing there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxsft import optim

HOST = "pinned_host"
DEVICE = "device"
LAYERS = ("layers", "dense_layers")  # the model's stacked [L, ...] layer states (jaxsft.model.decoder)


def host_memory_kind(mesh) -> str | None:
    """`pinned_host` when every device of `mesh` can address it, else None."""
    kinds = [{m.kind for m in d.addressable_memories()} for d in mesh.devices.flat]
    return HOST if all(HOST in k for k in kinds) else None


def to_host_shardings(opt_state, shardings, mesh, say=print):
    """`shardings` of `opt_state` with every array of rank ≥ 1 (the moments) placed in host memory."""
    platform = mesh.devices.flat[0].platform
    if host_memory_kind(mesh) is None:
        say(f"[jaxsft] model.fsdp_config.optimizer_offload=true: {platform} devices have no {HOST} memory; the "
            f"optimizer state stays in device memory")
        return shardings
    if platform == "cpu":
        say(f"[jaxsft] model.fsdp_config.optimizer_offload=true: on the CPU {HOST} memory is the same RAM as device "
            f"memory, so the Adam moments move between the two (as on a GPU) but no memory is saved")
    return jax.tree.map(lambda x, s: s.with_memory_kind(HOST) if x.ndim else s, opt_state, shardings)


def is_offloaded(shardings) -> bool:
    """Whether any leaf of a sharding tree (the optimizer state's) is in host memory."""
    return shardings is not None and any(getattr(s, "memory_kind", None) == HOST for s in jax.tree.leaves(shardings))


# ---- the streamed update -------------------------------------------------------------------------------


def _moments(adam_state):
    scale_by_adam = adam_state.inner_state[0]
    return scale_by_adam.mu, scale_by_adam.nu


def _with_moments(adam_state, mu, nu):
    """AdamW's state (optax.inject_hyperparams over adamw's chain) with other first/second moments."""
    inner = adam_state.inner_state
    return adam_state._replace(inner_state=(inner[0]._replace(mu=mu, nu=nu), *inner[1:]))


def _move(x, sharding, kind: str, drop_leading: bool = False):
    """x copied to memory `kind` if its sharding says host memory (else x as it is); `drop_leading`:
    x is one layer of a stacked leaf of that sharding."""
    if getattr(sharding, "memory_kind", None) != HOST:
        return x
    if drop_leading:
        spec = tuple(sharding.spec) + (None,) * (x.ndim + 1 - len(sharding.spec))
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))
    return jax.device_put(x, sharding.with_memory_kind(kind))


def layer_groups(params) -> tuple[list[int], dict[int, list[int]]]:
    """Leaf indices of `params` (jax.tree.leaves order): (updated whole, {L: stacked layer leaves
    with L leading entries, scanned together})."""
    whole, stacked = [], {}
    for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0]):
        top = getattr(path[0], "key", None) if path else None
        if top in LAYERS and leaf.ndim >= 2:
            stacked.setdefault(leaf.shape[0], []).append(i)
        else:
            whole.append(i)
    return whole, stacked


def streamed_update(tx: optim.ClippedAdamW, params, opt_state, grads, lr, shardings=None):
    """`optim.apply_update(tx, params, opt_state, grads, lr)` (the same result to float32
    rounding, the same skip of a non-finite step) with the moments streamed: `shardings` is opt_state's sharding tree; moments
    whose sharding is in host memory are copied to the device a part at a time and their new
    values written back to host memory. Without host shardings it runs the same chunks in device
    memory (what a compile-only plan sees)."""
    grad_norm = optim.global_norm(grads)
    finite = jnp.isfinite(grad_norm)
    factor = optim.clip_factor(grad_norm, tx.max_norm)
    clip_state, old_adam = opt_state
    adam_state = optim.set_learning_rate(opt_state, lr)[1]
    mu, nu = _moments(adam_state)
    mu_sh, nu_sh = _moments(shardings[1]) if shardings is not None else (None, None)

    def keep_if_finite(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    def update(p, g, m, v):  # lists of leaves: AdamW on this part, the clip factor of the whole
        updates, new = tx.adamw.update(optim.clipped(g, factor), _with_moments(adam_state, m, v), p)
        new_m, new_v = _moments(new)
        return keep_if_finite(optax.apply_updates(p, updates), p), keep_if_finite(new_m, m), keep_if_finite(new_v, v)

    p_leaves, g_leaves = jax.tree.leaves(params), jax.tree.leaves(grads)
    m_leaves, v_leaves = jax.tree.leaves(mu), jax.tree.leaves(nu)
    m_sh = jax.tree.leaves(mu_sh) if mu_sh is not None else [None] * len(m_leaves)
    v_sh = jax.tree.leaves(nu_sh) if nu_sh is not None else [None] * len(v_leaves)
    new_p, new_m, new_v = list(p_leaves), list(m_leaves), list(v_leaves)

    whole, stacked = layer_groups(params)
    for i in whole:
        (p,), (m,), (v,) = update([p_leaves[i]], [g_leaves[i]], [_move(m_leaves[i], m_sh[i], DEVICE)],
                                  [_move(v_leaves[i], v_sh[i], DEVICE)])
        new_p[i], new_m[i], new_v[i] = p, _move(m, m_sh[i], HOST), _move(v, v_sh[i], HOST)

    for idx in stacked.values():
        def layer(carry, g, idx=idx):  # carry: this group's stacked parameters and moments, updated in place
            ps, ms, vs, k = carry

            def take(xs, shardings=None):  # layer k, on the device
                return [_move(jax.lax.dynamic_index_in_dim(x, k, keepdims=False), shardings and shardings[i], DEVICE,
                              drop_leading=True) for x, i in zip(xs, idx)]

            def put(xs, news, shardings=None):  # layer k written back where xs live
                return [jax.lax.dynamic_update_index_in_dim(x, _move(y, shardings and shardings[i], HOST,
                                                                     drop_leading=True), k, 0)
                        for x, y, i in zip(xs, news, idx)]

            p, m, v = update(take(ps), g, take(ms, m_sh), take(vs, v_sh))
            return (put(ps, p), put(ms, m, m_sh), put(vs, v, v_sh), k + 1), None

        start = tuple([leaves[i] for i in idx] for leaves in (p_leaves, m_leaves, v_leaves))
        (ps, ms, vs, _), _ = jax.lax.scan(layer, (*start, 0), [g_leaves[i] for i in idx])
        for j, i in enumerate(idx):
            new_p[i], new_m[i], new_v[i] = ps[j], ms[j], vs[j]

    # Adam's count and the hyperparameters: the update of an empty part advances them as any part does
    _, scalars = tx.adamw.update([], _with_moments(adam_state, [], []), [])
    scalars = keep_if_finite(scalars, _with_moments(old_adam, [], []))  # a skipped step keeps the old lr too
    new_adam = _with_moments(scalars, jax.tree.unflatten(jax.tree.structure(mu), new_m),
                             jax.tree.unflatten(jax.tree.structure(nu), new_v))
    new_params = jax.tree.unflatten(jax.tree.structure(params), new_p)
    return new_params, (clip_state, new_adam), grad_norm, finite
