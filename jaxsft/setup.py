"""The setup of a run, in named phases shared by the trainer (jaxsft.train), `--dry_run` and bench/:

1. `start_runtime`: processes and devices → the (dp, sp) mesh (nothing touches a backend before it);
2. `find_model`: the base model directory, its config, tokenizer and added tokens;
3. `build_data`: the tokenised training and validation sets;
4. `settle_auto`: `auto` settings chosen by plan on this machine (compile only), before the loader;
5. `build_run_data`: the train loader, step counts, which steps validate and save;
6. `build_model`: the model (loaded, or abstract for a plan) and what of it trains;
7. `make_checkpointer`, `build_state`: the train state, fresh or restored — one restore-or-init path;
8. `compile_steps`: the jitted train and eval steps.

`dry_run` runs phases 2–3 and plans what phases 5–8 would compile, for a target that need not be here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax

from jaxsft import base_model, checkpoint, devices, distributed, hf, optim, parallel, plan, step, trainable
from jaxsft.config.resolve import recorded_default
from jaxsft.data import RunData, TrainLoader, build_datasets
from jaxsft.errors import ConfigError
from jaxsft.model.decoder import check_lora_targets
from jaxsft.settings import AUTO, Settings, check_devices, with_choices


def start_runtime(settings: Settings):
    """Start jax.distributed when the job has several processes, then the run's mesh."""
    distributed.start(settings.trainer)
    return devices.mesh_for(settings)


@dataclasses.dataclass
class BaseModel:
    dir: Path
    config: object  # jaxsft.model.config.ModelConfig, with the vocabulary of model.added_tokens
    tokenizer: object
    added: hf.AddedTokens | None


def find_model(settings: Settings, mesh, *, weights: bool = True, say=print) -> BaseModel:
    """The base model: directory, config.json, (the weights' headers), heads against sp, tokenizer
    and `model.added_tokens`. A plan reads no weights: its directory may have none."""
    model_dir = base_model.directory(settings.model)
    config = hf.read_config(model_dir)
    if weights:
        hf.check_weights(model_dir, config)  # from the files' headers: before the data work
    devices.check_heads(config, mesh, settings.model.expert_layout)
    check_lora_targets(config, settings.model)
    check_window(config, settings.data.max_length, model_dir)
    tokenizer = hf.load_tokenizer(model_dir, trust_remote_code=settings.model.trust_remote_code)
    added, config = hf.extend_vocabulary(settings.model.added_tokens, tokenizer, config, say=say)
    return BaseModel(model_dir, config, tokenizer, added)


def check_window(config, max_length: int, model_dir) -> None:
    """Mistral's sliding window: jaxsft attends over whole rows, which equals the window only when
    no row is longer than it (a packed row holds samples of at most max_length tokens too)."""
    window = getattr(config, "sliding_window", None)
    if window is not None and window < max_length:
        raise ConfigError(f"{model_dir}/config.json has sliding_window={window}, shorter than data.max_length="
                          f"{max_length}: jaxsft implements full causal attention only, so lower data.max_length "
                          f"to {window} or less (or set sliding_window to null if the model was trained without one)")


def build_data(settings: Settings, base: BaseModel, *, new_cache: bool = True):
    """(train, val or None); `new_cache=False` (a plan creates nothing) reads an existing data cache only."""
    d = settings.data
    if not new_cache and d.cache_dir and not os.path.isdir(d.cache_dir):
        d = dataclasses.replace(d, cache_dir=None)
    return build_datasets(d, base.tokenizer, vocab_size=base.config.vocab_size)


def _needs_plan(settings: Settings) -> bool:
    return AUTO in (settings.model.remat_policy, settings.data.micro_batch_size_per_gpu)


def _packed_rows(settings: Settings, train, dp: int) -> TrainLoader:
    """A loader at micro-batch 1: its micro-batch count is the most rows one rank needs in a step."""
    return TrainLoader.for_run(train, dataclasses.replace(settings, data=dataclasses.replace(
        settings.data, micro_batch_size_per_gpu=1)), dp=dp, pad_token_id=0, verbose=False)


def plan_for(settings: Settings, target, base: BaseModel, train, mesh, probe: TrainLoader | None = None):
    """The plan (jaxsft.plan.Choice) of this run's train step on `target`, `auto` settings chosen;
    `probe`: a micro-batch-1 loader already built (else one is built here)."""
    probe = probe or _packed_rows(settings, train, mesh.shape["dp"])
    return plan.plan_settings(settings, target, base.config, mesh, samples_per_rank=probe.per_rank,
                              rows_per_rank=probe.num_micro_batches, total_steps=probe.total_steps, added=base.added)


def settle_auto(settings: Settings, base: BaseModel, train, mesh, say=print) -> tuple[Settings, int | None]:
    """(`settings` with `model.remat_policy=auto` / `data.micro_batch_size_per_gpu=auto` chosen by
    plan on this machine's devices, the most packed rows a rank needs or None); unchanged without `auto`."""
    if not _needs_plan(settings):
        return settings, None
    probe = _packed_rows(settings, train, mesh.shape["dp"])
    target = plan.get_target("gpu" if jax.default_backend() == "gpu" else "cpu")
    choice = plan_for(settings, target, base, train, mesh, probe)
    say(choice.reason)
    settled = with_choices(settings, remat_policy=choice.remat_policy, micro_batch_size_per_gpu=choice.micro_batch_size)
    return settled, (probe.num_micro_batches if settings.data.packing != "none" else None)


def build_run_data(settings: Settings, base: BaseModel, train, val, mesh, *, max_rows_per_rank=None,
                   say=print) -> RunData:
    return RunData.build(settings, train, val, pad_token_id=base.tokenizer.pad_token_id, dp=mesh.shape["dp"],
                         process_index=jax.process_index(), process_count=jax.process_count(),
                         max_rows_per_rank=max_rows_per_rank, say=say)


def build_model(settings: Settings, base: BaseModel, mesh, say=print):
    """(model with its weights on the mesh, the trainable partition: LoRA adapters, new rows, or all)."""
    model = hf.load_model(base.dir, mesh, settings.model, seed=settings.trainer.seed, config=base.config)
    return model, trainable.for_model(model, settings.model, base.added, say=say)


def make_checkpointer(settings: Settings, base: BaseModel) -> checkpoint.Checkpointer:
    """The run's checkpointer (its meta records the configuration and the base model; the export
    carries LoRA and added tokens)."""
    defaults = {f"model.{k}": recorded_default(f"model.{k}") for k in checkpoint.MODE_KEYS}
    return checkpoint.Checkpointer.for_run(settings, base.dir, export=hf.Export(base.config, settings.model.lora, base.added),
                                           mode_defaults=defaults)


def build_state(settings: Settings, model, partition, run_data: RunData, mesh, checkpointer, say=print):
    """(graphdef, rest, state, shardings, tx, lr_schedule): the fresh train state, or the checkpoint's
    that the settings name — one restore-or-init path; the loader is repositioned here, with it."""
    tx, lr_schedule = optim.make_optimizer(settings.optim, run_data.total_steps, settings.model.trained_dtype)
    with jax.set_mesh(mesh):
        graphdef, rest, state, shardings = step.init_train_state(
            model, tx, mesh, partition, optimizer_offload=settings.model.optimizer_offload, say=say)

    def reposition(saved) -> None:
        run_data.loader.set_state(saved, accept_changed_data=settings.checkpoint.resume_accept_changed_data, say=say)

    state = checkpointer.resume(settings.checkpoint, state, shardings, restore_data=reposition, say=say)
    return graphdef, rest, state, shardings, tx, lr_schedule


def compile_steps(settings: Settings, graphdef, rest, tx, lr_schedule, shardings, mesh, partition):
    return step.compile_steps(graphdef, rest, tx, lr_schedule, step.StepConfig.of(settings, mesh), shardings, mesh,
                              partition)


def dry_run(settings: Settings, spec: str, json_path: str | None = None, say=print) -> None:
    """`--dry_run=TARGET`: the trainer's setup up to the data (its summary as a run prints it), the
    model built abstractly from config.json (no weights), the train step planned for `target`; the
    plan printed and written to `json_path`; a PlanError (exit 2, one line) when it does not fit."""
    target = plan.get_target(spec)
    dp, sp = check_devices(settings, target.num_devices)
    mesh = parallel.make_mesh(dp, sp, list(target.devices))
    say(f"[jaxsft] planning for {target.spec} ({target.num_devices} × {target.device_kind}), mesh dp={dp} sp={sp}; "
        f"nothing runs")
    base = find_model(settings, mesh, weights=False, say=say)
    train, _ = build_data(settings, base, new_cache=False)
    choice = plan_for(settings, target, base, train, mesh)
    if _needs_plan(settings):
        say(choice.reason)
    for line in choice.plan.describe():
        say(line)
    if json_path:
        out = dict(choice.plan.to_json(), auto={"reason": choice.reason, "tried": [
            {"remat_policy": p, "micro_batch_size_per_gpu": b, "per_device_peak_bytes": peak}
            for p, b, peak in choice.tried]})
        Path(json_path).write_text(json.dumps(out, indent=1) + "\n")
        say(f"[plan] written to {json_path}")
    plan.refuse_if_too_big(choice.plan)
