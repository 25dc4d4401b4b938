"""The train state {params, opt_state, step} and where each leaf lives: one init, run for real by
the trainer (`init_train_state`) and abstractly by the planner (`abstract_train_state`, the same
init under `jax.eval_shape`), with shardings from one rule — parameters by their logical axes
(jaxsft.parallel), each Adam moment as the trainable leaf it mirrors, scalars replicated, the
moments in host memory with optimizer offload (jaxsft.offload)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsft import offload, parallel
from jaxsft.trainable import EVERYTHING, Partition


def _init_optimizer(params, tx, partition: Partition) -> dict:
    trainable = params if partition.whole else partition.select(params)
    return {"opt_state": tx.init(trainable), "step": jnp.zeros((), jnp.int32)}


def _init_state(params, tx, partition: Partition) -> dict:
    return {"params": params, **_init_optimizer(params, tx, partition)}


def state_shardings(params, tx, mesh, partition: Partition = EVERYTHING, *, optimizer_offload: bool = False,
                    say=print) -> tuple[dict, dict]:
    """(device shardings, shardings) of the train state of `params` (arrays or abstract): equal
    unless `optimizer_offload` puts the moments in host memory."""
    replicated = parallel.replicated(mesh)
    trained = params if partition.whole else jax.eval_shape(partition.select, params)
    trained_shardings = parallel.param_shardings(params, mesh) if partition.whole else partition.shardings(params, mesh)
    by_path = {_path_key(path): (leaf.shape, sharding) for (path, leaf), sharding in
               zip(jax.tree_util.tree_flatten_with_path(trained)[0], jax.tree.leaves(trained_shardings))}

    def mirror(path, leaf):  # a moment has its parameter's path as a suffix, and its shape
        key = _path_key(path)
        for i in range(len(key)):
            shape, sharding = by_path.get(key[i:], (None, None))
            if shape == leaf.shape:
                return sharding
        return replicated

    opt_state = jax.eval_shape(functools.partial(_init_optimizer, tx=tx, partition=partition), params)["opt_state"]
    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    param_shardings = jax.tree.map(lambda v: v.replace(parallel.param_sharding(v, mesh)), params, is_leaf=is_variable)
    device = {"params": param_shardings,
              "opt_state": jax.tree_util.tree_map_with_path(mirror, opt_state), "step": replicated}
    if not optimizer_offload:
        return device, device
    return device, dict(device, opt_state=offload.to_host_shardings(opt_state, device["opt_state"], mesh, say=say))


def init_train_state(model, tx, mesh, partition: Partition = EVERYTHING, *, optimizer_offload: bool = False,
                     say=print):
    """Split an NNX model into (graphdef, rest, state, state_shardings); state = {params, opt_state,
    step}, the optimizer state over `partition`'s trainable part only. The parameters stay where
    they were loaded (no copy); the optimizer state is made on the devices, then moved to host
    memory with `optimizer_offload`."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    device, shardings = state_shardings(params, tx, mesh, partition, optimizer_offload=optimizer_offload, say=say)
    init = jax.jit(functools.partial(_init_optimizer, tx=tx, partition=partition),
                   out_shardings={"opt_state": device["opt_state"], "step": device["step"]})
    state = {"params": params, **init(params)}
    return graphdef, rest, jax.device_put(state, shardings), shardings


def abstract_train_state(model, tx, mesh, partition: Partition = EVERYTHING, *, optimizer_offload: bool = False,
                         say=print):
    """`init_train_state` of an abstract model (`nnx.eval_shape`): the same init under
    `jax.eval_shape`, every leaf a ShapeDtypeStruct carrying the sharding the trainer would give it."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    _, shardings = state_shardings(params, tx, mesh, partition, optimizer_offload=optimizer_offload, say=say)
    shapes = jax.eval_shape(functools.partial(_init_state, tx=tx, partition=partition), params)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    return graphdef, rest, state, shardings


def _path_key(path) -> tuple[str, ...]:
    return tuple(str(k) for k in path)

