"""Every setting jaxsft reads: its key, default, type and one-line meaning.

Keys are verl's (`sft_trainer.yaml` of the FSDP SFT trainer, with its defaults) plus jaxsft's own.
A verl key jaxsft has no use for is still listed, with `inert` saying why it changes nothing here;
setting such a key to a non-default value prints that sentence. Nothing is accepted silently.

`default_config()` is the table as an `ml_collections.ConfigDict` for recipes (`configs/*.py`);
`KEYS` is what the command line, `--help` and the resolution into typed settings read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from jaxsft.settings import AFTER_EACH_EPOCH, AUTO  # noqa: F401 (AUTO: part of this API)

# Value kinds: how a value from a recipe or the command line is checked and converted.
KINDS = ("int", "float", "bool", "str", "strs", "floats", "dict", "freq", "path_or_strs", "int_or_auto")


@dataclasses.dataclass(frozen=True)
class Key:
    name: str
    default: Any
    kind: str
    doc: str
    optional: bool = False  # null allowed
    choices: tuple | None = None
    inert: str | None = None  # why the key changes nothing in jaxsft (said when it is set)
    recipe_only: bool = False  # set by a recipe file, refused on the command line
    verl: bool = True  # a key of verl's sft_trainer.yaml (else jaxsft's own)


def _k(name, default, kind, doc, **kw) -> Key:
    return Key(name, default, kind, doc, **kw)


def _j(name, default, kind, doc, **kw) -> Key:  # jaxsft's own key
    return Key(name, default, kind, doc, verl=False, **kw)


KEYS: tuple[Key, ...] = (
    # ---- data ----------------------------------------------------------------------------------
    _k("data.train_files", None, "strs", "training data (required): a .parquet, .jsonl or .json file, a directory or "
       "glob of them, or a datasets save_to_disk directory; or a list of these, read in order", optional=True),
    _k("data.val_files", None, "strs", "validation data, as data.train_files; null = no validation", optional=True),
    _k("data.train_max_samples", -1, "int", "keep only the first N training rows (-1 = all)"),
    _k("data.val_max_samples", -1, "int", "keep only the first N validation rows (-1 = all)"),
    _k("data.multiturn.enable", False, "bool", "multi-turn chats (MultiTurnSFTDataset); false = prompt/response pairs"),
    _k("data.messages_key", "messages", "str", "multi-turn: the column holding the list of messages"),
    _k("data.tools_key", "tools", "str", "multi-turn: the column holding tool specs (optional column)"),
    _k("data.enable_thinking_key", "enable_thinking", "str", "multi-turn: the per-row enable_thinking column (optional)"),
    _k("data.enable_thinking_default", None, "bool", "multi-turn: enable_thinking for rows without that column",
       optional=True),
    _k("data.multiturn.messages_key", "messages", "str",
       "verl's older spelling of data.messages_key (wins when set to another value)"),
    _k("data.multiturn.tools_key", "tools", "str", "verl's older spelling of data.tools_key"),
    _k("data.multiturn.enable_thinking_key", "enable_thinking", "str", "verl's older spelling of data.enable_thinking_key"),
    _k("data.prompt_key", "question", "str", "single-turn: the prompt column"),
    _k("data.response_key", "answer", "str", "single-turn: the response column"),
    _k("data.prompt_dict_keys", None, "strs", "single-turn: keys into a struct prompt column", optional=True),
    _k("data.response_dict_keys", None, "strs", "single-turn: keys into a struct response column", optional=True),
    _k("data.max_length", 1024, "int", "row length in tokens: the padding length and the truncation limit"),
    _k("data.truncation", "error", "str", "a sample longer than max_length: error, or keep its left / right part",
       choices=("error", "left", "right")),
    _k("data.balance_dp_token", False, "bool",
       "loss_normalization=verl: normalise by the token count across data-parallel ranks"),
    _k("data.chat_template", None, "str", "must stay null: the tokenizer's own chat template is used (as in verl)",
       optional=True),
    _k("data.custom_cls.path", None, "str", "verl's custom dataset class file (not supported)", optional=True),
    _k("data.custom_cls.name", None, "str", "verl's custom dataset class name (not supported)", optional=True),
    _k("data.apply_chat_template_kwargs", {}, "dict", "extra keyword arguments for every apply_chat_template call"),
    _k("data.ignore_input_ids_mismatch", False, "bool",
       "multi-turn, per_message masks: train on per-message tokens when they differ from the whole chat rendered at once"),
    _j("data.multiturn.mask_mode", "per_message", "str",
       "multi-turn tokens and loss masks: per_message = each message rendered on its own (verl's MultiTurnSFTDataset); "
       "whole_chat = the conversation rendered once (apply_chat_template exactly), the loss on each assistant turn as "
       "rendered (templates that rewrite turns, e.g. Qwen3's reasoning)", choices=("per_message", "whole_chat")),
    _k("data.train_batch_size", 256, "int", "samples per optimizer step, over all devices"),
    _k("data.micro_batch_size_per_gpu", 4, "int_or_auto",
       "rows per device per micro-step (also the validation batch); auto = the largest whose plan fits "
       "(global_tokens normalisation only)"),
    _k("data.micro_batch_size", None, "int", "deprecated in verl", optional=True,
       inert="verl's deprecated global micro-batch; data.micro_batch_size_per_gpu sets the micro-batch"),
    _k("data.pad_mode", "right", "str", "padding of rows: right (verl's FSDP trainer); for no padding use data.packing",
       choices=("right",)),
    _k("data.use_shm", False, "bool", "verl: copy data files through /dev/shm",
       inert="files are read directly; /dev/shm copying only changes where verl reads them from"),
    _j("data.packing", "none", "str",
       "none = one sample per max_length row (verl); first_fit / best_fit = several samples per row, same loss",
       choices=("none", "first_fit", "best_fit")),
    _j("data.train_weights", None, "floats",
       "one weight per data.train_files entry: each epoch draws its samples from the files in these proportions "
       "(null = the files concatenated, as verl)", optional=True),
    _j("data.cache", True, "bool",
       "keep the tokenised data in data.cache_dir and memory-map it at later launches and resumes; false = tokenise "
       "at every launch"),
    _j("data.cache_dir", None, "str", "the tokenised-data cache (null = trainer.default_local_dir/data_cache)",
       optional=True),
    _j("data.tokenize_workers", 0, "int",
       "processes that tokenise a file of 8192 rows or more when it is not cached (0 = one per CPU core, 1 = none)"),
    # ---- model ---------------------------------------------------------------------------------
    _k("model.partial_pretrain", None, "str",
       "Hugging Face model directory, or a hub id already in the local HF cache (required)", optional=True),
    _k("model.trust_remote_code", False, "bool", "passed to the tokenizer loading (transformers)"),
    _k("model.enable_gradient_checkpointing", True, "bool",
       "recompute activations in the backward pass; false = model.remat_policy none"),
    _k("model.strategy", "fsdp2", "str", "verl's FSDP version", choices=("fsdp", "fsdp2"),
       inert="jaxsft always shards parameters, gradients and optimizer state over every device (as FSDP2)"),
    _k("model.use_liger", False, "bool", "verl: Liger kernels",
       inert="Liger's kernels are PyTorch-only; jaxsft's XLA ops compute the same functions (verl passes no labels, "
             "so Liger's fused loss is not used there either)"),
    _k("model.lora_rank", 0, "int",
       "LoRA rank r; 0 = full fine-tuning. > 0: only float32 adapters train (PEFT's init), the base stays frozen"),
    _k("model.lora_alpha", 16, "int", "LoRA alpha: the adapters' term is scaled by lora_alpha / lora_rank"),
    _k("model.target_modules", "all-linear", "strs",
       "LoRA targets: all-linear (q,k,v,o,gate,up,down_proj; not lm_head) or a list of those module names"),
    _j("model.lora_dropout", 0.0, "float", "LoRA dropout on the adapters' input (PEFT's lora_dropout; verl has none)"),
    _j("model.target_parameters", [], "strs",
       "LoRA on parameters (PEFT's target_parameters): mlp.experts.gate_up_proj and/or mlp.experts.down_proj, the "
       "routed experts of a qwen2_moe / qwen3_moe model (one adapter per expert; no lora_dropout)"),
    _k("model.external_lib", None, "str", "a Python module imported before the model is loaded", optional=True),
    _k("model.use_shm", False, "bool", "verl: copy a LoRA adapter (model.lora_adapter_path) through /dev/shm",
       inert="jaxsft reads files where they are and takes no model.lora_adapter_path; /dev/shm copying only "
             "changes where verl reads an adapter from"),
    _j("model.added_tokens", None, "path_or_strs",
       "tokens to add (normal, not special): a file with one token per line, or a list; resizes embed_tokens and "
       "lm_head to len(tokenizer) as transformers' resize_token_embeddings(mean_resizing=True)", optional=True),
    _j("model.trainable", "all", "strs",
       "what trains: all, new_token_embeddings (only the added tokens' rows), or a list of HF parameter-name globs"),
    _k("model.fsdp_config.model_dtype", "fp32", "str",
       "master weights and Adam moments: fp32 (mixed precision) or bf16 (all-bf16, as verl)",
       choices=("fp32", "bf16", "float32", "bfloat16")),
    _k("model.fsdp_config.wrap_policy.min_num_params", 0, "int", "FSDP1 wrapping granularity",
       inert="XLA gathers each layer's weights where they are used; there is no wrapping to choose"),
    _k("model.fsdp_config.cpu_offload", False, "bool",
       "verl's FSDP CPU offload of parameters (not supported; see model.fsdp_config.optimizer_offload)"),
    _k("model.fsdp_config.offload_params", False, "bool",
       "verl's FSDP parameter offload (not supported; see model.fsdp_config.optimizer_offload)"),
    _j("model.fsdp_config.optimizer_offload", False, "bool",
       "verl's FSDP-engine key: keep the Adam moments in host memory (pinned_host), streamed through the "
       "device a layer at a time for the update"),
    _j("model.param_dtype", "float32", "str", "as model.fsdp_config.model_dtype (jaxsft's spelling)",
       choices=("float32", "bfloat16", "fp32", "bf16")),
    _j("model.compute_dtype", "bfloat16", "str", "matmul and activation dtype",
       choices=("float32", "bfloat16", "fp32", "bf16")),
    _j("model.remat_policy", "minimal", "str",
       "what the backward pass keeps (jaxsft.model.remat.POLICIES: none, minimal, full, ...); auto = the "
       "cheapest recomputation whose plan fits the device memory"),
    _j("model.scan_layers", True, "bool", "run the decoder layers with lax.scan (false = unrolled)"),
    _j("model.router_aux_loss_coef", None, "float",
       "mixture-of-experts models: the router load-balancing loss's weight in the objective (0 = off); null = "
       "config.json's router_aux_loss_coef", optional=True),
    _j("model.expert_layout", "fsdp", "str",
       "mixture-of-experts models: fsdp (every expert split over all devices, gathered per layer) or expert "
       "(expert parallelism: each device holds num_experts / devices whole experts; tokens travel by all-to-all)",
       choices=("fsdp", "expert")),
    _j("model.expert_capacity_factor", None, "float",
       "model.expert_layout=expert: slots each device sends each peer, as a multiple of the balanced share "
       "(assignments beyond are dropped, train/expert_dropped); null = room for every assignment, none dropped",
       optional=True),
    _j("model.expert_matmul", "blocks", "str",
       "mixture-of-experts models: the experts' grouped matmuls: blocks (one GEMM per block of 256 rows of an "
       "expert: the active FLOPs on any backend) or ragged_dot (XLA's; XLA:GPU and XLA:CPU expand it densely)",
       choices=("blocks", "ragged_dot")),
    _j("model.attn_implementation", "auto", "str", "attention backend: auto, or a name in jaxsft.model.attention"),
    _j("model.build_tiny_from", None, "str",
       "smoke recipe only: a tokenizer directory; the recipe's model directory is created as a tiny random Qwen2",
       optional=True, recipe_only=True),
    _j("model.tiny", {}, "dict", "smoke recipe only: the tiny model's shape (hidden_size, ...)", recipe_only=True),
    # ---- optim ---------------------------------------------------------------------------------
    _k("optim.optimizer", "AdamW", "str", "the optimizer", choices=("AdamW",)),
    _k("optim.optimizer_impl", "torch.optim", "str",
       "verl: the optimizer's module; jaxsft's AdamW is optax's, tested against torch.optim.AdamW",
       choices=("torch.optim",)),
    _k("optim.lr", 1e-5, "float", "peak learning rate"),
    _k("optim.betas", [0.9, 0.95], "floats", "AdamW betas"),
    _k("optim.weight_decay", 0.01, "float", "AdamW decoupled weight decay, on every parameter (as verl)"),
    _j("optim.eps", 1e-8, "float", "AdamW epsilon (torch's default, which verl uses)"),
    _k("optim.lr_warmup_steps_ratio", 0.1, "float", "warmup steps = int(ratio × total steps)"),
    _k("optim.lr_warmup_steps", -1, "int", "warmup steps; > 0 overrides lr_warmup_steps_ratio (verl's engine trainer)"),
    _k("optim.clip_grad", 1.0, "float", "global gradient-norm clipping (torch's clip_grad_norm_)"),
    _k("optim.lr_scheduler", "cosine", "str", "cosine or wsd (verl's formulas)", choices=("cosine", "wsd")),
    _k("optim.min_lr_ratio", 0.0, "float", "lr floor as a fraction of optim.lr (verl's cosine formula)"),
    _k("optim.num_cycles", 0.5, "float", "cosine waves over the decay (0.5 = half a cosine)"),
    _k("optim.total_training_steps", -1, "int", "verl's engine trainer only: use trainer.total_training_steps"),
    _k("optim.override_optimizer_config", None, "dict", "verl: extra AdamW arguments (not supported)", optional=True),
    _k("optim.lr_scheduler_type", None, "str", "verl's engine trainer only: use optim.lr_scheduler", optional=True),
    _k("optim.warmup_style", None, "str", "verl's engine trainer only: use optim.lr_scheduler", optional=True),
    _j("optim.mu_dtype", None, "str", "Adam first-moment dtype (default: the parameter dtype)", optional=True,
       choices=("float32", "bfloat16", "fp32", "bf16")),
    _j("optim.grad_accum_dtype", "float32", "str",
       "sum of the micro-batch gradients: float32, or bfloat16 as verl with bf16 parameters (less exact, "
       "smaller)", choices=("float32", "bfloat16", "fp32", "bf16")),
    # ---- trainer -------------------------------------------------------------------------------
    _k("trainer.default_local_dir", "checkpoints/${trainer.project_name}/${trainer.experiment_name}", "str",
       "the run directory: checkpoints, config.yaml, metrics.jsonl"),
    _k("trainer.default_hdfs_dir", None, "str", "verl: copy checkpoints to HDFS (not supported)", optional=True),
    _k("trainer.project_name", "gsm8k-sft", "str", "tracking project name (wandb)"),
    _k("trainer.experiment_name", "test", "str", "tracking run name (wandb)"),
    _k("trainer.total_epochs", 4, "int", "epochs; also the lr schedule's horizon"),
    _k("trainer.total_training_steps", None, "int", "stop after N steps (the schedule keeps the epochs' horizon)",
       optional=True),
    _k("trainer.logger", ["console", "wandb"], "strs", "metrics backends: console, tqdm, tensorboard, file, wandb, mlflow"),
    _k("trainer.seed", 1, "int", "seeds the data order (verl ignores it)"),
    _k("trainer.save_freq", -1, "freq", "save every N steps (-1 = only at the end; or after_each_epoch)"),
    _k("trainer.test_freq", -1, "freq", "validate every N steps (-1 = only at the end; or after_each_epoch)"),
    _k("trainer.nnodes", 1, "int", "verl: number of nodes",
       inert="jaxsft uses every device of every process (as verl, where torchrun decides)"),
    _k("trainer.n_gpus_per_node", 8, "int", "verl: GPUs per node",
       inert="jaxsft uses every device JAX sees (as verl, where torchrun decides)"),
    _k("trainer.max_ckpt_to_keep", None, "int", "keep the newest N checkpoints (null = all)", optional=True),
    _k("trainer.resume_mode", "auto", "str", "auto (latest complete checkpoint), disable, or resume_path",
       choices=("auto", "disable", "resume_path")),
    _k("trainer.resume_from_path", None, "str", "a .../global_step_N directory to resume from", optional=True),
    _k("trainer.checkpoint.save_contents", ["model", "optimizer", "extra"], "strs",
       "what a checkpoint holds: model, optimizer, extra (data order, step), hf_model (a transformers directory)"),
    _k("trainer.checkpoint.load_contents", None, "strs", "what a resume restores (null = save_contents)", optional=True),
    _k("trainer.device", "cuda", "str", "cuda (needs a GPU), cpu, or auto (whatever JAX finds)",
       choices=("cuda", "gpu", "cpu", "auto")),
    _j("trainer.checkpoint.hf_dtype", None, "str", "dtype of the Hugging Face export (default: the parameter dtype)",
       optional=True, choices=("float32", "bfloat16", "fp32", "bf16")),
    _j("trainer.checkpoint.async_save", True, "bool", "write checkpoints in the background"),
    _j("trainer.checkpoint.max_shard_size", "5GB", "str", "largest safetensors file of the export"),
    _j("trainer.resume_accept_changed_data", False, "bool",
       "resume even when the training data's tokens differ from those the checkpoint was trained on"),
    _j("trainer.loss_normalization", "global_tokens", "str",
       "global_tokens = Σ token losses ÷ the step's loss tokens; verl = verl's per-micro-batch means",
       choices=("global_tokens", "verl")),
    _j("trainer.loss_type", "ce", "str",
       "the token loss: ce = cross-entropy; dft = each token's cross-entropy times its own probability exp(-ce), "
       "held constant in the backward pass (dynamic fine-tuning, TRL's loss_type=dft); normalised as the others",
       choices=("ce", "dft")),
    _j("trainer.loss_chunk_size", 512, "int", "tokens per cross-entropy chunk (bounds the float32 logits buffer)"),
    _j("trainer.peak_flops_per_device", None, "float", "peak FLOP/s for train/mfu (default: from the device kind)",
       optional=True),
    _j("trainer.log_every", 1, "int", "log train metrics every N steps (and at the last step)"),
    _j("trainer.compile_cache", True, "bool",
       "keep the compiled train and eval steps in trainer.compile_cache_dir (JAX's persistent compilation cache); "
       "false = compile at every launch"),
    _j("trainer.compile_cache_dir", None, "str", "JAX's compilation cache (null = trainer.default_local_dir/compile_cache)",
       optional=True),
    _j("trainer.coordinator_address", None, "str", "multi-process: host:port of process 0 (or JAX_COORDINATOR_ADDRESS)",
       optional=True),
    _j("trainer.num_processes", None, "int", "multi-process: number of processes (or JAX_NUM_PROCESSES)", optional=True),
    _j("trainer.process_id", None, "int", "multi-process: this process's index (or JAX_PROCESS_ID)", optional=True),
    # ---- top level -----------------------------------------------------------------------------
    _k("ulysses_sequence_parallel_size", 1, "int", "Ulysses sequence parallelism: the sp mesh axis"),
    _k("use_remove_padding", False, "bool", "compute no padding tokens: packs rows (data.packing=first_fit)"),
)

BY_NAME: dict[str, Key] = {k.name: k for k in KEYS}
DICT_KEYS = tuple(k.name for k in KEYS if k.kind == "dict")


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    """{'a.b': 1} → {'a': {'b': 1}}."""
    out: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, last = name.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of `nested`, stopping at dict-kind keys (their value is one setting)."""
    out = {}
    for k, v in tree.items():
        name = prefix + k
        if isinstance(v, dict) and name not in DICT_KEYS:
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def default_config() -> ml_collections.ConfigDict:
    """Every key at its default, as a locked ConfigDict: a recipe sets what it changes, and a
    misspelt key fails there (types are checked when the configuration is resolved)."""
    cfg = ml_collections.ConfigDict(nested({k.name: _copy(k.default) for k in KEYS}), type_safe=False)
    cfg.lock()
    return cfg


def _copy(value):
    return dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else value
