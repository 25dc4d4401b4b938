"""Optimizer-state offload (`model.fsdp_config.optimizer_offload`, verl's FSDP-engine key; seed 003's
`adam_offload`): the Adam moments live in host memory between steps.

The moments' shardings keep their FSDP layout but take the `pinned_host` memory kind; the jitted
train step copies them to device memory for the update (`to_device`) and back (`to_host`), so
during the forward and backward passes the device holds no optimizer state. Scalars (Adam's count,
the injected lr) stay on the device. Checkpoints save and restore host-resident arrays like any
other (Orbax reads the shardings, memory kind included).

A platform without a `pinned_host` memory kind keeps the moments in device memory, and the run says
so once. The CPU has one, but it is the same RAM as its "device" memory: the offload runs (the
copies are real) and saves nothing there.
"""

from __future__ import annotations

import jax

HOST = "pinned_host"
DEVICE = "device"


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


def _placed(tree, shardings, kind: str):
    if shardings is None:
        return tree
    return jax.tree.map(lambda x, s: jax.device_put(x, s.with_memory_kind(kind)) if s.memory_kind == HOST else x,
                        tree, shardings)


def to_device(opt_state, shardings):
    """Inside the step: the host-resident leaves of `opt_state` copied to device memory."""
    return _placed(opt_state, shardings, DEVICE)


def to_host(opt_state, shardings):
    """Inside the step: the leaves whose shardings say host memory, copied back there."""
    return _placed(opt_state, shardings, HOST)
