"""The default configuration: verl's `sft_trainer.yaml` key names plus jaxsft's own keys.

Recipes in `configs/` start from `default_config()` and override what they need; the command line
overrides any key with `--config.KEY=VALUE` (ml_collections, type-checked). `validate()` turns every
impossible or unsupported setting into one sentence that names the key.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from jaxsft.errors import UserError

placeholder = config_dict.placeholder


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # ---- data.* (verl names) ------------------------------------------------------------------
    d = c.data = ml_collections.ConfigDict()
    d.train_files = placeholder(object)  # one path or a list of paths
    d.val_files = placeholder(object)
    d.train_max_samples = -1
    d.val_max_samples = -1
    d.prompt_key = "question"
    d.response_key = "answer"
    d.prompt_dict_keys = placeholder(object)
    d.response_dict_keys = placeholder(object)
    d.messages_key = "messages"
    d.tools_key = "tools"
    d.enable_thinking_key = "enable_thinking"
    d.enable_thinking_default = placeholder(bool)
    d.multiturn = ml_collections.ConfigDict()
    d.multiturn.enable = False
    d.multiturn.messages_key = placeholder(str)  # verl's older spelling of data.messages_key
    d.multiturn.tools_key = placeholder(str)
    d.multiturn.enable_thinking_key = placeholder(str)
    d.max_length = 1024
    d.truncation = "error"  # error | left | right
    d.balance_dp_token = False
    d.chat_template = placeholder(str)  # must stay None, as in verl
    d.apply_chat_template_kwargs = ml_collections.ConfigDict()
    d.ignore_input_ids_mismatch = False
    d.train_batch_size = 256  # global samples per optimizer step
    # rows per device per micro-batch, or "auto": the largest that fits (jaxsft.plan; global_tokens only)
    d.micro_batch_size_per_gpu = ml_collections.FieldReference(4, field_type=object)
    d.micro_batch_size = placeholder(int)  # deprecated in verl, ignored
    d.pad_mode = "right"
    d.use_shm = False
    # jaxsft's own: none (pad every sample to max_length, as verl) | first_fit | best_fit
    d.packing = "none"

    # ---- model.* -------------------------------------------------------------------------------
    m = c.model = ml_collections.ConfigDict()
    m.partial_pretrain = placeholder(str)  # HF model directory (weights, config, tokenizer)
    m.trust_remote_code = False
    m.enable_gradient_checkpointing = True
    m.strategy = "fsdp2"  # accepted for compatibility; jaxsft always shards FSDP-style
    m.use_liger = False
    m.lora_rank = 0
    m.external_lib = placeholder(str)
    m.use_shm = False
    m.fsdp_config = ml_collections.ConfigDict()
    m.fsdp_config.model_dtype = placeholder(str)  # verl's name; sets model.param_dtype when given
    # jaxsft's own
    m.param_dtype = "float32"  # master weights and (by default) Adam moments: float32 | bfloat16
    m.compute_dtype = "bfloat16"  # matmul dtype: bfloat16 | float32
    m.remat_policy = "minimal"  # see jaxsft.model.remat.POLICIES, or "auto": the cheapest that fits (jaxsft.plan)
    m.scan_layers = True
    m.attn_implementation = "auto"  # auto | xla | (GPU kernels, see jaxsft.model.attention)
    # smoke / benchmark: a tokenizer directory; when set and model.partial_pretrain holds no
    # config.json, a tiny random Qwen2 (shape from model.tiny) is written there first.
    m.build_tiny_from = placeholder(str)
    m.tiny = ml_collections.ConfigDict(dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))

    # ---- optim.* -------------------------------------------------------------------------------
    o = c.optim = ml_collections.ConfigDict()
    o.optimizer = "AdamW"
    o.lr = 1e-5
    o.betas = (0.9, 0.95)
    o.weight_decay = 0.01
    o.eps = 1e-8
    o.lr_warmup_steps_ratio = 0.1
    o.clip_grad = 1.0
    o.lr_scheduler = "cosine"  # cosine | wsd
    o.mu_dtype = placeholder(str)  # Adam moment dtype; default = model.param_dtype
    o.grad_accum_dtype = "float32"  # sum of micro-batch gradients: float32 | bfloat16 (verl's with bf16 params)
    # read by verl's engine trainer only; accepted here and ignored with a warning when changed
    o.lr_warmup_steps = -1
    o.total_training_steps = -1
    o.min_lr_ratio = 0.0
    o.num_cycles = 0.5

    # ---- trainer.* -----------------------------------------------------------------------------
    t = c.trainer = ml_collections.ConfigDict()
    t.default_local_dir = "checkpoints/jaxsft/run"
    t.default_hdfs_dir = placeholder(str)
    t.project_name = "jaxsft"
    t.experiment_name = "run"
    t.total_epochs = 4
    t.total_training_steps = placeholder(int)  # early exit only (verl): no effect on the schedule
    t.logger = ("console",)  # console, tqdm, tensorboard, file, wandb
    t.seed = 1
    t.save_freq = -1
    t.test_freq = -1
    t.max_ckpt_to_keep = placeholder(int)
    t.resume_mode = "auto"  # auto | disable | resume_path
    t.resume_from_path = placeholder(str)
    t.checkpoint = ml_collections.ConfigDict()
    t.checkpoint.save_contents = ("model", "optimizer", "extra")
    t.checkpoint.load_contents = placeholder(object)  # default: save_contents
    t.checkpoint.hf_dtype = placeholder(str)  # export dtype; default = model.param_dtype
    t.checkpoint.async_save = True
    t.checkpoint.max_shard_size = "5GB"
    t.nnodes = 1
    t.n_gpus_per_node = placeholder(int)
    t.device = "auto"
    # jaxsft's own
    t.loss_normalization = "global_tokens"  # global_tokens | verl
    t.loss_chunk_size = 512  # tokens per cross-entropy chunk (bounds the fp32 logits buffer)
    t.peak_flops_per_device = placeholder(float)  # for train/mfu; default from the device kind
    t.log_every = 1
    # multi-process (jax.distributed); environment variables are read too
    t.coordinator_address = placeholder(str)
    t.num_processes = placeholder(int)
    t.process_id = placeholder(int)

    # ---- top level (verl) ----------------------------------------------------------------------
    c.ulysses_sequence_parallel_size = 1
    c.use_remove_padding = False
    return c


class ConfigError(UserError):
    """A setting that cannot work; the message names the key."""


_CHOICES = {
    "data.truncation": ("error", "left", "right"),
    "data.packing": ("none", "first_fit", "best_fit"),
    "data.pad_mode": ("right",),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("float32", "bfloat16"),
    "optim.lr_scheduler": ("cosine", "wsd"),
    "optim.optimizer": ("AdamW",),
    "optim.grad_accum_dtype": ("float32", "bfloat16"),
    "trainer.resume_mode": ("auto", "disable", "resume_path"),
    "trainer.loss_normalization": ("global_tokens", "verl"),
}

_DTYPE_ALIASES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}


def get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def normalise(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Resolve verl aliases into jaxsft's keys (in place on an unlocked copy) and return it."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())  # unlocked, mutable copy
    if cfg.model.fsdp_config.model_dtype is not None:
        key = "model.fsdp_config.model_dtype"
        dt = _DTYPE_ALIASES.get(str(cfg.model.fsdp_config.model_dtype).lower())
        if dt is None:
            raise ConfigError(f"{key}={cfg.model.fsdp_config.model_dtype!r}: use fp32 or bf16")
        cfg.model.param_dtype = dt
    for key in ("model.param_dtype", "model.compute_dtype", "optim.grad_accum_dtype"):
        sec, name = key.split(".")
        val = str(cfg[sec][name]).lower()
        cfg[sec][name] = _DTYPE_ALIASES.get(val, val)
    if cfg.optim.mu_dtype is not None:
        cfg.optim.mu_dtype = _DTYPE_ALIASES.get(str(cfg.optim.mu_dtype).lower(), cfg.optim.mu_dtype)
    if cfg.trainer.checkpoint.hf_dtype is not None:
        hd = str(cfg.trainer.checkpoint.hf_dtype).lower()
        cfg.trainer.checkpoint.hf_dtype = _DTYPE_ALIASES.get(hd, hd)
    # verl's older spellings of the multi-turn column keys
    for name in ("messages_key", "tools_key", "enable_thinking_key"):
        if cfg.data.multiturn[name] is not None:
            cfg.data[name] = cfg.data.multiturn[name]
    if isinstance(cfg.trainer.logger, str):
        cfg.trainer.logger = (cfg.trainer.logger,)
    return cfg


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raise ConfigError (one sentence naming the key) for any setting that cannot work."""
    for key, choices in _CHOICES.items():
        val = get(cfg, key)
        if val not in choices:
            raise ConfigError(f"{key}={val!r} is not one of {', '.join(choices)}")
    if cfg.data.chat_template is not None:
        raise ConfigError("data.chat_template must stay null: the tokenizer's own chat template is used (as in verl)")
    if cfg.model.lora_rank:
        raise ConfigError("model.lora_rank > 0: LoRA is not supported by jaxsft; set it to 0")
    auto_micro = cfg.data.micro_batch_size_per_gpu == "auto"
    if not auto_micro and (isinstance(cfg.data.micro_batch_size_per_gpu, bool)
                           or not isinstance(cfg.data.micro_batch_size_per_gpu, int)):
        raise ConfigError(f"data.micro_batch_size_per_gpu={cfg.data.micro_batch_size_per_gpu!r} must be a positive "
                          f"integer or auto")
    if auto_micro and cfg.trainer.loss_normalization != "global_tokens":
        raise ConfigError("data.micro_batch_size_per_gpu=auto needs trainer.loss_normalization=global_tokens: with "
                          "verl's per-micro-batch normalisation the micro-batch size changes the loss")
    for key in ("data.max_length", "data.train_batch_size", "data.micro_batch_size_per_gpu",
                "trainer.total_epochs", "ulysses_sequence_parallel_size", "trainer.loss_chunk_size"):
        if not (key == "data.micro_batch_size_per_gpu" and auto_micro) and int(get(cfg, key)) <= 0:
            raise ConfigError(f"{key}={get(cfg, key)} must be a positive integer")
    for key in ("trainer.save_freq", "trainer.test_freq"):
        if get(cfg, key) == 0:
            raise ConfigError(f"{key}=0 is not allowed: use -1 to turn it off or a positive step count")
    if cfg.trainer.total_training_steps is not None and cfg.trainer.total_training_steps <= 0:
        raise ConfigError(f"trainer.total_training_steps={cfg.trainer.total_training_steps} must be positive or null")
    if not 0.0 <= cfg.optim.lr_warmup_steps_ratio <= 1.0:
        raise ConfigError(f"optim.lr_warmup_steps_ratio={cfg.optim.lr_warmup_steps_ratio} must lie in [0, 1]")
    if len(tuple(cfg.optim.betas)) != 2:
        raise ConfigError(f"optim.betas={cfg.optim.betas!r} must hold two numbers")
    if cfg.trainer.resume_mode == "resume_path" and not cfg.trainer.resume_from_path:
        raise ConfigError("trainer.resume_mode=resume_path needs trainer.resume_from_path (a .../global_step_N directory)")
    if cfg.trainer.loss_normalization == "verl" and cfg.data.packing != "none":
        raise ConfigError("trainer.loss_normalization=verl needs data.packing=none: verl's per-micro-batch "
                          "token means are defined on padded micro-batches")
    if cfg.model.partial_pretrain is None:
        raise ConfigError("model.partial_pretrain is not set: give the Hugging Face model directory")
    if cfg.data.train_files is None:
        raise ConfigError("data.train_files is not set: give one parquet path or a list of paths")
    sp = cfg.ulysses_sequence_parallel_size
    if num_devices is not None:
        if num_devices % sp:
            raise ConfigError(f"ulysses_sequence_parallel_size={sp} does not divide the {num_devices} devices")
        dp = num_devices // sp
        if cfg.data.train_batch_size % dp:
            raise ConfigError(f"data.train_batch_size={cfg.data.train_batch_size} is not divisible by the "
                              f"data-parallel size {dp} (= devices {num_devices} / ulysses_sequence_parallel_size {sp})")
        per_rank = cfg.data.train_batch_size // dp
        if not auto_micro and per_rank % cfg.data.micro_batch_size_per_gpu:
            raise ConfigError(f"data.train_batch_size / dp = {per_rank} is not divisible by "
                              f"data.micro_batch_size_per_gpu={cfg.data.micro_batch_size_per_gpu}")
    if cfg.data.max_length % sp:
        raise ConfigError(f"data.max_length={cfg.data.max_length} must be divisible by ulysses_sequence_parallel_size={sp}")
