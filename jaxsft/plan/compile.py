"""Compile the real train step for a plan, with nothing allocated: the model built abstractly from
config.json (`nnx.eval_shape`), the train state from the trainer's own init under `jax.eval_shape`
(jaxsft.train_state), and `jit(...).lower(...).compile()` for the target's devices; then read XLA's
memory plan, FLOPs and collectives (`make_plan`)."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax._src import compiler  # private: see _compile_with_host_memory
from jax._src.lib import _jax

from jaxsft import hlo_stats, metrics, offload, parallel, roofline, step, train_state, trainable
from jaxsft.data.loader import FIELDS
from jaxsft.model import blockwise
from jaxsft.model.decoder import CausalLM
from jaxsft.model.ulysses import valid_sp
from jaxsft.plan.report import Plan, fits
from jaxsft.plan.target import PlanError, Target, _first_line


@dataclasses.dataclass(frozen=True)
class Mode:
    """What trains and where its optimizer state lives: `spec` (jaxsft.settings.ModelSettings: `lora`,
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
    if mode.spec is None:
        return trainable.EVERYTHING
    return trainable.partition(params, mode.spec, model_config, mode.new_token_ids)


def abstract_train_state(model_config, settings, mesh, tx, mode: Mode = FULL, say=print):
    """(graphdef, rest, state, shardings) of jaxsft.train_state.init_train_state for a model built
    abstractly from `model_config` (no weights): the trainer's own init under `jax.eval_shape`,
    each leaf a ShapeDtypeStruct with the sharding the trainer would give it."""
    return _abstract_state(model_config, settings, mesh, tx, mode, say)[:4]


def _abstract_state(model_config, settings, mesh, tx, mode: Mode, say):
    with jax.set_mesh(mesh):
        model = nnx.eval_shape(lambda: CausalLM(model_config, settings, rngs=nnx.Rngs(0)))
    part = partition_of(nnx.state(model, nnx.Param), mode, model_config)
    graphdef, rest, state, shardings = train_state.abstract_train_state(
        model, tx, mesh, part, optimizer_offload=mode.optimizer_offload and offload.host_memory_kind(mesh) is not None,
        say=say)
    return graphdef, rest, state, shardings, part


def _path_key(path) -> tuple[str, ...]:
    return tuple(str(k) for k in path)


def batch_struct(batch_shape: Sequence[int], mesh, with_sources: bool = False):
    """The abstract global batch; `with_sources`: with the per-token source ids of a mixed run."""
    sharding = parallel.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(tuple(batch_shape), jnp.int32, sharding=sharding)
            for k in FIELDS + (("source_ids",) if with_sources else ())}


def compile_train_step(model_config, settings, mesh, batch_shape, tx, lr_schedule, step_cfg, mode: Mode = FULL,
                       lower_on_cpu: bool | None = None):
    """(compiled, seconds, abstract state) of the real train step for abstract state on `mesh`."""
    return _compile(model_config, settings, mesh, batch_shape, tx, lr_schedule, step_cfg, mode, lower_on_cpu)[:3]


def _compile(model_config, settings, mesh, batch_shape, tx, lr_schedule, step_cfg, mode: Mode = FULL,
             lower_on_cpu: bool | None = None):
    """compile_train_step, and the trainable partition.

    With optimizer_offload on compile-only CUDA devices (no memory spaces: jax would drop every
    pinned_host sharding) the step is lowered for CUDA on CPU devices of the same mesh shape, which
    have pinned_host, and compiled by the CUDA devices' client: XLA:GPU then plans the host
    placements and the streamed update, and reports host memory apart (`_compile_with_host_memory`).
    `lower_on_cpu` forces that route on or off (None: as just said)."""
    host_lowering = lower_on_cpu
    if host_lowering is None:
        host_lowering = (mode.optimizer_offload and offload.host_memory_kind(mesh) is None
                         and mesh.devices.flat[0].platform == "gpu")
    lower_mesh = _cpu_mesh_like(mesh) if host_lowering else mesh
    graphdef, rest, state, shardings, part = _abstract_state(model_config, settings, lower_mesh, tx, mode,
                                                             say=lambda *a: None)
    fn = jax.jit(step.make_train_step(graphdef, rest, tx, lr_schedule, step_cfg, part, shardings["opt_state"]),
                 donate_argnums=0, out_shardings=(shardings, parallel.replicated(lower_mesh)))
    t0, sources = time.perf_counter(), step_cfg.num_sources > 0
    with jax.set_mesh(lower_mesh):
        if host_lowering:
            compiled = _compile_with_host_memory(fn, (state, batch_struct(batch_shape, lower_mesh, sources)), mesh)
        else:
            compiled = fn.lower(state, batch_struct(batch_shape, mesh, sources)).compile()
    return compiled, time.perf_counter() - t0, state, part


def _cpu_mesh_like(mesh):
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
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def make_plan(model_config, settings, target: Target, *, dp: int, sp: int, batch_shape: Sequence[int],
              tx, lr_schedule, step_cfg, mode: Mode = FULL) -> Plan:
    """Compile the train step for `target` with a (dp, sp) mesh and report its plan. Raises
    PlanError when a CUDA target's executable holds no CUDA machine code."""
    if dp * sp != target.num_devices:
        raise PlanError(f"a dp={dp} × sp={sp} mesh needs {dp * sp} devices; the target {target.spec} has "
                        f"{target.num_devices}")
    mesh = parallel.make_mesh(dp, sp, list(target.devices))
    platform = "gpu" if target.platform == "cuda" else "cpu"  # the blocks of the blockwise attention
    try:
        with blockwise.compiling_for(platform):
            compiled, seconds, state, part = _compile(model_config, settings, mesh, batch_shape, tx, lr_schedule,
                                                      step_cfg, mode)
    except Exception as e:
        if "ptxas" in str(e) or "PTX compilation" in str(e):
            raise PlanError(f"XLA found no CUDA compiler (ptxas) for {target.spec}: pip install nvidia-cuda-nvcc-cu12 "
                            f"({_first_line(e)})") from None
        raise
    ma = compiled.memory_analysis()
    peak = _peak(ma)
    text = compiled.as_text()
    stats = hlo_stats.analyse(text, seq_len=batch_shape[-1])
    cubins = None
    if target.platform == "cuda":
        cubins = hlo_stats.cuda_binaries(compiled)
        if cubins == 0:
            raise PlanError(f"the executable compiled for {target.spec} holds no CUDA machine code (no cubin): "
                            f"XLA could not run ptxas; pip install nvidia-cuda-nvcc-cu12")
    k, rows, t = batch_shape
    model_flops = metrics.training_flops_per_token(model_config, t) * k * rows * t / target.num_devices
    # A GPU that is not here: what the compiled program would take at the GPU's peaks (not a measurement).
    estimate = roofline.to_dict(roofline.estimate(text, target.kind, model_flops)) if target.kind in roofline.TARGETS \
        else None
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
        trained=part.what, estimate=estimate, model=describe_model(model_config), opt_state_bytes=_bytes(state["opt_state"]),
        host_argument_bytes=int(ma.host_argument_size_in_bytes), host_temp_bytes=int(ma.host_temp_size_in_bytes),
        host_peak_bytes=int(ma.host_argument_size_in_bytes + ma.host_output_size_in_bytes - ma.host_alias_size_in_bytes
                            + ma.host_temp_size_in_bytes))


def describe_model(c) -> str:
    """Family, geometry and the Ulysses sp values the heads allow, for the plan's lines."""
    tied = ", tied embeddings" if c.tie_word_embeddings else ""
    experts = (f", {c.num_experts} experts of width {c.moe_intermediate_size} ({c.num_experts_per_tok} per token)"
               if c.num_experts else "")
    if c.num_experts and c.shared_expert_intermediate_size:
        experts += f" and a shared expert of width {c.shared_expert_intermediate_size}"
    if c.num_experts and c.dense_layers:
        experts += f"; layers {list(c.dense_layers)} dense"
    return (f"{c.model_type}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} query / "
            f"{c.num_key_value_heads} KV heads of head_dim {c.head_dim}{experts}{tied}; ulysses_sequence_parallel_size may be "
            f"{', '.join(map(str, valid_sp(c.num_attention_heads, c.num_key_value_heads)))}")


# The model settings that shape the compiled step (the plan's `settings` in --dry_run_json).
_COMPUTE_FIELDS = ("param_dtype", "compute_dtype", "scan_layers", "remat_policy", "attn_implementation", "lora")


def _settings_dict(settings, step_cfg) -> dict:
    out = {k: v for k, v in dataclasses.asdict(settings).items() if k in _COMPUTE_FIELDS}
    out["grad_accum_dtype"] = getattr(step_cfg, "grad_accum_dtype", "float32")
    out["accumulate_in_backward"] = getattr(step_cfg, "accumulate_in_backward", False)
    return out
