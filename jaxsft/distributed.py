"""Multi-process start-up on JAX's own runtime (`jax.distributed`), and the glue that turns each
process's rows of a global batch into one global array.

A job runs one process per host. It initialises the distributed runtime when the configuration or
the environment asks for it: `trainer.coordinator_address` / `trainer.num_processes` /
`trainer.process_id`, or `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`, or a
cluster JAX detects by itself (a SLURM or Open MPI job of more than one task). A process that dies
is noticed by the others through the coordination service's heartbeat
(`JAXSFT_HEARTBEAT_TIMEOUT_S`, default 100 s), which ends them with an error instead of a hang.
"""

from __future__ import annotations

import os

import jax
import numpy as np

_initialised = False


def _setting(trainer_cfg, key: str, env: str, cast):
    value = trainer_cfg.get(key) if trainer_cfg is not None else None
    if value is None and os.environ.get(env):
        value = os.environ[env]
    return cast(value) if value is not None else None


def maybe_initialize(trainer_cfg=None) -> bool:
    """Start `jax.distributed` if asked to; returns whether this is a multi-process job."""
    global _initialised
    if _initialised:
        return jax.process_count() > 1
    address = _setting(trainer_cfg, "coordinator_address", "JAX_COORDINATOR_ADDRESS", str)
    num = _setting(trainer_cfg, "num_processes", "JAX_NUM_PROCESSES", int)
    pid = _setting(trainer_cfg, "process_id", "JAX_PROCESS_ID", int)
    auto_cluster = int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    if address is None and not auto_cluster:
        return False
    if address is not None and (num is None or pid is None):
        raise ValueError("trainer.coordinator_address is set but trainer.num_processes / trainer.process_id are not "
                         "(or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    kwargs = {"initialization_timeout": int(os.environ.get("JAXSFT_DISTRIBUTED_TIMEOUT_S", "300")),
              "heartbeat_timeout_seconds": int(os.environ.get("JAXSFT_HEARTBEAT_TIMEOUT_S", "100"))}
    if address is not None:
        kwargs.update(coordinator_address=address, num_processes=num, process_id=pid)
    # Collectives between CPU devices of different processes (tests, CPU clusters) need gloo;
    # the setting does not affect GPU backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    _initialised = True
    return jax.process_count() > 1


def barrier(name: str) -> None:
    """All processes wait here (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def global_array(local: np.ndarray, sharding: jax.sharding.NamedSharding) -> jax.Array:
    """A global array from this process's rows (axis 1 for [K, rows, T], axis 0 for [rows, T])."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    row_axis = 1 if local.ndim == 3 else 0
    global_shape = list(local.shape)
    global_shape[row_axis] *= jax.process_count()
    return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))
