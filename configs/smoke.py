"""Smoke recipe: a tiny random Qwen2 built from the bundled tokenizer, trained on the bundled
HumanEval chats on one CPU in well under two minutes, logging to console and metrics.jsonl and
exporting a Hugging Face directory at the end. `python -m jaxsft.train` with no --config runs it."""

from jaxsft import bundled
from jaxsft.config import default_config


def get_config():
    c = default_config()
    c.data.train_files = str(bundled.path("humaneval_chat", "train.parquet"))
    c.data.val_files = str(bundled.path("humaneval_chat", "val.parquet"))
    c.data.multiturn.enable = True
    c.data.max_length = 1280  # the longest bundled chat has 1151 tokens: nothing is cut
    c.data.truncation = "right"
    c.data.train_batch_size = 16
    c.data.micro_batch_size_per_gpu = 4
    c.data.packing = "first_fit"
    c.model.partial_pretrain = "runs/smoke/base_model"
    c.model.build_tiny_from = str(bundled.path("tokenizer"))
    c.model.compute_dtype = "float32"  # CPUs have no fast bf16 matmul
    c.optim.lr = 1e-3
    c.optim.lr_warmup_steps_ratio = 0.05
    c.trainer.default_local_dir = "runs/smoke"
    c.trainer.project_name = "jaxsft"
    c.trainer.experiment_name = "smoke"
    c.trainer.total_epochs = 1
    c.trainer.test_freq = 10
    c.trainer.save_freq = 10
    c.trainer.logger = ("console", "file")
    c.trainer.seed = 42
    c.trainer.checkpoint.save_contents = ("model", "optimizer", "extra", "hf_model")
    c.trainer.max_ckpt_to_keep = 2
    c.trainer.device = "auto"  # the CPU here, a GPU where there is one
    return c
