"""jaxsft's Hugging Face boundary: everything that reads or writes a Hugging Face model directory.

- `names`: HF tensor names ↔ jaxsft parameter paths (`name_map(config)`, both ways) and file names.
- `files`: reading a model directory's JSON files and `ModelDirError`, for every mistake in one.
- `hub`: `resolve_model_dir(model.partial_pretrain)`: a local directory, or a hub id from the
  local cache (never a download).
- `load`: config.json (`read_config`), the weights' check from their headers (`check_weights`)
  and lazy, sharded loading (`load_model`); `ModelDirError` for every mistake in the directory.
- `tokenizer`: `load_tokenizer`, refusing a directory whose vocabulary is missing;
  `read_added_tokens` / `add_tokens` for `model.added_tokens` (`AddedTokens`).
- `writer`: the streamed safetensors writer (`write_weights`, `write_single_file`, `parse_size`).
- `save`: `export_tensors` (parameters → HF tensors, LoRA merged), the base model's config / generation config / tokenizer saved by
  transformers (`BaseModelFiles`), both together (`write_hf_directory`), and `Export`: what a
  run's export adds (merged LoRA, the PEFT adapter of `adapter`, the added tokens).
- `adapter`: a LoRA run's PEFT adapter directory (`write_adapter`).
"""

import dataclasses

from jaxsft.hf.hub import resolve_model_dir
from jaxsft.hf.load import ModelDirError, check_weights, load_model, read_config
from jaxsft.hf.names import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, name_map
from jaxsft.hf.save import BaseModelFiles, Export, export_tensors, write_hf_directory
from jaxsft.hf.writer import parse_size, write_weights
from jaxsft.hf.tokenizer import AddedTokens, add_tokens, load_tokenizer, open_tokenizer, read_added_tokens

__all__ = ["AddedTokens", "BaseModelFiles", "CONFIG_FILE", "Export", "INDEX_FILE", "ModelDirError",
           "SINGLE_FILE", "name_map", "add_tokens", "extend_vocabulary", "check_weights", "export_tensors", "load_model",
           "load_tokenizer", "open_tokenizer", "parse_size", "read_added_tokens", "read_config",
           "resolve_model_dir", "write_hf_directory", "write_weights"]


def extend_vocabulary(setting, tokenizer, config, say=print):
    """`model.added_tokens` (a path, a list, or None) applied to the training tokenizer:
    (AddedTokens or None when unset, the model config with the vocabulary size to train with)."""
    if setting is None:
        return None, config
    added = add_tokens(tokenizer, read_added_tokens(setting), config.vocab_size)
    say(added.describe())
    return added, dataclasses.replace(config, vocab_size=added.vocab_size)
