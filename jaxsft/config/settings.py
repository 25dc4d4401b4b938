"""The configuration resolved once, at the edge, into typed frozen settings per subsystem.

`resolve(composed)` does every check that needs no device and no file: choices, ranges, keys that
must stay null, the verl and jaxsft spellings of one setting (the later source wins: command line
over recipe over default; the same source saying two different things is an error), keys jaxsft
refuses, and the notes for keys that change nothing here. `check_devices(settings, n)` adds what
depends on the device count. Nothing downstream re-reads the raw configuration or re-checks it.

Field names are the key names (their last part), so `settings.optim.lr` is `optim.lr`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from jaxsft.config.compose import Composed, check_value
from jaxsft.config.errors import ConfigError
from jaxsft.config.keys import AFTER_EACH_EPOCH, AUTO, BY_NAME, KEYS, nested

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
LOGGERS = ("console", "tqdm", "tensorboard", "file", "wandb")
CONTENTS = ("model", "optimizer", "extra", "hf_model")


@dataclasses.dataclass(frozen=True)
class DataSettings:
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]  # () = no validation
    train_max_samples: int  # -1 = all rows
    val_max_samples: int
    multiturn: bool
    messages_key: str
    tools_key: str
    enable_thinking_key: str
    enable_thinking_default: bool | None
    prompt_key: str
    response_key: str
    prompt_dict_keys: tuple[str, ...]
    response_dict_keys: tuple[str, ...]
    max_length: int
    truncation: str
    apply_chat_template_kwargs: dict[str, Any]
    ignore_input_ids_mismatch: bool
    train_batch_size: int
    micro_batch_size_per_gpu: int | str  # or "auto" until jaxsft.plan settles it
    packing: str
    train_weights: tuple[float, ...] | None  # one per train file; None = concatenated (verl)
    cache_dir: str | None  # the tokenised-data cache; None = off (data.cache=false)
    tokenize_workers: int  # 0 = one per CPU core

    def max_samples(self, split: str) -> int | None:
        n = self.train_max_samples if split == "train" else self.val_max_samples
        return n if n > 0 else None


@dataclasses.dataclass(frozen=True)
class TinyModel:
    """Smoke recipe only: build a tiny random Qwen2 at the recipe's model directory."""
    tokenizer_dir: str
    shape: dict[str, int]
    seed: int  # trainer.seed


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    partial_pretrain: str  # a directory or a hub id in the local cache
    trust_remote_code: bool
    external_lib: str | None
    tiny: TinyModel | None
    param_dtype: str
    compute_dtype: str
    remat_policy: str
    scan_layers: bool
    attn_implementation: str
    lora: Any = None  # jaxsft.model.lora.LoRASettings when model.lora_rank > 0
    added_tokens: str | tuple[str, ...] | None = None  # a file's path, or the tokens
    trainable: tuple[str, ...] = ("all",)  # all | new_token_embeddings | HF parameter-name globs
    optimizer_offload: bool = False

    @property
    def trained_dtype(self) -> str:
        """The dtype of what the optimizer updates: float32 LoRA adapters, else the parameters'."""
        return "float32" if self.lora is not None else self.param_dtype

    def compute_settings(self):
        from jaxsft.model.qwen2 import ModelSettings

        return ModelSettings(param_dtype=self.param_dtype, compute_dtype=self.compute_dtype, scan_layers=self.scan_layers,
                             remat_policy=self.remat_policy, attn_implementation=self.attn_implementation,
                             lora=self.lora)


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    eps: float
    lr_warmup_steps_ratio: float
    lr_warmup_steps: int  # > 0 overrides the ratio
    clip_grad: float
    lr_scheduler: str
    min_lr_ratio: float
    num_cycles: float
    mu_dtype: str | None
    grad_accum_dtype: str


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    default_local_dir: str
    save_contents: tuple[str, ...]
    load_contents: tuple[str, ...]
    hf_dtype: str
    async_save: bool
    max_shard_size: str
    max_ckpt_to_keep: int  # 0 = keep all
    save_freq: int | str  # -1 = only at the end; or after_each_epoch
    resume_mode: str
    resume_from_path: str | None
    resume_accept_changed_data: bool  # resume onto other tokens (same rows, batch and seed)


@dataclasses.dataclass(frozen=True)
class TrainerSettings:
    default_local_dir: str
    project_name: str
    experiment_name: str
    total_epochs: int
    total_training_steps: int | None
    logger: tuple[str, ...]
    seed: int
    test_freq: int | str
    device: str
    loss_normalization: str
    balance_dp_token: bool
    loss_chunk_size: int
    peak_flops_per_device: float | None
    log_every: int
    compile_cache_dir: str | None  # JAX's persistent compilation cache; None = off
    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    ulysses_sequence_parallel_size: int


@dataclasses.dataclass(frozen=True)
class Settings:
    data: DataSettings
    model: ModelSpec
    optim: OptimSettings
    trainer: TrainerSettings
    checkpoint: CheckpointSettings
    config: dict[str, Any]  # the effective configuration, nested, in the keys' spelling (config.yaml)
    notes: tuple[str, ...]  # one sentence per setting that acts differently from how it reads
    recipe: str | None

    @staticmethod
    def recorded_default(name: str) -> Any:
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


_LORA_KEYS = ("model.lora_alpha", "model.target_modules", "model.lora_dropout")


def _training_mode(c: Composed, v: dict, notes: list[str]):
    """(LoRA settings or None, trainable items) from the LoRA keys and model.trainable, checked."""
    from jaxsft.model import lora
    from jaxsft.trainable import ALL, NEW_TOKENS

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
    except ValueError as e:
        _fail(str(e))
    return lora.LoRASettings(rank=rank, alpha=float(v["model.lora_alpha"]), targets=targets,
                             dropout=float(v["model.lora_dropout"])), trainable


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
    if v["data.micro_batch_size_per_gpu"] != AUTO:
        _positive(v, "data.micro_batch_size_per_gpu")
    for name in ("trainer.save_freq", "trainer.test_freq"):
        _frequency(v, name)
    if v["trainer.total_training_steps"] is not None and v["trainer.total_training_steps"] <= 0:
        _fail(f"trainer.total_training_steps={v['trainer.total_training_steps']} must be positive or null")
    if v["trainer.seed"] < 0:
        _fail(f"trainer.seed={v['trainer.seed']} must be non-negative (it seeds the data order)")
    if v["trainer.max_ckpt_to_keep"] is not None and v["trainer.max_ckpt_to_keep"] < 0:
        _fail(f"trainer.max_ckpt_to_keep={v['trainer.max_ckpt_to_keep']} must be >= 0 (null or 0 = keep all)")
    if v["data.train_files"] is None:
        _fail("data.train_files is not set: give one parquet path or a list of paths")
    if v["model.partial_pretrain"] is None:
        _fail("model.partial_pretrain is not set: give the Hugging Face model directory")

    # ---- optimizer ranges
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

    # ---- one setting, two spellings
    param_dtype = DTYPES[_choose(c, "model.param_dtype", "model.fsdp_config.model_dtype",
                                 lambda a, b: DTYPES[a] == DTYPES[b], lambda b, a: b)]
    remat = _choose(c, "model.remat_policy", "model.enable_gradient_checkpointing",
                    lambda a, b: (a != "none") == b,
                    lambda b, a: (a if a != "none" else "minimal") if b else "none")
    packing = _choose(c, "data.packing", "use_remove_padding", lambda a, b: (a != "none") == b,
                      lambda b, a: (a if a != "none" else "first_fit") if b else "none")
    keys = {name: _choose(c, f"data.{name}", f"data.multiturn.{name}", lambda a, b: a == b, lambda b, a: b)
            for name in ("messages_key", "tools_key", "enable_thinking_key")}
    from jaxsft.model import remat as remat_policies

    if remat not in remat_policies.POLICIES and remat != AUTO:
        _fail(f"model.remat_policy={remat!r} is not a known policy; choose one of: {', '.join(remat_policies.POLICIES)}")
    from jaxsft.model.attention import BACKENDS

    if v["model.attn_implementation"] != "auto" and v["model.attn_implementation"] not in BACKENDS:
        _fail(f"model.attn_implementation={v['model.attn_implementation']!r} is not available; choose auto or one of: "
              f"{', '.join(BACKENDS)}")

    notes = _notes(c, v)
    lora_settings, trainable = _training_mode(c, v, notes)
    normalisation = v["trainer.loss_normalization"]
    if v["data.micro_batch_size_per_gpu"] == AUTO and normalisation != "global_tokens":
        _fail("data.micro_batch_size_per_gpu=auto needs trainer.loss_normalization=global_tokens: under verl's "
              "per-micro-batch normalisation the micro-batch size changes the loss")
    if normalisation == "verl" and packing != "none":
        why = "use_remove_padding=true packs rows" if _layer(c, "use_remove_padding") > _layer(c, "data.packing") \
            else f"data.packing={packing}"
        _fail(f"trainer.loss_normalization=verl needs padded rows, but {why}: verl's per-micro-batch token means are "
              f"defined on padded micro-batches (in verl, use_remove_padding does not change them); "
              f"set use_remove_padding=false / data.packing=none, or trainer.loss_normalization=global_tokens")
    if normalisation == "global_tokens" and v["data.balance_dp_token"] and "data.balance_dp_token" in c.explicit:
        notes.append("data.balance_dp_token=true has no effect under trainer.loss_normalization=global_tokens: every "
                     "loss token of the step already weighs the same on every rank and micro-batch; set "
                     "trainer.loss_normalization=verl for verl's formula")
    weights = _train_weights(v)
    if v["data.tokenize_workers"] < 0:
        _fail(f"data.tokenize_workers={v['data.tokenize_workers']} must be >= 0 (0 = one per CPU core)")
    for switch, where in (("data.cache", "data.cache_dir"), ("trainer.compile_cache", "trainer.compile_cache_dir")):
        if not v[switch] and v[where] is not None:
            notes.append(f"{where}={v[where]!r} has no effect: {switch}=false")
    run_path = v["trainer.default_local_dir"]
    if v["data.max_length"] % v["ulysses_sequence_parallel_size"]:
        _fail(f"data.max_length={v['data.max_length']} must be divisible by "
              f"ulysses_sequence_parallel_size={v['ulysses_sequence_parallel_size']}")

    # ---- loggers and checkpoint contents, before any heavy work
    logger = tuple(v["trainer.logger"])
    for name in logger:
        if name not in LOGGERS:
            _fail(f"trainer.logger: unknown backend {name!r}; choose from {', '.join(LOGGERS)}")
    if "wandb" in logger:
        import importlib.util

        try:
            found = importlib.util.find_spec("wandb") is not None
        except ValueError:  # a module object without a spec (tests put None in sys.modules)
            found = False
        if not found:
            _fail("trainer.logger includes wandb (verl's default) but the wandb package is not installed: "
                  "pip install wandb, or set trainer.logger=[console,file]")
    save_contents = tuple(v["trainer.checkpoint.save_contents"])
    load_contents = tuple(v["trainer.checkpoint.load_contents"] if v["trainer.checkpoint.load_contents"] is not None
                          else save_contents)
    for name, items in (("trainer.checkpoint.save_contents", save_contents),
                        ("trainer.checkpoint.load_contents", load_contents)):
        unknown = [x for x in items if x not in CONTENTS]
        if unknown:
            _fail(f"{name} has {unknown}: allowed are {', '.join(CONTENTS)}")
    from jaxsft.hf.save import parse_size

    try:
        parse_size(v["trainer.checkpoint.max_shard_size"])
    except ValueError as e:
        _fail(f"trainer.checkpoint.{e}")
    if v["trainer.resume_mode"] == "resume_path" and not v["trainer.resume_from_path"]:
        _fail("trainer.resume_mode=resume_path needs trainer.resume_from_path (a .../global_step_N directory)")
    hf_dtype = DTYPES[v["trainer.checkpoint.hf_dtype"]] if v["trainer.checkpoint.hf_dtype"] else param_dtype

    tiny = None
    if v["model.build_tiny_from"] and "model.partial_pretrain" not in c.from_command_line:
        tiny = TinyModel(v["model.build_tiny_from"], dict(v["model.tiny"]), v["trainer.seed"])

    data = DataSettings(
        train_files=v["data.train_files"], val_files=v["data.val_files"] or (),
        train_max_samples=v["data.train_max_samples"], val_max_samples=v["data.val_max_samples"],
        multiturn=v["data.multiturn.enable"], **keys, enable_thinking_default=v["data.enable_thinking_default"],
        prompt_key=v["data.prompt_key"], response_key=v["data.response_key"],
        prompt_dict_keys=v["data.prompt_dict_keys"] or (), response_dict_keys=v["data.response_dict_keys"] or (),
        max_length=v["data.max_length"], truncation=v["data.truncation"],
        apply_chat_template_kwargs=dict(v["data.apply_chat_template_kwargs"]),
        ignore_input_ids_mismatch=v["data.ignore_input_ids_mismatch"], train_batch_size=v["data.train_batch_size"],
        micro_batch_size_per_gpu=v["data.micro_batch_size_per_gpu"], packing=packing, train_weights=weights,
        cache_dir=(v["data.cache_dir"] or os.path.join(run_path, "data_cache")) if v["data.cache"] else None,
        tokenize_workers=v["data.tokenize_workers"])
    model = ModelSpec(
        partial_pretrain=v["model.partial_pretrain"], trust_remote_code=v["model.trust_remote_code"],
        external_lib=v["model.external_lib"], tiny=tiny, param_dtype=param_dtype,
        compute_dtype=DTYPES[v["model.compute_dtype"]], remat_policy=remat, scan_layers=v["model.scan_layers"],
        attn_implementation=v["model.attn_implementation"], lora=lora_settings, added_tokens=v["model.added_tokens"],
        trainable=trainable, optimizer_offload=v["model.fsdp_config.optimizer_offload"])
    optim = OptimSettings(
        lr=v["optim.lr"], betas=tuple(v["optim.betas"]), weight_decay=v["optim.weight_decay"], eps=v["optim.eps"],
        lr_warmup_steps_ratio=v["optim.lr_warmup_steps_ratio"], lr_warmup_steps=v["optim.lr_warmup_steps"],
        clip_grad=v["optim.clip_grad"], lr_scheduler=v["optim.lr_scheduler"], min_lr_ratio=v["optim.min_lr_ratio"],
        num_cycles=v["optim.num_cycles"], mu_dtype=DTYPES[v["optim.mu_dtype"]] if v["optim.mu_dtype"] else None,
        grad_accum_dtype=DTYPES[v["optim.grad_accum_dtype"]])
    checkpoint = CheckpointSettings(
        default_local_dir=v["trainer.default_local_dir"], save_contents=save_contents, load_contents=load_contents,
        hf_dtype=hf_dtype, async_save=v["trainer.checkpoint.async_save"],
        max_shard_size=v["trainer.checkpoint.max_shard_size"], max_ckpt_to_keep=v["trainer.max_ckpt_to_keep"] or 0,
        save_freq=v["trainer.save_freq"], resume_mode=v["trainer.resume_mode"],
        resume_from_path=v["trainer.resume_from_path"],
        resume_accept_changed_data=v["trainer.resume_accept_changed_data"])
    trainer = TrainerSettings(
        default_local_dir=v["trainer.default_local_dir"], project_name=v["trainer.project_name"],
        experiment_name=v["trainer.experiment_name"], total_epochs=v["trainer.total_epochs"],
        total_training_steps=v["trainer.total_training_steps"], logger=logger, seed=v["trainer.seed"],
        test_freq=v["trainer.test_freq"], device=v["trainer.device"], loss_normalization=normalisation,
        balance_dp_token=v["data.balance_dp_token"], loss_chunk_size=v["trainer.loss_chunk_size"],
        peak_flops_per_device=v["trainer.peak_flops_per_device"], log_every=v["trainer.log_every"],
        compile_cache_dir=((v["trainer.compile_cache_dir"] or os.path.join(run_path, "compile_cache"))
                           if v["trainer.compile_cache"] else None),
        coordinator_address=v["trainer.coordinator_address"], num_processes=v["trainer.num_processes"],
        process_id=v["trainer.process_id"], ulysses_sequence_parallel_size=v["ulysses_sequence_parallel_size"])

    # The effective configuration, as config.yaml and the checkpoint meta record it.
    v.update({"model.param_dtype": param_dtype, "model.fsdp_config.model_dtype": "bf16" if param_dtype == "bfloat16" else "fp32",
              "model.remat_policy": remat, "model.enable_gradient_checkpointing": remat != "none",
              "data.packing": packing, "use_remove_padding": packing != "none",
              "trainer.checkpoint.load_contents": load_contents, "trainer.checkpoint.hf_dtype": hf_dtype,
              "model.compute_dtype": model.compute_dtype, "optim.mu_dtype": optim.mu_dtype,
              "optim.grad_accum_dtype": optim.grad_accum_dtype})
    for name, value in keys.items():
        v[f"data.{name}"] = v[f"data.multiturn.{name}"] = value
    config = nested({k.name: _plain(v[k.name]) for k in KEYS})
    return Settings(data, model, optim, trainer, checkpoint, config, tuple(notes), c.recipe)


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


def with_choices(settings: Settings, *, remat_policy: str, micro_batch_size_per_gpu: int) -> Settings:
    """`settings` with the `auto` remat policy / micro-batch size replaced by the planned ones
    (the effective configuration records them)."""
    config = {**settings.config, "model": {**settings.config["model"], "remat_policy": remat_policy,
                                           "enable_gradient_checkpointing": remat_policy != "none"},
              "data": {**settings.config["data"], "micro_batch_size_per_gpu": micro_batch_size_per_gpu}}
    return dataclasses.replace(
        settings, config=config, model=dataclasses.replace(settings.model, remat_policy=remat_policy),
        data=dataclasses.replace(settings.data, micro_batch_size_per_gpu=micro_batch_size_per_gpu))


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(x) for x in value]
    if isinstance(value, dict):
        return {k: _plain(x) for k, x in value.items()}
    return value


def check_devices(settings: Settings, num_devices: int) -> tuple[int, int]:
    """(dp, sp) for `num_devices`, or a ConfigError naming the key that does not divide."""
    sp = settings.trainer.ulysses_sequence_parallel_size
    if num_devices % sp:
        _fail(f"ulysses_sequence_parallel_size={sp} does not divide the {num_devices} devices")
    dp = num_devices // sp
    d = settings.data
    if d.train_batch_size % dp:
        _fail(f"data.train_batch_size={d.train_batch_size} is not divisible by the data-parallel size {dp} "
              f"(= devices {num_devices} / ulysses_sequence_parallel_size {sp})")
    if d.micro_batch_size_per_gpu != AUTO and (d.train_batch_size // dp) % d.micro_batch_size_per_gpu:
        _fail(f"data.train_batch_size / dp = {d.train_batch_size // dp} is not divisible by "
              f"data.micro_batch_size_per_gpu={d.micro_batch_size_per_gpu}")
    return dp, sp
