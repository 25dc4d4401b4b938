"""Multi-process start-up on JAX's own runtime (`jax.distributed`), and the glue that turns each
process's rows of a global batch into one global array.

A job runs one process per host. It initialises the distributed runtime when the configuration or
the environment asks for it: `trainer.coordinator_address` / `trainer.num_processes` /
`trainer.process_id`, or `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`, or a
cluster JAX detects by itself (an srun step or Open MPI job of more than one task; a single task on
a node keeps all its GPUs). When a process dies, the others' next collective fails and they exit;
one that hangs is noticed through the coordination service's heartbeat
(`JAXSFT_HEARTBEAT_TIMEOUT_S`, default 100 s), which ends the others with an error instead of a hang.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np

from jaxsft.errors import ConfigError

_initialised = False


def _setting(trainer_cfg, key: str, env: str, cast):
    value = getattr(trainer_cfg, key, None) if trainer_cfg is not None else None
    if value is None and os.environ.get(env):
        value = os.environ[env]
    return cast(value) if value is not None else None


def one_process_per_host_devices() -> list[int] | None:
    """The local GPU ids to keep when SLURM or Open MPI runs one task on this node, else None.

    Under those launchers JAX gives each task the single GPU of its local rank (it assumes a task
    per GPU); jaxsft runs one process per host, which must keep every GPU it can see. Counted
    without initialising CUDA: CUDA_VISIBLE_DEVICES, else the driver's list. JAX_LOCAL_DEVICE_IDS,
    which JAX reads itself, wins.
    """
    if os.environ.get("JAX_LOCAL_DEVICE_IDS"):
        return None
    slurm_single = ("SLURM_STEP_NODELIST" in os.environ
                    and os.environ.get("SLURM_NTASKS") == os.environ.get("SLURM_STEP_NUM_NODES"))
    if not (slurm_single or os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") == "1"):
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = len([v for v in visible.split(",") if v.strip()])
    else:
        driver = Path("/proc/driver/nvidia/gpus")
        count = len(list(driver.iterdir())) if driver.is_dir() else 0
    return list(range(count)) or None  # no GPUs: JAX's choice only affects GPU visibility


def maybe_initialize(trainer_cfg=None) -> bool:
    """Start `jax.distributed` if asked to; returns whether this is a multi-process job."""
    global _initialised
    if _initialised:
        return jax.process_count() > 1
    address = _setting(trainer_cfg, "coordinator_address", "JAX_COORDINATOR_ADDRESS", str)
    num = _setting(trainer_cfg, "num_processes", "JAX_NUM_PROCESSES", int)
    pid = _setting(trainer_cfg, "process_id", "JAX_PROCESS_ID", int)
    # SLURM only inside an srun step (SLURM_STEP_NODELIST): a batch script's own python runs alone.
    auto_cluster = (int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in os.environ
                    or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
    if address is None and not auto_cluster:
        return False
    if address is not None and (num is None or pid is None):
        raise ValueError("trainer.coordinator_address is set but trainer.num_processes / trainer.process_id are not "
                         "(or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    kwargs = {"initialization_timeout": int(os.environ.get("JAXSFT_DISTRIBUTED_TIMEOUT_S", "300")),
              "heartbeat_timeout_seconds": int(os.environ.get("JAXSFT_HEARTBEAT_TIMEOUT_S", "100"))}
    if address is not None:
        kwargs.update(coordinator_address=address, num_processes=num, process_id=pid)
    local_ids = one_process_per_host_devices()
    if local_ids is not None:
        kwargs["local_device_ids"] = local_ids
    # Collectives between CPU devices of different processes (tests, CPU clusters) need gloo;
    # the setting does not affect GPU backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    _initialised = True
    return jax.process_count() > 1


def start(trainer) -> None:
    """Pick the platform (`trainer.device`), start `jax.distributed` when asked, and check that
    the platform asked for is the one JAX found — before anything is loaded."""

    if trainer.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    maybe_initialize(trainer)
    if trainer.device in ("cuda", "gpu") and jax.default_backend() != "gpu":
        raise ConfigError(f"trainer.device={trainer.device} (verl's default) but JAX found no GPU (it runs on "
                          f"{jax.default_backend()}): install jax[cuda12] on a machine with a GPU, or set "
                          f"trainer.device=cpu (or auto)")


def is_primary() -> bool:
    """Whether this is process 0: the one that writes files and prints for the whole job."""
    return jax.process_index() == 0


def is_multiprocess() -> bool:
    """Whether this process started `jax.distributed` with others (never initialises a backend)."""
    return _initialised and jax.process_count() > 1


def abort(error: BaseException) -> None:
    """End this process of a multi-process job at once with its cause in one line (exit 1)."""
    import sys
    import traceback

    traceback.print_exc()
    cause = (str(error).strip().splitlines() or [""])[0][:300]
    print(f"[jaxsft] process {jax.process_index()} of {jax.process_count()} stopped: {type(error).__name__}: {cause}\n"
          f"[jaxsft] a failed collective usually means another process died (its log has the cause); "
          f"relaunch every process to resume from the last checkpoint", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def check_process_rows(mesh: jax.sharding.Mesh) -> None:
    """The data loader gives process p the rows of the p-th block of dp ranks, and
    `global_array` puts them on p's devices; so the mesh must place exactly p's devices there
    (true of jax.make_mesh on CPU and GPU, whose device ids run process by process)."""
    n = jax.process_count()
    dp = mesh.shape["dp"]
    if n == 1 or dp % n:
        return  # one process, or a dp the loader refuses with its own message
    per = dp // n
    rows = mesh.devices.reshape(dp, -1)  # [dp, sp]
    for r in range(dp):
        owners = sorted({d.process_index for d in rows[r]})
        if owners != [r // per]:
            raise RuntimeError(f"the device mesh puts dp rank {r} on the devices of process(es) {owners}, but the data "
                               f"loader gives its rows to process {r // per} (each process holds {per} consecutive dp "
                               f"ranks on its own devices)")


def barrier(name: str) -> None:
    """All processes wait here (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def global_batch(batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
    return {k: global_array(v, sharding) for k, v in batch.items()}


def global_array(local: np.ndarray, sharding: jax.sharding.NamedSharding) -> jax.Array:
    """A global array from this process's rows (axis 1 for [K, rows, T], axis 0 for [rows, T])."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    row_axis = 1 if local.ndim == 3 else 0
    global_shape = list(local.shape)
    global_shape[row_axis] *= jax.process_count()
    return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))


def gather_json(obj) -> list:
    """Every process's JSON-able `obj`, by process index (Orbax's JSON items are written by
    process 0 only, so process 0 must hold all of them)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(raw.size)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    everyone = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(everyone[i, :sizes[i]].tobytes()) for i in range(len(sizes))]
