"""The configuration resolved once, at the edge, into the typed settings of jaxsft.settings.

`resolve(composed)` does every check that needs no device and no file: choices, ranges, keys that
must stay null, the verl and jaxsft spellings of one setting (the later source wins: command line
over recipe over default; the same source saying two different things is an error), keys jaxsft
refuses, and the notes for keys that change nothing here; one function per section builds that
section's settings. `jaxsft.settings.check_devices(settings, n)` adds what depends on the device
count. Nothing downstream re-reads the raw configuration or re-checks it.
"""

from __future__ import annotations

import importlib.util
import math
import os

from jaxsft import trainable as trainable_items
from jaxsft.config.compose import Composed, check_value
from jaxsft.config.keys import BY_NAME, KEYS, nested
from jaxsft.errors import ConfigError
from jaxsft.hf.writer import parse_size
from jaxsft.model import attention, lora, remat
from jaxsft.settings import (AFTER_EACH_EPOCH, AUTO, CONTENTS, DTYPES, LOGGERS, CheckpointSettings, DataSettings,
                             LoRASettings, ModelSettings, OptimSettings, Settings, TinyModel, TrainerSettings)

def recorded_default(name: str):
    """Key `name`'s default in the form `config` (and so a checkpoint's meta) records it, e.g. a
    list for a list-valued key: how a record written before the key existed is read."""
    key = BY_NAME[name]
    return _plain(check_value(key, key.default, "its default"))


def _layer(c: Composed, name: str) -> int:
    return 2 if name in c.from_command_line else 1 if name in c.explicit else 0


def _choose(c: Composed, a: str, b: str, consistent, from_b):
    """The value of `a`, two keys spelling one setting: the one set by the later source wins;
    the same source setting both inconsistently is an error."""
    va, vb = c.values[a], c.values[b]
    la, lb = _layer(c, a), _layer(c, b)
    if lb > la:
        return from_b(vb, va)
    if la == lb and la > 0 and not consistent(va, vb):
        raise ConfigError(f"{a}={va!r} and {b}={vb!r} say different things; set one of them")
    return va


def _fail(message: str):
    raise ConfigError(message)


def _positive(v: dict, *names: str) -> None:
    for name in names:
        if v[name] <= 0:
            _fail(f"{name}={v[name]} must be a positive integer")


def _frequency(v: dict, name: str) -> None:
    f = v[name]
    if f == AFTER_EACH_EPOCH or f == -1 or (isinstance(f, int) and f > 0):
        return
    _fail(f"{name}={f!r}: use a positive step count, -1 (only at the end) or {AFTER_EACH_EPOCH}")


def _refused(v: dict) -> None:
    """verl keys whose features jaxsft does not have: refused when set, never ignored."""
    if v["data.chat_template"] is not None:
        _fail("data.chat_template must stay null: the tokenizer's own chat template is used (as in verl)")
    for name in ("data.custom_cls.path", "data.custom_cls.name"):
        if v[name] is not None:
            _fail(f"{name} is set: custom dataset classes are not supported; jaxsft reads verl's parquet layouts "
                  f"(data.multiturn.enable=true for chats, else prompt/response columns)")
    for name in ("model.fsdp_config.cpu_offload", "model.fsdp_config.offload_params"):
        if v[name]:
            _fail(f"{name}=true: jaxsft does not offload parameters (in verl 0.7.0 this key acts only with "
                  f"model.strategy=fsdp); to keep the Adam moments in host memory set "
                  f"model.fsdp_config.optimizer_offload=true, and set {name}=false")
    if v["trainer.default_hdfs_dir"] is not None:
        _fail("trainer.default_hdfs_dir is set: jaxsft does not copy checkpoints to HDFS; copy the "
              "trainer.default_local_dir step directories yourself, or set it to null")
    if v["optim.override_optimizer_config"]:
        _fail("optim.override_optimizer_config is set: jaxsft's AdamW takes optim.lr, optim.betas, optim.eps and "
              "optim.weight_decay only")
    if v["optim.total_training_steps"] != -1:
        _fail(f"optim.total_training_steps={v['optim.total_training_steps']} is read by verl's engine trainer only; "
              f"use trainer.total_training_steps (and the epochs set the schedule's horizon, as in verl)")
    for name in ("optim.lr_scheduler_type", "optim.warmup_style"):
        if v[name] is not None:
            _fail(f"{name} is read by verl's engine trainer only; this trainer uses optim.lr_scheduler (cosine or wsd)")


_LORA_KEYS = ("model.lora_alpha", "model.target_modules", "model.lora_dropout", "model.target_parameters")


def _training_mode(c: Composed, v: dict, notes: list[str]):
    """(LoRA settings or None, trainable items) from the LoRA keys and model.trainable, checked."""
    ALL, NEW_TOKENS = trainable_items.ALL, trainable_items.NEW_TOKENS
    rank = v["model.lora_rank"]
    trainable = tuple(v["model.trainable"])
    if not trainable or (ALL in trainable and len(trainable) > 1):
        _fail(f"model.trainable={list(trainable)}: give {ALL} alone, {NEW_TOKENS}, or a list of parameter-name patterns")
    if NEW_TOKENS in trainable and v["model.added_tokens"] is None:
        _fail(f"model.trainable includes {NEW_TOKENS} but model.added_tokens is not set: there are no new tokens")
    if rank < 0:
        _fail(f"model.lora_rank={rank} must be >= 0 (0 = full fine-tuning)")
    if rank == 0:
        notes.extend(f"{name}={v[name]!r} has no effect: model.lora_rank=0 (full fine-tuning)" for name in _LORA_KEYS
                     if name in c.explicit and v[name] != BY_NAME[name].default)
        return None, trainable
    if v["model.lora_alpha"] <= 0:
        _fail(f"model.lora_alpha={v['model.lora_alpha']} must be positive (the adapters are scaled by alpha / rank)")
    if not 0.0 <= v["model.lora_dropout"] < 1.0:
        _fail(f"model.lora_dropout={v['model.lora_dropout']} must lie in [0, 1)")
    if trainable != (ALL,):
        _fail(f"model.trainable={list(trainable)} with model.lora_rank={rank}: LoRA trains the adapters only; "
              f"set model.trainable={ALL}, or model.lora_rank=0 to train {list(trainable)}")
    if v["model.added_tokens"] is not None:
        _fail(f"model.added_tokens with model.lora_rank={rank}: a PEFT adapter cannot carry a resized vocabulary here; "
              f"add the tokens in a first run (model.trainable={NEW_TOKENS}, lora_rank 0), then train LoRA on its export")
    try:
        targets = lora.target_names(v["model.target_modules"])
        parameters = lora.target_parameters(v["model.target_parameters"])
    except ValueError as e:
        _fail(str(e))
    if parameters and v["model.lora_dropout"]:
        _fail(f"model.lora_dropout={v['model.lora_dropout']} with model.target_parameters: PEFT's LoRA on parameters "
              f"has no dropout (the input of one expert's adapter is not its own); set model.lora_dropout=0")
    return LoRASettings(rank=rank, alpha=float(v["model.lora_alpha"]), targets=targets,
                        dropout=float(v["model.lora_dropout"]), parameters=parameters), trainable


def _notes(c: Composed, v: dict) -> list[str]:
    notes = [f"{name}={v[name]!r} has no effect: {BY_NAME[name].inert}" for name in sorted(c.explicit)
             if BY_NAME[name].inert and v[name] != BY_NAME[name].default]
    return notes


def resolve(c: Composed) -> Settings:
    """Typed settings from a composed configuration, or a ConfigError naming the key."""
    v = dict(c.values)
    _refused(v)
    _positive(v, "data.max_length", "data.train_batch_size", "trainer.total_epochs",
              "ulysses_sequence_parallel_size", "trainer.loss_chunk_size", "trainer.log_every")
    notes = _notes(c, v)
    data = _data(c, v)
    model = _model(c, v, notes)
    optim = _optim(v)
    checkpoint = _checkpoint(v, model.param_dtype)
    trainer = _trainer(c, v, data, notes)
    if not data.multiturn and data.mask_mode != "per_message":
        notes.append(f"data.multiturn.mask_mode={data.mask_mode!r} has no effect: data.multiturn.enable=false")
    elif data.mask_mode == "whole_chat" and data.ignore_input_ids_mismatch:
        notes.append("data.ignore_input_ids_mismatch=True has no effect: data.multiturn.mask_mode='whole_chat' "
                     "trains on the whole-chat rendering, there is no per-message rendering to differ from it")
    for switch, where in (("data.cache", "data.cache_dir"), ("trainer.compile_cache", "trainer.compile_cache_dir")):
        if not v[switch] and v[where] is not None:
            notes.append(f"{where}={v[where]!r} has no effect: {switch}=false")

    # The effective configuration, as config.yaml and the checkpoint meta record it.
    param_dtype, remat_policy, packing = model.param_dtype, model.remat_policy, data.packing
    v.update({"model.param_dtype": param_dtype, "model.fsdp_config.model_dtype": "bf16" if param_dtype == "bfloat16" else "fp32",
              "model.remat_policy": remat_policy, "model.enable_gradient_checkpointing": remat_policy != "none",
              "data.packing": packing, "use_remove_padding": packing != "none",
              "trainer.checkpoint.load_contents": checkpoint.load_contents, "trainer.checkpoint.hf_dtype": checkpoint.hf_dtype,
              "model.compute_dtype": model.compute_dtype, "optim.mu_dtype": optim.mu_dtype,
              "optim.grad_accum_dtype": optim.grad_accum_dtype})
    for name in ("messages_key", "tools_key", "enable_thinking_key"):
        v[f"data.{name}"] = v[f"data.multiturn.{name}"] = getattr(data, name)
    config = nested({k.name: _plain(v[k.name]) for k in KEYS})
    return Settings(data, model, optim, trainer, checkpoint, config, tuple(notes), c.recipe)


def _data(c: Composed, v: dict) -> DataSettings:
    if v["data.micro_batch_size_per_gpu"] != AUTO:
        _positive(v, "data.micro_batch_size_per_gpu")
    if v["data.train_files"] is None:
        _fail("data.train_files is not set: give a data file, directory or glob, or a list of them")
    packing = _choose(c, "data.packing", "use_remove_padding", lambda a, b: (a != "none") == b,
                      lambda b, a: (a if a != "none" else "first_fit") if b else "none")
    keys = {name: _choose(c, f"data.{name}", f"data.multiturn.{name}", lambda a, b: a == b, lambda b, a: b)
            for name in ("messages_key", "tools_key", "enable_thinking_key")}
    if v["data.tokenize_workers"] < 0:
        _fail(f"data.tokenize_workers={v['data.tokenize_workers']} must be >= 0 (0 = one per CPU core)")
    if v["data.max_length"] % v["ulysses_sequence_parallel_size"]:
        _fail(f"data.max_length={v['data.max_length']} must be divisible by "
              f"ulysses_sequence_parallel_size={v['ulysses_sequence_parallel_size']}")
    return DataSettings(
        train_files=v["data.train_files"], val_files=v["data.val_files"] or (),
        train_max_samples=v["data.train_max_samples"], val_max_samples=v["data.val_max_samples"],
        multiturn=v["data.multiturn.enable"], **keys, enable_thinking_default=v["data.enable_thinking_default"],
        prompt_key=v["data.prompt_key"], response_key=v["data.response_key"],
        prompt_dict_keys=v["data.prompt_dict_keys"] or (), response_dict_keys=v["data.response_dict_keys"] or (),
        max_length=v["data.max_length"], truncation=v["data.truncation"],
        apply_chat_template_kwargs=dict(v["data.apply_chat_template_kwargs"]),
        ignore_input_ids_mismatch=v["data.ignore_input_ids_mismatch"], mask_mode=v["data.multiturn.mask_mode"],
        train_batch_size=v["data.train_batch_size"],
        micro_batch_size_per_gpu=v["data.micro_batch_size_per_gpu"], packing=packing,
        balance_dp_token=v["data.balance_dp_token"], train_weights=_train_weights(v),
        cache_dir=(v["data.cache_dir"] or os.path.join(v["trainer.default_local_dir"], "data_cache"))
        if v["data.cache"] else None,
        tokenize_workers=v["data.tokenize_workers"])


def _model(c: Composed, v: dict, notes: list[str]) -> ModelSettings:
    if v["model.partial_pretrain"] is None:
        _fail("model.partial_pretrain is not set: give the Hugging Face model directory")
    param_dtype = DTYPES[_choose(c, "model.param_dtype", "model.fsdp_config.model_dtype",
                                 lambda a, b: DTYPES[a] == DTYPES[b], lambda b, a: b)]
    policy = _choose(c, "model.remat_policy", "model.enable_gradient_checkpointing",
                     lambda a, b: (a != "none") == b,
                     lambda b, a: (a if a != "none" else "minimal") if b else "none")
    if policy != AUTO:
        _checked(remat.check_policy, policy)
    if v["model.attn_implementation"] != "auto":
        _checked(attention.check_backend, v["model.attn_implementation"])
    lora_settings, trainable = _training_mode(c, v, notes)
    tiny = None
    if v["model.build_tiny_from"] and "model.partial_pretrain" not in c.from_command_line:
        tiny = TinyModel(v["model.build_tiny_from"], tuple(dict(v["model.tiny"]).items()), v["trainer.seed"])
    coef = v["model.router_aux_loss_coef"]
    if coef is not None and not coef >= 0:
        _fail(f"model.router_aux_loss_coef={coef} must be >= 0 (0 = no load-balancing loss)")
    capacity = v["model.expert_capacity_factor"]
    if capacity is not None and not (capacity > 0 and v["model.expert_layout"] == "expert"):
        _fail(f"model.expert_capacity_factor={capacity}: give a number > 0, with model.expert_layout=expert "
              f"(the fsdp layout drops no token)")
    return ModelSettings(
        partial_pretrain=v["model.partial_pretrain"], trust_remote_code=v["model.trust_remote_code"],
        external_lib=v["model.external_lib"], tiny=tiny, param_dtype=param_dtype,
        compute_dtype=DTYPES[v["model.compute_dtype"]], remat_policy=policy, scan_layers=v["model.scan_layers"],
        attn_implementation=v["model.attn_implementation"], lora=lora_settings, added_tokens=v["model.added_tokens"],
        trainable=trainable, optimizer_offload=v["model.fsdp_config.optimizer_offload"],
        router_aux_loss_coef=coef, expert_layout=v["model.expert_layout"], expert_capacity_factor=capacity,
        expert_matmul=v["model.expert_matmul"])


def _optim(v: dict) -> OptimSettings:
    if not 0.0 <= v["optim.lr_warmup_steps_ratio"] <= 1.0:
        _fail(f"optim.lr_warmup_steps_ratio={v['optim.lr_warmup_steps_ratio']} must lie in [0, 1]")
    if len(v["optim.betas"]) != 2 or not all(0.0 <= b < 1.0 for b in v["optim.betas"]):
        _fail(f"optim.betas={list(v['optim.betas'])} must be two numbers in [0, 1)")
    for name, ok, what in (("optim.lr", v["optim.lr"] >= 0, ">= 0"), ("optim.weight_decay", v["optim.weight_decay"] >= 0, ">= 0"),
                           ("optim.eps", v["optim.eps"] > 0, "> 0"), ("optim.clip_grad", v["optim.clip_grad"] > 0, "> 0"),
                           ("optim.min_lr_ratio", 0.0 <= v["optim.min_lr_ratio"] <= 1.0, "in [0, 1]"),
                           ("optim.num_cycles", v["optim.num_cycles"] > 0, "> 0")):
        if not ok:
            _fail(f"{name}={v[name]} must be {what}")
    return OptimSettings(
        lr=v["optim.lr"], betas=tuple(v["optim.betas"]), weight_decay=v["optim.weight_decay"], eps=v["optim.eps"],
        lr_warmup_steps_ratio=v["optim.lr_warmup_steps_ratio"], lr_warmup_steps=v["optim.lr_warmup_steps"],
        clip_grad=v["optim.clip_grad"], lr_scheduler=v["optim.lr_scheduler"], min_lr_ratio=v["optim.min_lr_ratio"],
        num_cycles=v["optim.num_cycles"], mu_dtype=DTYPES[v["optim.mu_dtype"]] if v["optim.mu_dtype"] else None,
        grad_accum_dtype=DTYPES[v["optim.grad_accum_dtype"]])


def _checkpoint(v: dict, param_dtype: str) -> CheckpointSettings:
    for name in ("trainer.save_freq", "trainer.test_freq"):
        _frequency(v, name)
    if v["trainer.max_ckpt_to_keep"] is not None and v["trainer.max_ckpt_to_keep"] < 0:
        _fail(f"trainer.max_ckpt_to_keep={v['trainer.max_ckpt_to_keep']} must be >= 0 (null or 0 = keep all)")
    save_contents = tuple(v["trainer.checkpoint.save_contents"])
    load_contents = tuple(v["trainer.checkpoint.load_contents"] if v["trainer.checkpoint.load_contents"] is not None
                          else save_contents)
    for name, items in (("trainer.checkpoint.save_contents", save_contents),
                        ("trainer.checkpoint.load_contents", load_contents)):
        unknown = [x for x in items if x not in CONTENTS]
        if unknown:
            _fail(f"{name} has {unknown}: allowed are {', '.join(CONTENTS)}")
    try:
        parse_size(v["trainer.checkpoint.max_shard_size"])
    except ValueError as e:
        _fail(f"trainer.checkpoint.{e}")
    if v["trainer.resume_mode"] == "resume_path" and not v["trainer.resume_from_path"]:
        _fail("trainer.resume_mode=resume_path needs trainer.resume_from_path (a .../global_step_N directory)")
    return CheckpointSettings(
        default_local_dir=v["trainer.default_local_dir"], save_contents=save_contents, load_contents=load_contents,
        hf_dtype=DTYPES[v["trainer.checkpoint.hf_dtype"]] if v["trainer.checkpoint.hf_dtype"] else param_dtype,
        async_save=v["trainer.checkpoint.async_save"],
        max_shard_size=v["trainer.checkpoint.max_shard_size"], max_ckpt_to_keep=v["trainer.max_ckpt_to_keep"] or 0,
        save_freq=v["trainer.save_freq"], resume_mode=v["trainer.resume_mode"],
        resume_from_path=v["trainer.resume_from_path"],
        resume_accept_changed_data=v["trainer.resume_accept_changed_data"])


def _trainer(c: Composed, v: dict, data: DataSettings, notes: list[str]) -> TrainerSettings:
    if v["trainer.total_training_steps"] is not None and v["trainer.total_training_steps"] <= 0:
        _fail(f"trainer.total_training_steps={v['trainer.total_training_steps']} must be positive or null")
    if v["trainer.seed"] < 0:
        _fail(f"trainer.seed={v['trainer.seed']} must be non-negative (it seeds the data order)")
    normalisation = v["trainer.loss_normalization"]
    if v["data.micro_batch_size_per_gpu"] == AUTO and normalisation != "global_tokens":
        _fail("data.micro_batch_size_per_gpu=auto needs trainer.loss_normalization=global_tokens: under verl's "
              "per-micro-batch normalisation the micro-batch size changes the loss")
    if normalisation == "verl" and data.packing != "none":
        why = "use_remove_padding=true packs rows" if _layer(c, "use_remove_padding") > _layer(c, "data.packing") \
            else f"data.packing={data.packing}"
        _fail(f"trainer.loss_normalization=verl needs padded rows, but {why}: verl's per-micro-batch token means are "
              f"defined on padded micro-batches (in verl, use_remove_padding does not change them); "
              f"set use_remove_padding=false / data.packing=none, or trainer.loss_normalization=global_tokens")
    if normalisation == "global_tokens" and v["data.balance_dp_token"] and "data.balance_dp_token" in c.explicit:
        notes.append("data.balance_dp_token=true has no effect under trainer.loss_normalization=global_tokens: every "
                     "loss token of the step already weighs the same on every rank and micro-batch; set "
                     "trainer.loss_normalization=verl for verl's formula")
    logger = tuple(v["trainer.logger"])
    for name in logger:
        if name not in LOGGERS:
            _fail(f"trainer.logger: unknown backend {name!r}; choose from {', '.join(LOGGERS)}")
    if "wandb" in logger and not _installed("wandb"):
        _fail("trainer.logger includes wandb (verl's default) but the wandb package is not installed: "
              "pip install wandb, or set trainer.logger=[console,file]")
    if "mlflow" in logger and not _installed("mlflow"):
        _fail("trainer.logger includes mlflow but the mlflow package is not installed: pip install 'jaxsft[mlflow]' "
              "(or mlflow-skinny with sqlalchemy and alembic), or leave mlflow out of trainer.logger")
    return TrainerSettings(
        project_name=v["trainer.project_name"],
        experiment_name=v["trainer.experiment_name"], total_epochs=v["trainer.total_epochs"],
        total_training_steps=v["trainer.total_training_steps"], logger=logger, seed=v["trainer.seed"],
        test_freq=v["trainer.test_freq"], device=v["trainer.device"], loss_normalization=normalisation,
        loss_chunk_size=v["trainer.loss_chunk_size"], loss_type=v["trainer.loss_type"],
        peak_flops_per_device=v["trainer.peak_flops_per_device"], log_every=v["trainer.log_every"],
        compile_cache_dir=((v["trainer.compile_cache_dir"] or os.path.join(v["trainer.default_local_dir"], "compile_cache"))
                           if v["trainer.compile_cache"] else None),
        coordinator_address=v["trainer.coordinator_address"], num_processes=v["trainer.num_processes"],
        process_id=v["trainer.process_id"], ulysses_sequence_parallel_size=v["ulysses_sequence_parallel_size"])


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # a module object without a spec (tests put None in sys.modules)
        return False


def _checked(check, value) -> None:
    """A model-layer check (ValueError naming the key) as the ConfigError the command line reports."""
    try:
        check(value)
    except ValueError as e:
        _fail(str(e))


def _train_weights(v: dict) -> tuple[float, ...] | None:
    """data.train_weights: null, or one positive finite weight per training file."""
    weights = v["data.train_weights"]
    if weights is None:
        return None
    files = v["data.train_files"]
    n = 1 if isinstance(files, str) else len(files)
    if len(weights) != n:
        _fail(f"data.train_weights has {len(weights)} weight(s) for {n} data.train_files: give one weight per file, "
              f"in the same order (or null to concatenate the files, as verl)")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        _fail(f"data.train_weights={list(weights)} must all be positive numbers")
    return tuple(weights)


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(x) for x in value]
    if isinstance(value, dict):
        return {k: _plain(x) for k, x in value.items()}
    return value
