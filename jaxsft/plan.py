"""Plan a training step without running it: compile the real train step for a target (this
machine's CPUs or GPUs, or N H100/H200 GPUs that are not here) and read XLA's memory plan, FLOPs
and collectives; choose the remat policy and micro-batch size that fit the device memory.

Nothing is allocated: the model is built abstractly from config.json (`nnx.eval_shape`), every
parameter and Adam moment is a `jax.ShapeDtypeStruct` carrying its NamedSharding, and
`jit(...).lower(...).compile()` runs for the target's devices. For `h100:N` / `h200:N` those are
compile-only CUDA devices made from a GpuTargetConfig text proto (`jaxsft/targets/*.txtpb`)
with `jax.experimental.topologies.get_topology_desc`; that needs jax's CUDA plugin and ptxas
(`pip install jax-cuda12-plugin jax-cuda12-pjrt nvidia-cuda-nvcc-cu12`) and JAX_PLATFORMS=cpu set
before jax starts (`prepare_environment`), but no GPU.

The API takes plain arguments (model config, ModelSettings, mesh shape, batch shape [K, rows, T],
optimizer) so the trainer can call it at start-up (`remat_policy=auto`) and for `--dry_run`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Callable, Sequence

from jaxsft.config.keys import AUTO
from jaxsft.errors import UserError

TARGET_KINDS = ("cpu", "gpu", "h100", "h200")
TARGET_CONFIGS = {"h100": "h100.txtpb", "h200": "h200.txtpb"}
_TARGET_DIR = Path(__file__).resolve().parent / "targets"
# jax's GPU allocator takes this fraction of the device memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise
JAX_DEFAULT_MEM_FRACTION = 0.75
# A plan fits when its peak is at most (1 - FIT_MARGIN) of the usable memory: XLA's plan leaves out
# the CUDA context, cuBLAS/cuDNN workspaces and allocator fragmentation.
FIT_MARGIN = 0.05
# model.remat_policy=auto: cheapest recomputation first.
AUTO_REMAT_ORDER = ("none", "minimal_with_context", "minimal", "full")
GiB = 2**30


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
    import re

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
    import jax  # jax reads the variable when it is imported, which may have happened already

    jax.config.update("jax_platforms", "cpu")


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
    import re

    m = re.search(r"device_memory_size:\s*(\d+)", text)
    if not m:
        raise PlanError("the GPU target config has no gpu_device_info.device_memory_size")
    return int(m.group(1))


def get_target(spec: str, *, config_path=None) -> Target:
    """The devices and memory of a target (see parse_target)."""
    import jax

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


# ---- the abstract train state ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mode:
    """What trains and where its optimizer state lives: `spec` (the ModelSpec: `lora`,
    `trainable`; None = every parameter), the ids `model.added_tokens` added, and
    `model.fsdp_config.optimizer_offload`."""
    spec: object = None
    new_token_ids: tuple = ()
    optimizer_offload: bool = False


FULL = Mode()


def mode_of(settings, added=None) -> Mode:
    """The run's Mode from its settings and `hf.extend_vocabulary`'s AddedTokens (or None)."""
    return Mode(settings.model, tuple(added.new_ids) if added is not None else (), settings.model.optimizer_offload)


def partition_of(params, mode: Mode, model_config):
    """The trainable part (jaxsft.trainable.Partition) of (abstract) parameters for `mode`."""
    from jaxsft import trainable

    if mode.spec is None:
        return trainable.EVERYTHING
    return trainable.partition(params, mode.spec, model_config, mode.new_token_ids)


def abstract_train_state(model_config, settings, mesh, tx, mode: Mode = FULL, say=print):
    """(graphdef, rest, state, shardings) like step.init_train_state, with ShapeDtypeStruct leaves
    (each with its NamedSharding) instead of arrays; the optimizer state covers `mode`'s trainable
    part only (LoRA adapters, new-token rows, patterns), in host memory with optimizer_offload
    where the devices have a pinned_host memory kind. `jax.eval_shape(tx.init, ...)` drops the
    shardings, so every optimizer leaf takes the sharding of the trainable leaf it mirrors (same
    tree path suffix and shape, as Adam's moments); other leaves (counts, hyperparameters) are
    replicated."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxsft import offload, parallel
    from jaxsft.model.qwen2 import Qwen2ForCausalLM

    replicated = parallel.replicated(mesh)
    with jax.set_mesh(mesh):
        model = nnx.eval_shape(lambda: Qwen2ForCausalLM(model_config, settings, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    for _, var in nnx.to_flat_state(params):
        var.set_value(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=parallel.param_sharding(var, mesh)))
    part = partition_of(params, mode, model_config)
    trained = params
    if not part.whole:
        trained = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                               jax.eval_shape(part.select, params), part.shardings(params, mesh))
    by_path = {_path_key(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(trained)[0]}

    def with_sharding(path, leaf):
        key = _path_key(path)
        for i in range(len(key)):
            param = by_path.get(key[i:])
            if param is not None and param.shape == leaf.shape:
                return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=param.sharding)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated)

    opt_state = jax.tree_util.tree_map_with_path(with_sharding, jax.eval_shape(tx.init, trained))
    if mode.optimizer_offload and offload.host_memory_kind(mesh):
        host = offload.to_host_shardings(opt_state, jax.tree.map(lambda x: x.sharding, opt_state), mesh, say=say)
        opt_state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), opt_state, host)
    state = {"params": params, "opt_state": opt_state, "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)}
    return graphdef, rest, state, jax.tree.map(lambda x: x.sharding, state)


def _path_key(path) -> tuple[str, ...]:
    return tuple(str(k) for k in path)


def batch_struct(batch_shape: Sequence[int], mesh):
    import jax
    import jax.numpy as jnp

    from jaxsft import parallel

    sharding = parallel.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(tuple(batch_shape), jnp.int32, sharding=sharding)
            for k in ("input_ids", "positions", "segment_ids", "loss_mask")}


# ---- one plan ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    target: str
    devices: int
    mesh: dict
    compiled_for: str  # platform and device kind XLA compiled for
    settings: dict
    batch_shape: list
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    per_device_peak_bytes: int  # arguments + outputs - aliased + temp
    device_memory_bytes: int  # usable per device: memory × memory fraction
    device_total_bytes: int
    memory_fraction: float | None
    fits: bool  # peak <= (1 - FIT_MARGIN) × device_memory_bytes
    compile_s: float
    step_flops: float  # per device, matmul FLOPs XLA will execute (recomputation included)
    model_flops: float  # per device, MaxText convention for this batch shape (no recomputation)
    opaque_calls: int
    collectives: dict
    collectives_per_step: dict
    tt_buffers: list
    cuda_binaries: int | None  # cubins in the executable (CUDA targets)
    target_config: str | None
    trained: str = "every parameter"  # what the optimizer updates (jaxsft.trainable)
    opt_state_bytes: int = 0  # per device
    # pinned_host memory per device (optimizer_offload: the moments; XLA's own figures)
    host_argument_bytes: int = 0
    host_temp_bytes: int = 0
    host_peak_bytes: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> list[str]:
        """The plan as printed lines (per device)."""
        frac = f" at memory fraction {self.memory_fraction:.2f}" if self.memory_fraction is not None else ""
        lines = [
            f"[plan] {self.target}: {self.devices} × {self.compiled_for}, mesh dp={self.mesh['dp']} sp={self.mesh['sp']}, "
            f"batch {self.batch_shape} [micro-batches, rows, tokens], remat={self.settings['remat_policy']}, "
            f"attention={self.settings['attn_implementation']}, params {self.settings['param_dtype']}, "
            f"grad accumulator {self.settings.get('grad_accum_dtype', 'float32')}",
            f"[plan] per device: arguments {_gib(self.argument_bytes)}, temp {_gib(self.temp_bytes)}, "
            f"outputs {_gib(self.output_bytes)} ({_gib(self.alias_bytes)} aliased to donated arguments); "
            f"peak {_gib(self.per_device_peak_bytes)} of {_gib(self.device_memory_bytes)} usable{frac} "
            f"({_gib(self.device_total_bytes)} on the device) -> {'fits' if self.fits else 'DOES NOT FIT'} "
            f"(with a {FIT_MARGIN:.0%} margin)",
            f"[plan] compile {self.compile_s:.1f} s; step {_flop(self.step_flops)} per device "
            f"(matmuls as compiled, recomputation included{self._opaque()}); model "
            f"{_flop(self.model_flops)} per device (MaxText count) -> "
            f"{self.step_flops / max(self.model_flops, 1):.2f}× recompute factor",
            f"[plan] collectives (async/sync) in the program: {_collectives(self.collectives)}; "
            f"executed per step: {_collectives(self.collectives_per_step)}",
        ]
        scores = [b for b in self.tt_buffers if b["score_like"]]
        t = self.batch_shape[-1]
        lines.append(f"[plan] float32 buffers of >= T×T elements (T={t}): {len(self.tt_buffers)} shape(s); "
                     + ("[.., T, T] score-like: " + ", ".join(f"{b['shape']} × {b['count']} ({_gib(b['bytes'])} each)"
                                                              for b in scores) if scores else
                        "none score-like [.., T, T]" + (f"; largest {', '.join(str(b['shape']) for b in self.tt_buffers[:3])}"
                                                        if self.tt_buffers else "")))
        if self.cuda_binaries is not None:
            lines.append(f"[plan] CUDA machine code: {self.cuda_binaries} cubin(s) in the executable")
        lines.append(f"[plan] training {self.trained}; optimizer state {_gib(self.opt_state_bytes)} per device")
        if self.host_peak_bytes:
            lines.append(f"[plan] host memory (pinned_host) per device: arguments {_gib(self.host_argument_bytes)} "
                         f"(the offloaded Adam moments, updated in place), temp {_gib(self.host_temp_bytes)}; peak "
                         f"{_gib(self.host_peak_bytes)} (not part of the device peak)")
        return lines

    def _opaque(self) -> str:
        return f"; {self.opaque_calls} custom-call executions not counted" if self.opaque_calls else ""


def _collectives(counts: dict) -> str:
    """The four FSDP/Ulysses collectives always, others when present."""
    always = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")
    return ", ".join(f"{k} {v['async']}/{v['sync']}" for k, v in counts.items()
                     if k in always or v["async"] or v["sync"])


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def _flop(n: float) -> str:
    return f"{n / 1e12:.1f} TFLOP" if n >= 1e11 else f"{n / 1e9:.2f} GFLOP"


def compile_train_step(model_config, settings, mesh, batch_shape, tx, lr_schedule, step_cfg, mode: Mode = FULL,
                       lower_on_cpu: bool | None = None):
    """(compiled, seconds, abstract state) of the real train step for abstract state on `mesh`.

    With optimizer_offload on compile-only CUDA devices (no memory spaces: jax would drop every
    pinned_host sharding) the step is lowered for CUDA on CPU devices of the same mesh shape, which
    have pinned_host, and compiled by the CUDA devices' client: XLA:GPU then plans the host
    placements and the streamed update, and reports host memory apart (`_compile_with_host_memory`).
    `lower_on_cpu` forces that route on or off (None: as just said)."""
    import jax

    from jaxsft import offload, parallel, step

    host_lowering = lower_on_cpu
    if host_lowering is None:
        host_lowering = (mode.optimizer_offload and offload.host_memory_kind(mesh) is None
                         and mesh.devices.flat[0].platform == "gpu")
    lower_mesh = _cpu_mesh_like(mesh) if host_lowering else mesh
    graphdef, rest, state, shardings = abstract_train_state(model_config, settings, lower_mesh, tx, mode,
                                                            say=lambda *a: None)
    part = partition_of(state["params"], mode, model_config)
    fn = jax.jit(step.make_train_step(graphdef, rest, tx, lr_schedule, step_cfg, part, shardings["opt_state"]),
                 donate_argnums=0, out_shardings=(shardings, parallel.replicated(lower_mesh)))
    t0 = time.perf_counter()
    with jax.set_mesh(lower_mesh):
        if host_lowering:
            compiled = _compile_with_host_memory(fn, (state, batch_struct(batch_shape, lower_mesh)), mesh)
        else:
            compiled = fn.lower(state, batch_struct(batch_shape, mesh)).compile()
    return compiled, time.perf_counter() - t0, state


def _cpu_mesh_like(mesh):
    import jax

    from jaxsft import parallel

    cpus = jax.devices("cpu")
    if len(cpus) < mesh.size:
        raise PlanError(f"an optimizer_offload plan for {mesh.size} GPUs is lowered on as many CPU devices; this "
                        f"process has {len(cpus)} (set XLA_FLAGS=--xla_force_host_platform_device_count={mesh.size} "
                        f"before jax starts)")
    return parallel.make_mesh(mesh.shape["dp"], mesh.shape["sp"], cpus[:mesh.size])


class _ClientExecutable:
    """What a plan reads of jax's Compiled (memory_analysis, as_text, runtime_executable), for an
    executable compiled directly by a device client."""

    def __init__(self, executable):
        self._executable = executable

    def memory_analysis(self):
        return self._executable.get_compiled_memory_stats()

    def as_text(self) -> str:
        return self._executable.hlo_modules()[0].to_string()

    def runtime_executable(self):
        return self._executable


def _compile_with_host_memory(fn, args, target_mesh):
    """`fn` lowered for CUDA where `args` live (CPU devices, whose pinned_host shardings survive
    lowering) and compiled by `target_mesh`'s compile-only CUDA client for its devices, as jax
    compiles a jitted function (one replica, a partition per device). jax has no public call that
    compiles a lowered module with another client: these private names are those of the pinned jax
    0.10.2 (pyproject), and tests/test_plan_modes.py fails if they move."""
    import numpy as np
    from jax._src import compiler
    from jax._src.lib import _jax

    lowered = fn.trace(*args).lower(lowering_platforms=("cuda",))
    devices = list(target_mesh.devices.flat)
    client = devices[0].client
    options = compiler.get_compile_options(num_replicas=1, num_partitions=len(devices),
                                           device_assignment=np.array(devices).reshape(1, -1), backend=client)
    options.parameter_is_tupled_arguments = bool(lowered._lowering.compile_args.get("tuple_args", False))
    return _ClientExecutable(client.compile(lowered.compiler_ir("stablehlo"), _jax.DeviceList(tuple(devices)), options))


def _peak(ma) -> int:
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes)


def _bytes(tree) -> int:
    """Per-device bytes of an abstract tree (each leaf's shard)."""
    import math

    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def make_plan(model_config, settings, target: Target, *, dp: int, sp: int, batch_shape: Sequence[int],
              tx, lr_schedule, step_cfg, mode: Mode = FULL) -> Plan:
    """Compile the train step for `target` with a (dp, sp) mesh and report its plan. Raises
    PlanError when a CUDA target's executable holds no CUDA machine code."""
    from jaxsft import hlo_stats, metrics, parallel
    from jaxsft.model import blockwise

    if dp * sp != target.num_devices:
        raise PlanError(f"a dp={dp} × sp={sp} mesh needs {dp * sp} devices; the target {target.spec} has "
                        f"{target.num_devices}")
    mesh = parallel.make_mesh(dp, sp, list(target.devices))
    platform = "gpu" if target.platform == "cuda" else "cpu"  # the blocks of the blockwise attention
    try:
        with blockwise.compiling_for(platform):
            compiled, seconds, state = compile_train_step(model_config, settings, mesh, batch_shape, tx, lr_schedule,
                                                          step_cfg, mode)
    except Exception as e:
        if "ptxas" in str(e) or "PTX compilation" in str(e):
            raise PlanError(f"XLA found no CUDA compiler (ptxas) for {target.spec}: pip install nvidia-cuda-nvcc-cu12 "
                            f"({_first_line(e)})") from None
        raise
    ma = compiled.memory_analysis()
    peak = _peak(ma)
    stats = hlo_stats.analyse(compiled.as_text(), seq_len=batch_shape[-1])
    cubins = None
    if target.platform == "cuda":
        cubins = hlo_stats.cuda_binaries(compiled)
        if cubins == 0:
            raise PlanError(f"the executable compiled for {target.spec} holds no CUDA machine code (no cubin): "
                            f"XLA could not run ptxas; pip install nvidia-cuda-nvcc-cu12")
    k, rows, t = batch_shape
    model_flops = metrics.training_flops_per_token(model_config, t) * k * rows * t / target.num_devices
    return Plan(
        target=target.spec, devices=target.num_devices, mesh={"dp": dp, "sp": sp},
        compiled_for=f"{target.platform}: {target.device_kind}", settings=_settings_dict(settings, step_cfg),
        batch_shape=list(batch_shape), argument_bytes=int(ma.argument_size_in_bytes),
        output_bytes=int(ma.output_size_in_bytes), alias_bytes=int(ma.alias_size_in_bytes),
        temp_bytes=int(ma.temp_size_in_bytes), per_device_peak_bytes=int(peak),
        device_memory_bytes=int(target.usable_bytes), device_total_bytes=int(target.memory_bytes),
        memory_fraction=target.memory_fraction, fits=fits(peak, target.usable_bytes), compile_s=seconds,
        step_flops=stats.step_flops, model_flops=model_flops, opaque_calls=stats.opaque_calls,
        collectives=stats.collectives, collectives_per_step=stats.collectives_per_step, tt_buffers=stats.tt_buffers,
        cuda_binaries=cubins, target_config=target.target_config,
        trained=partition_of(state["params"], mode, model_config).what, opt_state_bytes=_bytes(state["opt_state"]),
        host_argument_bytes=int(ma.host_argument_size_in_bytes), host_temp_bytes=int(ma.host_temp_size_in_bytes),
        host_peak_bytes=int(ma.host_argument_size_in_bytes + ma.host_output_size_in_bytes - ma.host_alias_size_in_bytes
                            + ma.host_temp_size_in_bytes))


def _settings_dict(settings, step_cfg) -> dict:
    out = dataclasses.asdict(settings)
    out["grad_accum_dtype"] = getattr(step_cfg, "grad_accum_dtype", "float32")
    out["accumulate_in_backward"] = getattr(step_cfg, "accumulate_in_backward", False)
    return out


def fits(peak_bytes: float, usable_bytes: float) -> bool:
    return peak_bytes <= (1.0 - FIT_MARGIN) * usable_bytes


# ---- choosing settings that fit ----------------------------------------------------------------------


@dataclasses.dataclass
class Choice:
    remat_policy: str
    micro_batch_size: int
    plan: Plan
    tried: list[tuple[str, int, float]]  # (policy, micro-batch, peak bytes) in the order compiled
    reason: str  # one line


def choose(make: Callable[[str, int], Plan], *, policies: Sequence[str], micro_batches: Sequence[int]) -> Choice:
    """The cheapest (policy, micro-batch) whose plan fits: policies in order of increasing
    recomputation, and for each the largest micro-batch that fits (binary search, memory growing
    with the micro-batch). `make(policy, micro_batch)` compiles one candidate. If nothing fits,
    the last (smallest) candidate is returned with fits=False."""
    sizes = sorted(set(micro_batches), reverse=True)
    tried: list[tuple[str, int, float]] = []
    cache: dict[tuple[str, int], Plan] = {}

    def plan(policy, b):
        if (policy, b) not in cache:
            cache[(policy, b)] = p = make(policy, b)
            tried.append((policy, b, p.per_device_peak_bytes))
        return cache[(policy, b)]

    for policy in policies:
        if not plan(policy, sizes[-1]).fits:  # the smallest micro-batch does not fit: more recompute
            continue
        lo, hi = 0, len(sizes) - 1  # sizes[hi] fits; find the first (largest) index that fits
        while lo < hi:
            mid = (lo + hi) // 2
            if plan(policy, sizes[mid]).fits:
                hi = mid
            else:
                lo = mid + 1
        best = plan(policy, sizes[hi])
        return Choice(policy, sizes[hi], best, tried, _reason(best, policy, sizes[hi], tried, policies, sizes))
    last = plan(policies[-1], sizes[-1])
    return Choice(policies[-1], sizes[-1], last, tried, _reason(last, policies[-1], sizes[-1], tried, policies, sizes))


def _reason(p: Plan, policy: str, b: int, tried, policies, sizes) -> str:
    what = []
    if len(policies) > 1:
        what.append(f"model.remat_policy={policy}")
    if len(sizes) > 1:
        what.append(f"data.micro_batch_size_per_gpu={b}")
    rejected = [f"{pol}/{mb}: {_gib(peak)}" for pol, mb, peak in tried if (pol, mb) != (policy, b)]
    limit = (1 - FIT_MARGIN) * p.device_memory_bytes
    verdict = "fits" if p.fits else "is the smallest candidate and still DOES NOT FIT"
    return (f"[plan] auto: {', '.join(what)} ({policy}/{b} plans {_gib(p.per_device_peak_bytes)} per device and {verdict} "
            f"in {_gib(limit)} = {1 - FIT_MARGIN:.0%} of {_gib(p.device_memory_bytes)} usable on {p.target}"
            + (f"; rejected: {', '.join(rejected)}" if rejected else "") + ")")


def divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def micro_batch_shape(rows_per_rank: int, micro_batch: int, dp: int, seq_len: int) -> list[int]:
    """[K, rows, T] for `rows_per_rank` rows per dp rank split into micro-batches of `micro_batch`."""
    return [math.ceil(rows_per_rank / micro_batch), dp * micro_batch, seq_len]


# ---- one call for the trainer ---------------------------------------------------------------------


def attention_for(target: Target, implementation: str) -> str:
    """The attention backend the target would run: `auto` resolves as on the target's platform.
    For a GPU that is not here that is the first GPU kernel (on the real GPU, `auto` still runs
    its self-check at start-up and falls back to xla if it fails)."""
    from jaxsft.model import attention

    if implementation != "auto":
        return attention.resolve(implementation)
    if target.kind in TARGET_CONFIGS:
        return attention.AUTO_ORDER["gpu"][0]
    return attention.resolve("auto")


def plan_run(target: Target, *, model_config, settings_kwargs: dict, remat_policy: str, micro_batch,
             samples_per_rank: int, rows_per_rank: int, dp: int, sp: int, seq_len: int, tx, lr_schedule,
             step_cfg, mode: Mode = FULL) -> Choice:
    """Plan the run's train step on `target`; `remat_policy` and `micro_batch` may be "auto"
    (then chosen by `choose`; micro-batch candidates are the divisors of samples_per_rank, as the
    loader requires). rows_per_rank: rows one dp rank processes per step (its samples when padding;
    the most packed rows any step needs when packing)."""
    from jaxsft.model.qwen2 import ModelSettings

    kwargs = dict(settings_kwargs, attn_implementation=attention_for(target, settings_kwargs["attn_implementation"]))
    policies = AUTO_REMAT_ORDER if remat_policy == "auto" else (remat_policy,)
    sizes = divisors_descending(samples_per_rank) if micro_batch == "auto" else [int(micro_batch)]

    def make(policy: str, b: int) -> Plan:
        settings = ModelSettings(**kwargs, remat_policy=policy)
        cfg = dataclasses.replace(step_cfg, accumulate_in_backward=accumulates_in_backward(settings))
        return make_plan(model_config, settings, target, dp=dp, sp=sp,
                         batch_shape=micro_batch_shape(rows_per_rank, b, dp, seq_len), tx=tx,
                         lr_schedule=lr_schedule, step_cfg=cfg, mode=mode)

    return choose(make, policies=policies, micro_batches=sizes)


def accumulates_in_backward(settings) -> bool:
    from jaxsft import step

    return step.accumulates_in_backward(settings)


# ---- the run's plan: `auto` settings at start-up, and --dry_run ------------------------------------


def _plan_for(settings, target: Target, model_config, train_set, dp: int, added=None) -> Choice:
    """Plan the run's train step on `target`, choosing the `auto` settings (jaxsft.plan.choose)."""
    from jaxsft import data, optim, step

    d, sp = settings.data, settings.trainer.ulysses_sequence_parallel_size
    per_rank = d.train_batch_size // dp
    rows = per_rank
    if d.packing != "none":  # the most packed rows a rank needs in any step of the run
        rows = data.TrainLoader(train_set, train_batch_size=d.train_batch_size, micro_batch_size_per_gpu=1, dp=dp,
                                max_length=d.max_length, packing=d.packing, seed=settings.trainer.seed,
                                total_epochs=settings.trainer.total_epochs, verbose=False).num_micro_batches
    total_steps = len(train_set) // d.train_batch_size * settings.trainer.total_epochs
    tx, lr_schedule = optim.make_optimizer(settings.optim, total_steps, settings.model.trained_dtype)
    m, t = settings.model, settings.trainer
    step_cfg = step.StepConfig(loss_normalization=t.loss_normalization, balance_dp_token=t.balance_dp_token, dp=dp,
                               chunk_size=t.loss_chunk_size, grad_accum_dtype=settings.optim.grad_accum_dtype,
                               dropout_seed=t.seed if m.lora is not None and m.lora.dropout > 0 else None)
    try:
        return plan_run(target, model_config=model_config, settings_kwargs=dict(
            param_dtype=m.param_dtype, compute_dtype=m.compute_dtype, scan_layers=m.scan_layers,
            attn_implementation=m.attn_implementation, lora=m.lora), remat_policy=m.remat_policy,
            micro_batch=d.micro_batch_size_per_gpu, samples_per_rank=per_rank, rows_per_rank=rows, dp=dp, sp=sp,
            seq_len=d.max_length, tx=tx, lr_schedule=lr_schedule, step_cfg=step_cfg, mode=mode_of(settings, added))
    except ValueError as e:
        if isinstance(e, UserError):
            raise
        raise PlanError(str(e)) from None  # a setting ModelSettings refuses, naming its key


def settle_auto(settings, train_set, model_config, mesh, added=None, say=print):
    """`settings` with `model.remat_policy=auto` / `data.micro_batch_size_per_gpu=auto` chosen by
    plan on this machine's devices (compile only, nothing runs); unchanged without `auto`."""
    from jaxsft.config.settings import with_choices

    if AUTO not in (settings.model.remat_policy, settings.data.micro_batch_size_per_gpu):
        return settings
    import jax

    target = get_target("gpu" if jax.default_backend() == "gpu" else "cpu")
    choice = _plan_for(settings, target, model_config, train_set, mesh.shape["dp"], added)
    say(choice.reason)
    return with_choices(settings, remat_policy=choice.remat_policy, micro_batch_size_per_gpu=choice.micro_batch_size)


def dry_run(settings, spec: str, json_path: str | None = None, say=print) -> None:
    """`--dry_run=TARGET`: read the data (its summary as a run prints it), build the model
    abstractly from config.json (no weights), plan the train step for `target`, print the plan and
    write `json_path`; a PlanError (exit 2, one line) when it does not fit, after printing it."""
    import json

    from jaxsft import data, hf, parallel
    from jaxsft.config import check_devices

    target = get_target(spec)
    dp, sp = check_devices(settings, target.num_devices)
    mesh = parallel.make_mesh(dp, sp, list(target.devices))
    say(f"[jaxsft] planning for {target.spec} ({target.num_devices} × {target.device_kind}), mesh dp={dp} sp={sp}; "
        f"nothing runs")
    model_dir = hf.model_directory(settings.model)
    model_config = hf.read_config(model_dir)
    parallel.check_heads(model_config, mesh)
    tokenizer = hf.load_tokenizer(model_dir, trust_remote_code=settings.model.trust_remote_code)
    added, model_config = hf.extend_vocabulary(settings.model.added_tokens, tokenizer, model_config, say=say)
    d = settings.data
    if d.cache_dir and not os.path.isdir(d.cache_dir):  # a plan creates nothing (no run directory): no new cache
        d = dataclasses.replace(d, cache_dir=None)
    train, _ = data.build_datasets(d, tokenizer, vocab_size=model_config.vocab_size)
    choice = _plan_for(settings, target, model_config, train, dp, added)
    if AUTO in (settings.model.remat_policy, settings.data.micro_batch_size_per_gpu):
        say(choice.reason)
    for line in choice.plan.describe():
        say(line)
    if json_path:
        out = dict(choice.plan.to_json(), auto={"reason": choice.reason, "tried": [
            {"remat_policy": p, "micro_batch_size_per_gpu": b, "per_device_peak_bytes": peak}
            for p, b, peak in choice.tried]})
        Path(json_path).write_text(json.dumps(out, indent=1) + "\n")
        say(f"[plan] written to {json_path}")
    p = choice.plan
    if not p.fits:
        raise PlanError(f"the plan for {p.target} does not fit: {p.per_device_peak_bytes / GiB:.2f} GiB per device "
                        f"planned, {(1 - FIT_MARGIN) * p.device_memory_bytes / GiB:.2f} GiB allowed "
                        f"({1 - FIT_MARGIN:.0%} of {p.device_memory_bytes / GiB:.2f} GiB usable)")
