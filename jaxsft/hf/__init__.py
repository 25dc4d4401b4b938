"""jaxsft's Hugging Face boundary: everything that reads or writes a Hugging Face model directory.

- `names`: HF tensor names ↔ jaxsft parameter paths (`NAME_MAP`, both ways) and file names.
- `hub`: `resolve_model_dir(model.partial_pretrain)`: a local directory, or a hub id from the
  local cache (never a download).
- `load`: config.json (`read_config`), the weights' check from their headers (`check_weights`)
  and lazy, sharded loading (`load_model`); `ModelDirError` for every mistake in the directory.
- `tokenizer`: `load_tokenizer`, refusing a directory whose vocabulary is missing.
- `save`: `export_tensors` (parameters → HF tensors), the streamed safetensors writer
  (`write_weights`), the base model's config / generation config / tokenizer saved by
  transformers (`BaseModelFiles`), and both together (`write_hf_directory`).
"""

from jaxsft.hf.hub import model_directory, resolve_model_dir
from jaxsft.hf.load import ModelDirError, check_weights, load_model, read_config
from jaxsft.hf.names import CONFIG_FILE, INDEX_FILE, NAME_MAP, SINGLE_FILE
from jaxsft.hf.save import BaseModelFiles, export_tensors, parse_size, write_hf_directory, write_weights
from jaxsft.hf.tokenizer import load_tokenizer, open_tokenizer

__all__ = ["BaseModelFiles", "CONFIG_FILE", "INDEX_FILE", "ModelDirError", "NAME_MAP", "SINGLE_FILE", "check_weights",
           "export_tensors", "load_model", "load_tokenizer", "model_directory", "open_tokenizer", "parse_size", "read_config",
           "resolve_model_dir", "write_hf_directory", "write_weights"]
