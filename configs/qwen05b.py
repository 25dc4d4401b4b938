"""Qwen2.5-0.5B-Instruct on multi-turn chats (shared/seeds/004's model size): fp32 master weights,
bf16 compute, packed rows. Point the paths at your own files."""

from jaxsft.config import default_config


def get_config():
    c = default_config()
    c.data.train_files = "data/sft_train.parquet"
    c.data.val_files = "data/sft_val.parquet"
    c.data.multiturn.enable = True
    c.data.max_length = 4096
    c.data.truncation = "right"
    c.data.train_batch_size = 64
    c.data.micro_batch_size_per_gpu = 4
    c.data.packing = "best_fit"
    c.model.partial_pretrain = "models/Qwen2.5-0.5B-Instruct"
    c.model.param_dtype = "float32"
    c.model.compute_dtype = "bfloat16"
    c.optim.lr = 1e-5
    c.optim.lr_warmup_steps_ratio = 0.05
    c.trainer.default_local_dir = "checkpoints/jaxsft/qwen05b"
    c.trainer.experiment_name = "qwen05b_sft"
    c.trainer.total_epochs = 2
    c.trainer.save_freq = 200
    c.trainer.test_freq = 200
    c.trainer.max_ckpt_to_keep = 3
    c.trainer.logger = ("console", "tqdm", "file", "tensorboard")
    c.trainer.seed = 42
    c.trainer.checkpoint.save_contents = ("model", "optimizer", "extra", "hf_model")
    return c
