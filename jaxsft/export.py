"""Write a Hugging Face model directory from a stream of (hf_name, array) pairs.

The tensors arrive one at a time (`jaxsft.hf.export_tensors`); each is gathered to the host, cast
to the export dtype and added to the current safetensors shard, which is written as soon as the
next tensor would overflow it. Host memory therefore stays near one shard plus one tensor, never
the whole model. Only process 0 writes; every process iterates, because gathering a tensor that
spans processes is a collective.

Files are named as transformers names them: `model.safetensors` for one shard, otherwise
`model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`. The shard count is known
only at the end, so shards are written under temporary names and renamed last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import jax
import numpy as np

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

# Copied from the base model when present (the set differs between tokenizer classes and
# transformers versions).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


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


class _ShardWriter:
    """Accumulates tensors into shards of at most `max_bytes` (a larger tensor gets its own)."""

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
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

        save_file(self.current, self._tmp(len(self.shard_names)), metadata={"format": "pt"})
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
        _write_json(self.out_dir / INDEX_FILE, index)
        return files + [INDEX_FILE]


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_hf_config(out_dir: Path, base_model_dir: Path, dtype: str, min_max_position_embeddings: int | None) -> None:
    """config.json from the base model with the export dtype, and a context at least the training
    max_length (verl raises max_position_embeddings the same way); generation config and tokenizer
    files copied as they are."""
    cfg = json.loads((base_model_dir / "config.json").read_text())
    cfg["dtype"] = cfg["torch_dtype"] = dtype  # transformers 5 reads `dtype`, older readers `torch_dtype`
    if min_max_position_embeddings is not None:
        cfg["max_position_embeddings"] = max(int(cfg.get("max_position_embeddings", 0)), int(min_max_position_embeddings))
    _write_json(out_dir / "config.json", cfg)
    for name in ("generation_config.json",) + TOKENIZER_FILES:
        if (base_model_dir / name).is_file():
            shutil.copyfile(base_model_dir / name, out_dir / name)


def write_hf_directory(tensors: Iterable[tuple[str, jax.Array]], out_dir: str | os.PathLike, *,
                       base_model_dir: str | os.PathLike, dtype: str, max_shard_size: int | str = "5GB",
                       min_max_position_embeddings: int | None = None) -> Path:
    """Write `out_dir` as a Hugging Face model directory; returns its path.

    `tensors` yields (hf_name, array) one at a time (jax or numpy arrays); `dtype` is the export
    dtype ('float32' | 'bfloat16'). Every process must call this (gathers are collective); only
    process 0 writes.
    """
    out_dir, base_model_dir = Path(out_dir), Path(base_model_dir)
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    writing = jax.process_index() == 0
    writer = None
    if writing:
        out_dir.mkdir(parents=True, exist_ok=True)
        writer = _ShardWriter(out_dir, parse_size(max_shard_size))
    for name, array in tensors:
        host = to_host(array, np_dtype)
        if writer is not None:
            writer.add(name, host)
        del host  # free it before the next gather (the shard holds its own reference)
    if not writing:
        return out_dir
    written = set(writer.finish())
    # Weight files of an earlier export into the same directory would shadow or mix with these.
    for stale in out_dir.iterdir():
        if _WEIGHT_FILE.fullmatch(stale.name) and stale.name not in written:
            stale.unlink()
    write_hf_config(out_dir, base_model_dir, np_dtype.name, min_max_position_embeddings)
    return out_dir
