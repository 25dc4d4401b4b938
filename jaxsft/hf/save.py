"""Writing a Hugging Face model directory: jaxsft parameters → HF tensors (`export_tensors`, one at
a time, LoRA merged) → safetensors shards streamed by jaxsft.hf.writer, then the base model's config,
generation config and tokenizer saved by transformers. config.json is written after the weights,
so a directory with a config.json is whole. A LoRA run's PEFT adapter is jaxsft.hf.adapter's.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxsft import distributed
from jaxsft.hf.adapter import write_adapter
from jaxsft.hf.files import ModelDirError, read_json
from jaxsft.hf.names import CONFIG_FILE, GENERATION_CONFIG_FILE, entries, expert_merge, lora_kernel
from jaxsft.hf.tokenizer import AddedTokens, add_tokens, open_tokenizer
from jaxsft.hf.writer import param_arrays, to_host, write_weights
from jaxsft.model.config import ModelConfig



# ---- jaxsft parameters → HF tensors -------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=2)
def _layer_slice(stack, index, transposed):
    """stack[index] (index [n]: a layer, or a layer and an expert), transposed if asked."""
    n = index.shape[0]
    x = jax.lax.dynamic_slice(stack, (*(index[j] for j in range(n)), *(0,) * (stack.ndim - n)),
                              (1,) * n + stack.shape[n:]).reshape(stack.shape[n:])
    return x.T if transposed else x


def _merged_slice(stack, a, b, i, scale, half=None) -> np.ndarray:
    """Layer i of a LoRA-carrying kernel merged, (W + α/r·A·B)ᵀ: HF's [out, in] weight, float32.

    Computed on the host in float64 and rounded once, so that the export written during training
    (sharded arrays) and bin/convert_to_hf (one CPU device) give the same bits, whatever XLA's
    matmul order on either."""
    w, a, b = (to_host(_layer_slice(x, np.asarray(i, np.int32), False), np.float32).astype(np.float64)
               for x in (stack, a, b))
    if half is not None:  # a fused adapter (gate_up): this weight's half of B's columns
        b = np.split(b, 2, axis=-1)[half]
    return (w + scale * (a @ b)).T.astype(np.float32)


def export_tensors(model_or_params, config: ModelConfig, *, fetch=None, lora=None) -> Iterator[tuple[str, jax.Array]]:
    """(HF name, array in HF layout and the parameter dtype), one tensor at a time, parameter by
    parameter (every layer of a stacked parameter together); no lm_head.weight when tied.

    With `lora` (LoRASettings), a targeted layer's weight is merged, W + α/r·B·A as PEFT's
    `merge_and_unload()` computes it (a float32 host array; the writer casts it to the export dtype).
    `fetch(path) -> array` (offline conversion) loads one parameter on demand instead of reading
    `model_or_params`, so only one stacked parameter (and its adapters) is ever in host memory."""
    if fetch is None:
        params = param_arrays(model_or_params)
        fetch = lambda path: functools.reduce(lambda d, k: d[k], path, params)  # noqa: E731
    path_loaded, array, adapters = None, None, None
    for name, path, index, transposed in entries(config):
        if path != path_loaded:
            array = adapters = None  # let the previous parameter go before the next one is loaded
            path_loaded, array = path, fetch(path)
            if lora_kernel(path, lora):
                adapters = tuple(fetch((*path[:-1], k)) for k in ("lora_a", "lora_b"))
            elif (merge := expert_merge(path, lora)) is not None:  # an expert weight: its adapter's columns
                adapter, half = merge
                adapters = (fetch((*adapter, "lora_a")), fetch((*adapter, "lora_b")), half)
        if adapters is not None:
            yield name, _merged_slice(array, *adapters[:2], index, float(lora.scale), *adapters[2:])
        elif not index:
            yield name, (array.T if transposed else array)
        else:
            yield name, _layer_slice(array, np.asarray(index, np.int32), transposed)


# ---- safetensors shards ---------------------------------------------------------------------

# ---- config, generation config, tokenizer ----------------------------------------------------

@contextlib.contextmanager
def _quiet_alias_warnings():
    """transformers warns "`torch_dtype` is deprecated" when it meets the key we write on purpose."""
    from transformers.utils import logging as hf_logging

    class Drop(logging.Filter):
        def filter(self, record):
            return "torch_dtype" not in record.getMessage()

    logger, drop = hf_logging.get_logger("transformers.configuration_utils"), Drop()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@dataclasses.dataclass
class BaseModelFiles:
    """What an exported directory takes from its base model, as transformers objects: the model
    config, the generation config (None when the base has none) and the tokenizer. `base_json` is
    the base's config.json as written: which older spellings it used (see `write`)."""
    config: Any
    generation_config: Any
    tokenizer: Any
    base_json: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def read(cls, model_dir, *, trust_remote_code: bool = False) -> "BaseModelFiles":
        """Read (and so check) them once, before any tensor is streamed."""
        from transformers import AutoConfig, GenerationConfig

        model_dir = Path(model_dir)
        base_json = read_json(model_dir / CONFIG_FILE)
        try:
            config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001 - the user's file; jaxsft's own reading has passed already
            raise ModelDirError(f"transformers cannot read {model_dir / CONFIG_FILE}: {e}".splitlines()[0]) from None
        generation = None
        if (model_dir / GENERATION_CONFIG_FILE).is_file():
            try:
                generation = GenerationConfig.from_pretrained(str(model_dir))
            except Exception as e:  # noqa: BLE001
                raise ModelDirError(
                    f"transformers cannot read {model_dir / GENERATION_CONFIG_FILE}: {e}".splitlines()[0]) from None
        tokenizer = open_tokenizer(model_dir, trust_remote_code=trust_remote_code)
        return cls(config, generation, tokenizer, base_json)

    def with_added_tokens(self, added: AddedTokens | None, where) -> "BaseModelFiles":
        """These files with `added` (model.added_tokens) applied: the tokenizer gains the tokens, at
        the ids training gave them, and config.json the resized vocab_size."""
        if added is None or not added.new_ids:
            return self
        again = add_tokens(self.tokenizer, added.tokens, added.base_vocab_size)
        if again.new_ids != added.new_ids:
            raise ModelDirError(f"the tokenizer in {where} gives model.added_tokens the ids {_ids(again.new_ids)}, "
                                f"training used {_ids(added.new_ids)}: export from the base model trained from")
        self.config.vocab_size = added.vocab_size
        return self

    def write(self, out_dir: str | os.PathLike, *, dtype: str, min_max_position_embeddings: int | None = None) -> None:
        """Save them into `out_dir` with transformers' own `save_pretrained`: config.json says the
        export dtype, and a context of at least `min_max_position_embeddings` (the training
        max_length, as verl raises it). config.json goes last."""
        out_dir = Path(out_dir)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        config = copy.deepcopy(self.config)
        config.dtype = dtype
        if min_max_position_embeddings is not None:
            config.max_position_embeddings = max(int(config.max_position_embeddings or 0),
                                                 int(min_max_position_embeddings))
        # transformers 5 writes only `dtype` and `rope_parameters`; readers before it (transformers
        # 4, vLLM on it) read `torch_dtype`, `rope_theta` and `rope_scaling`, and without them
        # silently use rope_theta 10000, no rope scaling and a default dtype. So the spellings the
        # base used are written too, from the same values (the rope scaling with its original_max_position_embeddings made explicit,
        # which the raised max_position_embeddings would otherwise shift). They are aliases on the
        # config object (properties), so they go into its __dict__, which is what it serialises.
        legacy = {"torch_dtype": dtype}
        rope = dict(getattr(config, "rope_parameters", None) or {})
        if "rope_theta" in self.base_json and "rope_theta" in rope:
            legacy["rope_theta"] = rope["rope_theta"]
        if self.base_json.get("rope_scaling"):
            legacy["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        config.__dict__.update(legacy)
        with _quiet_alias_warnings():
            config.save_pretrained(out_dir)


def _ids(ids) -> str:
    return f"{ids[0]}..{ids[-1]}" if ids else "none"


@dataclasses.dataclass(frozen=True)
class Tensors:
    """The export's tensors one at a time, and how many there are (a progress bar's total)."""
    items: Iterator[tuple[str, Any]]
    count: int

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return self.count


@dataclasses.dataclass(frozen=True)
class Export:
    """What an export of this run writes beyond the parameters: `config` (after any vocabulary
    resize), `lora` (merged into `huggingface/`, and a PEFT `lora_adapter/` beside it) and `added`
    (model.added_tokens: the exported tokenizer and config.json carry them)."""
    config: ModelConfig
    lora: Any = None
    added: AddedTokens | None = None

    def tensors(self, model_or_params, fetch=None) -> "Tensors":
        return Tensors(export_tensors(model_or_params, self.config, fetch=fetch, lora=self.lora),
                       sum(1 for _ in entries(self.config)))

    def base_files(self, base_model_dir, *, trust_remote_code: bool = False) -> BaseModelFiles:
        base = BaseModelFiles.read(base_model_dir, trust_remote_code=trust_remote_code)
        return base.with_added_tokens(self.added, base_model_dir)

    def write_adapter(self, model_or_params, out_dir, *, base_model_name_or_path: str, fetch=None):
        return write_adapter(model_or_params, self.config, self.lora, out_dir,
                             base_model_name_or_path=base_model_name_or_path, fetch=fetch)

    def meta(self) -> dict:
        """Recorded in each checkpoint's meta, for bin/convert_to_hf."""
        if self.added is None:
            return {}
        return {"added_tokens": list(self.added.tokens), "vocab_size": self.added.vocab_size}


def write_hf_directory(tensors: Iterable[tuple[str, jax.Array]], out_dir: str | os.PathLike, *,
                       base_model_dir: str | os.PathLike | None = None, base: BaseModelFiles | None = None,
                       dtype: str, max_shard_size: int | str = "5GB", min_max_position_embeddings: int | None = None,
                       trust_remote_code: bool = False) -> Path:
    """Write `out_dir` as a Hugging Face model directory; returns its path.

    `tensors` yields (hf_name, array) one at a time (jax or numpy arrays); `dtype` is the export
    dtype ('float32' | 'bfloat16'). The config, generation config and tokenizer come from
    `base_model_dir`, or from `base` already read. Every process must call this (gathers are
    collective); only process 0 writes.
    """
    out_dir = Path(out_dir)
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    writing = distributed.is_primary()
    if writing and base is None:
        base = BaseModelFiles.read(base_model_dir, trust_remote_code=trust_remote_code)
    write_weights(tensors, out_dir, dtype=dtype, max_shard_size=max_shard_size)
    if writing:
        base.write(out_dir, dtype=np_dtype.name, min_max_position_embeddings=min_max_position_embeddings)
    return out_dir
