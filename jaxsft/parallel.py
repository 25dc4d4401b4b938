"""The (dp, sp) device mesh and how arrays are laid out on it.

Parameters carry logical axis names (Variable metadata `axes`). They are sharded FSDP-style: each
parameter is split over BOTH mesh axes ('dp', 'sp') along exactly one of its dimensions, so every
device holds 1/(dp·sp) of every weight and XLA all-gathers a layer's weights where they are used.

The rule (`param_spec`): walk `LOGICAL_AXIS_RULES` in order; the first rule whose logical name the
parameter has, whose mesh axes are ('dp', 'sp') and whose dimension size is divisible by dp·sp
shards that dimension. If no dimension qualifies, the parameter is replicated. `layers` maps to no
mesh axis, so the stacked layer axis is never sharded.

Activations: batch rows → 'dp', tokens → 'sp' (`constrain`), applied only under an active mesh
(`jax.set_mesh`) and only on dimensions that divide evenly.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("dp", "sp")
FSDP = ("dp", "sp")

# (logical name, mesh axes or None), in priority order for the parameter rule.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", "dp"),
    ("length", "sp"),
    # parameters
    ("experts", FSDP),  # the expert-parallel layout only (jaxsft.model.moe_parallel)
    ("vocab", FSDP),
    ("embed", FSDP),
    ("mlp", FSDP),
    ("q_heads", FSDP),
    ("kv_heads", FSDP),
    ("layers", None),
)
_RULES = dict(LOGICAL_AXIS_RULES)


def make_mesh(dp: int, sp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A dp × sp mesh named ('dp', 'sp') with Auto axes over the first dp·sp devices."""
    devices = list(jax.devices() if devices is None else devices)
    if dp * sp > len(devices):
        raise ValueError(f"a dp={dp} × sp={sp} mesh needs {dp * sp} devices; {len(devices)} available")
    return jax.make_mesh((dp, sp), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices[:dp * sp])


def _size(mesh, axes) -> int:
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh) -> P:
    """Activation spec: each logical name maps through the rules; a dimension that does not
    divide by its mesh axes' size stays unsharded."""
    spec = []
    for name, n in zip(names, shape):
        axes = _RULES.get(name) if name else None
        spec.append(axes if axes is not None and n % _size(mesh, axes) == 0 else None)
    return P(*spec)


def param_spec(names: Sequence[str | None], shape: Sequence[int], mesh) -> P:
    """Parameter spec by the module rule: one dimension over ('dp', 'sp') or replicated."""
    for rule_name, axes in LOGICAL_AXIS_RULES:
        if axes != FSDP or rule_name not in names:
            continue
        dim = list(names).index(rule_name)
        if shape[dim] % _size(mesh, axes) == 0:
            return P(*[axes if i == dim else None for i in range(len(shape))])
    return P()


def param_sharding(variable, mesh: Mesh) -> NamedSharding:
    """The NamedSharding of a parameter (an nnx.Variable, possibly abstract, with `axes` metadata)."""
    return NamedSharding(mesh, param_spec(variable.get_metadata()["axes"], variable.shape, mesh))


def param_shardings(params, mesh: Mesh):
    """The same tree as an nnx.State of parameters (or its abstract version) with a NamedSharding in
    place of each Variable; usable as jit `out_shardings` for that state."""
    from flax import nnx  # here, not at the top: the attention kernels use this module without flax

    return jax.tree.map(lambda v: param_sharding(v, mesh), params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def active_mesh():
    """The mesh set with `jax.set_mesh` if it has our axes, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or set(mesh.axis_names) != set(AXES):
        return None
    return mesh


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names when a (dp, sp) mesh is active; else x."""
    mesh = active_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[K micro-batches, rows, T]: rows over dp, tokens over sp."""
    return NamedSharding(mesh, P(None, "dp", "sp"))


def eval_batch_sharding(mesh: Mesh) -> NamedSharding:
    """[rows, T]: rows over dp, tokens over sp."""
    return NamedSharding(mesh, P("dp", "sp"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())

