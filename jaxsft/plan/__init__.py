"""Plan a training step without running it: compile the real train step for a target (this
machine's CPUs or GPUs, or N H100/H200 GPUs that are not here) and read XLA's memory plan, FLOPs
and collectives; choose the remat policy and micro-batch size that fit the device memory.

- `target`: what a plan compiles for (`get_target`, `prepare_environment`).
- `compile`: the real train step compiled for abstract state (`make_plan`, `compile_train_step`).
- `report`: one `Plan`, printed and as JSON.
- `choose`: the `auto` settings that fit (`choose`, `plan_run`, `plan_settings`).

The run's own setup (jaxsft.setup) calls these for `remat_policy=auto` and for `--dry_run`.
"""

from jaxsft.plan.choose import (AUTO_REMAT_ORDER, Choice, attention_for, choose, divisors_descending,
                                micro_batch_shape, plan_run, plan_settings, refuse_if_too_big)
from jaxsft.plan.compile import (FULL, Mode, _path_key, abstract_train_state, batch_struct, compile_train_step,
                                 make_plan, mode_of, partition_of)
from jaxsft.plan.report import FIT_MARGIN, GiB, Plan, fits
from jaxsft.plan.target import (_TARGET_DIR, JAX_DEFAULT_MEM_FRACTION, TARGET_CONFIGS, TARGET_KINDS, PlanError, Target,
                                device_memory_from_config, get_target, memory_fraction, parse_target,
                                prepare_environment, target_config_text)

__all__ = ["AUTO_REMAT_ORDER", "Choice", "FIT_MARGIN", "FULL", "GiB", "JAX_DEFAULT_MEM_FRACTION", "Mode", "Plan",
           "PlanError", "TARGET_CONFIGS", "TARGET_KINDS", "Target", "_TARGET_DIR", "_path_key", "abstract_train_state",
           "attention_for", "batch_struct", "choose", "compile_train_step", "device_memory_from_config",
           "divisors_descending", "fits", "get_target", "make_plan", "memory_fraction", "micro_batch_shape",
           "mode_of", "parse_target", "partition_of", "plan_run", "plan_settings", "prepare_environment",
           "refuse_if_too_big", "target_config_text"]
