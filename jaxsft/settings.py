"""The settings every subsystem reads: typed, frozen, one dataclass per section, resolved once from
the configuration by jaxsft.config (which checks them and names the key on a mistake).

This is the bottom layer: it imports nothing from jaxsft but the error types, so the model, the data
pipeline, checkpoints and plans can all take their settings without knowing how they were composed.
Field names are the key names (their last part), so `settings.optim.lr` is `optim.lr`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxsft.errors import ConfigError

AUTO = "auto"  # model.remat_policy / data.micro_batch_size_per_gpu chosen by plan (jaxsft.plan)
AFTER_EACH_EPOCH = "after_each_epoch"
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
LOGGERS = ("console", "tqdm", "tensorboard", "file", "wandb", "mlflow")
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
    mask_mode: str  # multi-turn loss masks: per_message (verl's) or whole_chat
    train_batch_size: int
    micro_batch_size_per_gpu: int | str  # or "auto" until jaxsft.plan settles it
    packing: str
    balance_dp_token: bool  # verl's loss normalisation only (trainer.loss_normalization=verl)
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
    shape: tuple[tuple[str, int], ...]  # (name, size) pairs: the settings stay hashable
    seed: int  # trainer.seed


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """Adapters on the decoder's linear layers (model.lora_rank > 0); jaxsft.model.lora computes them."""
    rank: int
    alpha: float
    targets: tuple[str, ...]  # HF module names, in jaxsft.model.lora.MODULES' order
    dropout: float = 0.0
    # PEFT's target_parameters: expert weights of a mixture-of-experts model (jaxsft.model.lora.EXPERT_PARAMETERS)
    parameters: tuple[str, ...] = ()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """model.*: where the base model comes from, and how the model computes and what it trains.
    The model code reads the compute fields; the defaults let tests and tools build one in a line."""
    param_dtype: str = "float32"  # storage of weights (and so of Adam moments by default)
    compute_dtype: str = "bfloat16"  # matmuls and the residual stream
    scan_layers: bool = True
    remat_policy: str = "minimal"  # a name in jaxsft.model.remat.POLICIES (or auto until planned)
    attn_implementation: str = "auto"  # a key of jaxsft.model.attention.BACKENDS, or auto
    lora: LoRASettings | None = None  # adapters on these linear layers (model.lora_rank > 0)
    partial_pretrain: str = ""  # a directory or a hub id in the local cache
    trust_remote_code: bool = False
    external_lib: str | None = None
    tiny: TinyModel | None = None
    added_tokens: str | tuple[str, ...] | None = None  # a file's path, or the tokens
    trainable: tuple[str, ...] = ("all",)  # all | new_token_embeddings | HF parameter-name globs
    optimizer_offload: bool = False
    # MoE models: the load-balancing loss's weight; None = config.json's router_aux_loss_coef, 0 = off
    router_aux_loss_coef: float | None = None
    # MoE models: where the experts live (jaxsft.model.moe_parallel: fsdp | expert), and the expert
    # layout's slots per peer as a multiple of the balanced share (None: every assignment, none dropped)
    expert_layout: str = "fsdp"
    expert_capacity_factor: float | None = None
    expert_matmul: str = "blocks"  # the experts' grouped matmuls (jaxsft.model.grouped_matmul)

    @property
    def trained_dtype(self) -> str:
        """The dtype of what the optimizer updates: float32 LoRA adapters, else the parameters'."""
        return "float32" if self.lora is not None else self.param_dtype


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
    default_local_dir: str  # the run directory (trainer.default_local_dir): checkpoints, metrics, caches
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
    project_name: str
    experiment_name: str
    total_epochs: int
    total_training_steps: int | None
    logger: tuple[str, ...]
    seed: int
    test_freq: int | str
    device: str
    loss_normalization: str
    loss_chunk_size: int
    loss_type: str  # ce | dft (jaxsft.model.loss)
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
    model: ModelSettings
    optim: OptimSettings
    trainer: TrainerSettings
    checkpoint: CheckpointSettings
    config: dict[str, Any]  # the effective configuration, nested, in the keys' spelling (config.yaml)
    notes: tuple[str, ...]  # one sentence per setting that acts differently from how it reads
    recipe: str | None


def with_choices(settings: Settings, *, remat_policy: str, micro_batch_size_per_gpu: int) -> Settings:
    """`settings` with the `auto` remat policy / micro-batch size replaced by the planned ones
    (the effective configuration records them)."""
    config = {**settings.config, "model": {**settings.config["model"], "remat_policy": remat_policy,
                                           "enable_gradient_checkpointing": remat_policy != "none"},
              "data": {**settings.config["data"], "micro_batch_size_per_gpu": micro_batch_size_per_gpu}}
    return dataclasses.replace(
        settings, config=config, model=dataclasses.replace(settings.model, remat_policy=remat_policy),
        data=dataclasses.replace(settings.data, micro_batch_size_per_gpu=micro_batch_size_per_gpu))


def check_devices(settings: Settings, num_devices: int) -> tuple[int, int]:
    """(dp, sp) for `num_devices`, or a ConfigError naming the key that does not divide."""
    sp = settings.trainer.ulysses_sequence_parallel_size
    if num_devices % sp:
        raise ConfigError(f"ulysses_sequence_parallel_size={sp} does not divide the {num_devices} devices")
    dp = num_devices // sp
    d = settings.data
    if d.train_batch_size % dp:
        raise ConfigError(f"data.train_batch_size={d.train_batch_size} is not divisible by the data-parallel size {dp} "
              f"(= devices {num_devices} / ulysses_sequence_parallel_size {sp})")
    if d.micro_batch_size_per_gpu != AUTO and (d.train_batch_size // dp) % d.micro_batch_size_per_gpu:
        raise ConfigError(f"data.train_batch_size / dp = {d.train_batch_size // dp} is not divisible by "
              f"data.micro_batch_size_per_gpu={d.micro_batch_size_per_gpu}")
    return dp, sp
