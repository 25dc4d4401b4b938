"""Writing a Hugging Face model directory: jaxsft parameters → HF tensors → streamed safetensors
shards, and the base model's config, generation config and tokenizer saved by transformers.

The tensors arrive one at a time (`export_tensors`); each is gathered to the host, cast to the
export dtype and added to the current safetensors shard, which is written as soon as the next
tensor would overflow it. Host memory therefore stays near one shard plus one tensor, never the
whole model. Only process 0 writes; every process iterates, because gathering a tensor that spans
processes is a collective.

Files are named as transformers names them: `model.safetensors` for one shard, otherwise
`model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`. The shard count is known
only at the end, so shards are written under temporary names and renamed last; config.json is
written after the weights, so a directory with a config.json is whole. Every file honours the
umask (safetensors alone writes 0600, which another user's inference server cannot read).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxsft.hf.load import ModelDirError, read_json
from jaxsft.hf.names import CONFIG_FILE, GENERATION_CONFIG_FILE, INDEX_FILE, SINGLE_FILE, entries, lora_kernel
from jaxsft.hf.tokenizer import AddedTokens, add_tokens, open_tokenizer
from jaxsft.model.config import Qwen2Config

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


# ---- jaxsft parameters → HF tensors -------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=2)
def _layer_slice(stack, i, transposed):
    x = jax.lax.dynamic_index_in_dim(stack, i, 0, keepdims=False)
    return x.T if transposed else x


def _param_arrays(model_or_params) -> dict:
    """Nested dict of arrays from a model, an nnx.State of parameters, or a (pure) dict."""
    if isinstance(model_or_params, nnx.Module):
        model_or_params = nnx.state(model_or_params, nnx.Param)
    if isinstance(model_or_params, nnx.State):
        return nnx.to_pure_dict(model_or_params)
    return jax.tree.map(lambda v: v[...] if isinstance(v, nnx.Variable) else v, model_or_params,
                        is_leaf=lambda v: isinstance(v, nnx.Variable))


def _merged_slice(stack, a, b, i, scale) -> np.ndarray:
    """Layer i of a LoRA-carrying kernel merged, (W + α/r·A·B)ᵀ: HF's [out, in] weight, float32.

    Computed on the host in float64 and rounded once, so that the export written during training
    (sharded arrays) and bin/convert_to_hf (one CPU device) give the same bits, whatever XLA's
    matmul order on either."""
    w, a, b = (to_host(_layer_slice(x, i, False), np.float32).astype(np.float64) for x in (stack, a, b))
    return (w + scale * (a @ b)).T.astype(np.float32)


def export_tensors(model_or_params, config: Qwen2Config, *, fetch=None, lora=None) -> Iterator[tuple[str, jax.Array]]:
    """(HF name, array in HF layout and the parameter dtype), one tensor at a time, parameter by
    parameter (every layer of a stacked parameter together); no lm_head.weight when tied.

    With `lora` (LoRASettings), a targeted layer's weight is merged, W + α/r·B·A as PEFT's
    `merge_and_unload()` computes it (a float32 host array; the writer casts it to the export dtype).
    `fetch(path) -> array` (offline conversion) loads one parameter on demand instead of reading
    `model_or_params`, so only one stacked parameter (and its adapters) is ever in host memory."""
    if fetch is None:
        params = _param_arrays(model_or_params)
        fetch = lambda path: functools.reduce(lambda d, k: d[k], path, params)  # noqa: E731
    path_loaded, array, adapters = None, None, None
    for name, path, layer, transposed in entries(config):
        if path != path_loaded:
            array = adapters = None  # let the previous parameter go before the next one is loaded
            path_loaded, array = path, fetch(path)
            if lora_kernel(path, lora):
                adapters = tuple(fetch((*path[:-1], k)) for k in ("lora_a", "lora_b"))
        if adapters is not None:
            yield name, _merged_slice(array, *adapters, layer, float(lora.scale))
        elif layer is None:
            yield name, (array.T if transposed else array)
        else:
            yield name, _layer_slice(array, layer, transposed)


# ---- safetensors shards ---------------------------------------------------------------------

def parse_size(size: int | str) -> int:
    """'5GB' → 5·10⁹ bytes, '500MiB' → 500·2²⁰ (transformers' convention); ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
    if m is None:
        raise ValueError(f"max_shard_size={size!r} is not a size such as '5GB' or '500MB'")
    return int(float(m.group(1)) * _UNITS[m.group(2) or "B"])


def to_host(x, dtype) -> np.ndarray:
    """The whole of `x` as a numpy array in `dtype` (a collective when `x` spans processes)."""
    if isinstance(x, jax.Array):
        if x.dtype != dtype:
            x = x.astype(dtype)  # cast on the device: half the transfer for a bf16 export
        if not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x).astype(dtype, copy=False)


def _umask() -> int:
    # Read, not set: os.umask(x) changes it process-wide, under Orbax's writer threads too.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc (not Linux): the brief race is the only way to ask
    os.umask(mask)
    return mask


class _ShardWriter:
    """Accumulates tensors into shards of at most `max_bytes` (a larger tensor gets its own)."""

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.mode = 0o666 & ~_umask()
        self.current: dict[str, np.ndarray] = {}
        self.current_bytes = 0
        self.shard_names: list[list[str]] = []  # tensor names per written shard
        self.total_bytes = 0

    def _tmp(self, k: int) -> Path:
        return self.out_dir / f".shard-{k:05d}.safetensors.tmp"

    def add(self, name: str, array: np.ndarray) -> None:
        if self.current and self.current_bytes + array.nbytes > self.max_bytes:
            self.flush()
        self.current[name] = np.ascontiguousarray(array)
        self.current_bytes += array.nbytes
        self.total_bytes += array.nbytes

    def flush(self) -> None:
        if not self.current:
            return
        from safetensors.numpy import save_file

        tmp = self._tmp(len(self.shard_names))
        save_file(self.current, tmp, metadata={"format": "pt"})
        os.chmod(tmp, self.mode)  # safetensors creates its file 0600 whatever the umask
        self.shard_names.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> list[str]:
        """Rename the shards to their final names, write the index when sharded; returns file names."""
        self.flush()
        n = len(self.shard_names)
        if n == 1:
            os.replace(self._tmp(0), self.out_dir / SINGLE_FILE)
            return [SINGLE_FILE]
        files = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        weight_map = {}
        for k, (fname, names) in enumerate(zip(files, self.shard_names)):
            os.replace(self._tmp(k), self.out_dir / fname)
            weight_map.update({name: fname for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return files + [INDEX_FILE]


def write_weights(tensors: Iterable[tuple[str, Any]], out_dir: str | os.PathLike, *, dtype: str,
                  max_shard_size: int | str = "5GB") -> list[str] | None:
    """Stream `tensors` ((hf_name, jax or numpy array) one at a time) into `out_dir`'s safetensors
    files in `dtype`; weight files of an earlier export there are removed. Every process calls
    this (gathers are collective); process 0 writes and gets the file names, the others None."""
    out_dir = Path(out_dir)
    writer = None
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        writer = _ShardWriter(out_dir, parse_size(max_shard_size))
    _stream(tensors, writer, dtype)
    if writer is None:
        return None
    written = writer.finish()
    # Weight files of an earlier export into the same directory would shadow or mix with these.
    for stale in out_dir.iterdir():
        if _WEIGHT_FILE.fullmatch(stale.name) and stale.name not in written:
            stale.unlink()
    return written


def write_single_file(tensors: Iterable[tuple[str, Any]], path: str | os.PathLike, *, dtype: str) -> Path | None:
    """Stream `tensors` into the one safetensors file `path` (e.g. PEFT's adapter_model.safetensors),
    written under a temporary name and renamed. Every process calls this (gathers are collective);
    process 0 writes and gets the path, the others None."""
    path = Path(path)
    writer = None
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = _ShardWriter(path.parent, max_bytes=1 << 62)  # one shard, whatever the size
    _stream(tensors, writer, dtype)
    if writer is None:
        return None
    writer.flush()
    os.replace(writer._tmp(0), path)
    return path


def _stream(tensors, writer: _ShardWriter | None, dtype: str) -> None:
    """Each tensor gathered to the host in `dtype` (on every process) and handed to `writer` (process 0's)."""
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    for name, array in tensors:
        host = to_host(array, np_dtype)
        if writer is not None:
            writer.add(name, host)
        del host  # free it before the next gather (the shard holds its own reference)


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
class Export:
    """What an export of this run writes beyond the parameters: `config` (after any vocabulary
    resize), `lora` (merged into `huggingface/`, and a PEFT `lora_adapter/` beside it) and `added`
    (model.added_tokens: the exported tokenizer and config.json carry them)."""
    config: Qwen2Config
    lora: Any = None
    added: AddedTokens | None = None

    def tensors(self, model_or_params, fetch=None):
        return export_tensors(model_or_params, self.config, fetch=fetch, lora=self.lora)

    def base_files(self, base_model_dir, *, trust_remote_code: bool = False) -> BaseModelFiles:
        base = BaseModelFiles.read(base_model_dir, trust_remote_code=trust_remote_code)
        return base.with_added_tokens(self.added, base_model_dir)

    def write_adapter(self, model_or_params, out_dir, *, base_model_name_or_path: str, fetch=None):
        from jaxsft.hf.adapter import write_adapter

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
    writing = jax.process_index() == 0
    if writing and base is None:
        base = BaseModelFiles.read(base_model_dir, trust_remote_code=trust_remote_code)
    write_weights(tensors, out_dir, dtype=dtype, max_shard_size=max_shard_size)
    if writing:
        base.write(out_dir, dtype=np_dtype.name, min_max_position_embeddings=min_max_position_embeddings)
    return out_dir
