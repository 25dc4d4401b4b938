"""The seed recipe's settings (configs/qwen7b.py) on Qwen3-8B, with the loss on each assistant turn
as Qwen3's own chat template renders the whole conversation (`data.multiturn.mask_mode=whole_chat`):
Qwen3's template does not compose per message, and verl's per-message masks drop the reasoning
(docs/DATA.md, "Mask modes").

Paths are placeholders: point data.train_files / data.val_files / model.partial_pretrain at your
own files, e.g. --config.model.partial_pretrain=/models/Qwen3-8B."""

from configs import qwen7b


def get_config():
    c = qwen7b.get_config()
    c.data.multiturn.mask_mode = "whole_chat"
    c.model.partial_pretrain = "models/Qwen3-8B"
    c.trainer.default_local_dir = "checkpoints/rlvr_coding_model/phase1_sft_qwen3_8b"
    c.trainer.experiment_name = "phase1_sft_qwen3_8b"
    return c
