"""What a plan is compiled for: this machine's CPUs or GPUs, or N H100/H200 GPUs that are not here
(compile-only CUDA devices made from a GpuTargetConfig text proto, jaxsft/targets/*.txtpb, with
`jax.experimental.topologies.get_topology_desc`: needs jax's CUDA plugin and ptxas, and
JAX_PLATFORMS=cpu set before jax starts — `prepare_environment` — but no GPU)."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import jax

from jaxsft.errors import UserError

TARGET_KINDS = ("cpu", "gpu", "h100", "h200")
TARGET_CONFIGS = {"h100": "h100.txtpb", "h200": "h200.txtpb"}
_TARGET_DIR = Path(__file__).resolve().parent.parent / "targets"
# jax's GPU allocator takes this fraction of the device memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise
JAX_DEFAULT_MEM_FRACTION = 0.75


class PlanError(UserError):
    """A plan that cannot be made (bad target, missing CUDA compiler, no CUDA code)."""


def parse_target(spec: str) -> tuple[str, int | None]:
    """`cpu`, `gpu`, `h100:N`, `h200:N` -> (kind, N or None for 'all devices of this machine')."""
    kind, _, count = str(spec).partition(":")
    kind = kind.lower()
    if kind not in TARGET_KINDS:
        raise PlanError(f"--dry_run={spec!r}: the target is one of cpu, gpu, h100:N, h200:N")
    if kind in TARGET_CONFIGS:
        if not count.isdigit() or int(count) < 1:
            raise PlanError(f"--dry_run={spec!r}: give the number of GPUs, e.g. {kind}:8")
        return kind, int(count)
    if count:
        raise PlanError(f"--dry_run={spec!r}: `{kind}` plans for this machine's devices; it takes no count")
    return kind, None


def prepare_environment(spec: str | None) -> None:
    """Before jax starts a backend: a deviceless CUDA target needs jax on the CPU platform (else the
    CUDA plugin's start-up check fails on a machine without a GPU and the plugin is not
    registered). Without an NVIDIA driver the same holds for any run: CUDA cannot work there, and
    jax would print the plugin's failed check before falling back to the CPU. A JAX_PLATFORMS the
    user set wins. A deviceless target of N GPUs also gets N CPU devices: an offload plan is
    lowered on them (compile_train_step)."""
    kind, count = parse_target(spec) if spec else (None, None)
    if kind in TARGET_CONFIGS and count > 1:
        flags = os.environ.get("XLA_FLAGS", "")
        m = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
        if m is None:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
        elif int(m.group(1)) < count:
            os.environ["XLA_FLAGS"] = flags.replace(m.group(0), f"--xla_force_host_platform_device_count={count}")
    no_driver = not (Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists())
    if "JAX_PLATFORMS" in os.environ or not (no_driver or kind in TARGET_CONFIGS):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")  # jax read the variable when it was imported


@dataclasses.dataclass(frozen=True)
class Target:
    spec: str  # as given: "h100:8"
    kind: str  # cpu | gpu | h100 | h200
    devices: tuple  # jax devices the mesh is built from (compile-only ones for h100/h200)
    platform: str  # what XLA compiles for: cpu | cuda
    device_kind: str
    memory_bytes: int  # per device, all of it
    usable_bytes: int  # what the allocator may use: memory × fraction (GPU)
    memory_fraction: float | None
    target_config: str | None  # the GpuTargetConfig file, for h100/h200

    @property
    def num_devices(self) -> int:
        return len(self.devices)


def memory_fraction() -> float:
    value = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    try:
        return float(value) if value else JAX_DEFAULT_MEM_FRACTION
    except ValueError:
        raise PlanError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={value!r} is not a number") from None


def target_config_text(kind: str, path: str | os.PathLike | None = None) -> tuple[str, str]:
    """(text, file) of the GpuTargetConfig for h100/h200; `JAXSFT_TARGET_CONFIG_<KIND>` or `path`
    may point at another file (e.g. the one bench/gpu_check.py captured on a real device)."""
    path = Path(path or os.environ.get(f"JAXSFT_TARGET_CONFIG_{kind.upper()}") or _TARGET_DIR / TARGET_CONFIGS[kind])
    try:
        return path.read_text(), str(path)
    except OSError as e:
        raise PlanError(f"cannot read the {kind} target config {path}: {e.strerror}") from None


def device_memory_from_config(text: str) -> int:
    m = re.search(r"device_memory_size:\s*(\d+)", text)
    if not m:
        raise PlanError("the GPU target config has no gpu_device_info.device_memory_size")
    return int(m.group(1))


def get_target(spec: str, *, config_path=None) -> Target:
    """The devices and memory of a target (see parse_target)."""
    kind, count = parse_target(spec)
    if kind == "cpu":
        devices = tuple(jax.devices("cpu"))
        # host RAM, shared by every CPU device: each device's share is what its plan must fit
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // len(devices)
        return Target(spec, kind, devices, "cpu", devices[0].device_kind, memory, memory, None, None)
    if kind == "gpu":
        try:  # every process's GPUs (the mesh spans them); memory from this process's first
            devices = tuple(jax.devices("gpu"))
        except RuntimeError:
            devices = ()
        if not devices:
            raise PlanError("--dry_run=gpu: this machine has no GPU that jax can use; plan for h100:N or h200:N")
        stats = jax.local_devices(backend="gpu")[0].memory_stats() or {}
        limit = int(stats.get("bytes_limit", 0))
        total = int(stats.get("bytes_reservable_limit", 0)) or limit
        return Target(spec, kind, devices, "cuda", devices[0].device_kind, total, limit,
                      memory_fraction(), None)
    from jax.experimental import topologies

    text, file = target_config_text(kind, config_path)
    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=text, topology=f"1x1x{count}")
    except Exception as e:  # no plugin, or a proto this jaxlib cannot read
        raise PlanError(f"cannot make {count} compile-only {kind} devices from {file}: {_first_line(e)} "
                        f"(needs jax's CUDA plugin: pip install jax-cuda12-plugin jax-cuda12-pjrt "
                        f"nvidia-cuda-nvcc-cu12, and JAX_PLATFORMS=cpu)") from None
    memory = device_memory_from_config(text)
    fraction = memory_fraction()
    devices = tuple(topo.devices)
    return Target(spec, kind, devices, "cuda", devices[0].device_kind, memory, int(memory * fraction), fraction, file)




def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
