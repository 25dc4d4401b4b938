"""Qwen2.5-0.5B-Instruct on multi-turn chats (shared/seeds/004's model size): the seed recipe's
data and optimizer settings, with float32 master weights, bf16 compute and packed rows. Point the
paths at your own files."""

from configs import qwen7b


def get_config():
    c = qwen7b.get_config()
    c.data.train_batch_size = 64
    c.data.micro_batch_size_per_gpu = 4
    c.data.balance_dp_token = False
    c.data.packing = "best_fit"
    c.model.partial_pretrain = "models/Qwen2.5-0.5B-Instruct"
    c.model.trust_remote_code = False
    c.model.param_dtype = "float32"
    c.optim.lr = 1e-5
    c.trainer.default_local_dir = "checkpoints/jaxsft/qwen05b"
    c.trainer.project_name = "jaxsft"
    c.trainer.experiment_name = "qwen05b_sft"
    c.trainer.save_freq = 200
    c.trainer.test_freq = 200
    c.trainer.max_ckpt_to_keep = 3
    c.trainer.logger = ("console", "tqdm", "file", "tensorboard")
    return c
