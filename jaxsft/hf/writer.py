"""Streaming tensors into safetensors files: one tensor at a time gathered to the host, cast, and
added to the current shard, which is written when the next tensor would overflow it (host memory:
about one shard plus one tensor). Shards are written under temporary names and renamed at the end
(the shard count is known only then), with transformers' file names and index. Only process 0
writes; every process iterates, because gathering a tensor that spans processes is a collective.
Every file honours the umask (safetensors alone writes 0600)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxsft import distributed, progress
from jaxsft.hf.names import INDEX_FILE, SINGLE_FILE

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def param_arrays(model_or_params) -> dict:
    """Nested dict of arrays from a model, an nnx.State of parameters, or a (pure) dict."""
    if isinstance(model_or_params, nnx.Module):
        model_or_params = nnx.state(model_or_params, nnx.Param)
    if isinstance(model_or_params, nnx.State):
        return nnx.to_pure_dict(model_or_params)
    return jax.tree.map(lambda v: v[...] if isinstance(v, nnx.Variable) else v, model_or_params,
                        is_leaf=lambda v: isinstance(v, nnx.Variable))


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
    this (gathers are collective); process 0 writes and gets the file names, the others None.
    Process 0 shows a bar on an interactive console (over len(tensors) when it has one) and says
    one line with the time taken."""
    out_dir = Path(out_dir)
    writer = None
    if distributed.is_primary():
        out_dir.mkdir(parents=True, exist_ok=True)
        writer = _ShardWriter(out_dir, parse_size(max_shard_size))
    with progress.phase("writing safetensors", total=len(tensors) if hasattr(tensors, "__len__") else None,
                        unit="tensor", show=writer is not None,
                        done=lambda s: f"[jaxsft] Hugging Face weights: {writer.total_bytes / 1e6:.1f} MB ({dtype}) "
                                       f"written in {s:.1f} s") as advance:
        _stream(tensors, writer, dtype, advance)
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
    if distributed.is_primary():
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = _ShardWriter(path.parent, max_bytes=1 << 62)  # one shard, whatever the size
    _stream(tensors, writer, dtype)
    if writer is None:
        return None
    writer.flush()
    os.replace(writer._tmp(0), path)
    return path


def _stream(tensors, writer: _ShardWriter | None, dtype: str, advance=None) -> None:
    """Each tensor gathered to the host in `dtype` (on every process) and handed to `writer` (process 0's)."""
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    for name, array in tensors:
        host = to_host(array, np_dtype)
        if writer is not None:
            writer.add(name, host)
        del host  # free it before the next gather (the shard holds its own reference)
        if advance is not None:
            advance(1)
