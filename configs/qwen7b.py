"""The seed recipe (shared/seeds/001, section 6): Qwen2.5-Coder-7B-Instruct, multi-turn coding
chats, global batch 128, 4096 tokens, lr 2e-5 cosine with 5 % warmup, 2 epochs, bf16 state.

Paths are placeholders: point data.train_files / data.val_files / model.partial_pretrain at your
own files, e.g. --config.data.train_files=/data/sft_train.parquet."""

from jaxsft.config import default_config


def get_config():
    c = default_config()
    c.data.train_files = "data/sft_train.parquet"
    c.data.val_files = "data/sft_val.parquet"
    c.data.multiturn.enable = True
    c.data.messages_key = "messages"
    c.data.max_length = 4096
    c.data.truncation = "right"
    c.data.train_batch_size = 128
    c.data.micro_batch_size_per_gpu = 2
    c.data.balance_dp_token = True
    c.model.partial_pretrain = "models/Qwen2.5-Coder-7B-Instruct"
    c.model.trust_remote_code = True
    c.model.enable_gradient_checkpointing = True
    c.model.param_dtype = "bfloat16"  # verl's model.fsdp_config.model_dtype=bf16
    c.model.compute_dtype = "bfloat16"
    c.optim.lr = 2e-5
    c.optim.betas = (0.9, 0.95)
    c.optim.weight_decay = 0.01
    c.optim.lr_warmup_steps_ratio = 0.05
    c.optim.clip_grad = 1.0
    c.optim.lr_scheduler = "cosine"
    c.trainer.default_local_dir = "checkpoints/rlvr_coding_model/phase1_sft_qwen7b_coder"
    c.trainer.project_name = "rlvr_coding_model"
    c.trainer.experiment_name = "phase1_sft_qwen7b_coder"
    c.trainer.total_epochs = 2
    c.trainer.save_freq = 500
    c.trainer.test_freq = 500
    c.trainer.max_ckpt_to_keep = 5
    c.trainer.logger = ("console", "tqdm", "file")
    c.trainer.seed = 42
    c.trainer.resume_mode = "auto"
    c.trainer.checkpoint.save_contents = ("model", "optimizer", "extra", "hf_model")
    return c
