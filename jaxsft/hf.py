"""Hugging Face Qwen2 weights ↔ jaxsft parameters.

`NAME_MAP` is the only place that knows HF tensor names; loading reads it HF → jaxsft and export
reads it jaxsft → HF. A linear weight is HF's `[out, in]` transposed to a `[in, out]` kernel; a
per-layer tensor `model.layers.{i}.…` is slice i of a stacked `[L, …]` parameter.

Loading keeps host memory near one tensor: the model is built abstractly (`nnx.eval_shape`, no
random init), each tensor is read alone from its safetensors file, placed on the devices in its
target sharding, and either converted into its parameter (transpose, cast) or written into slice
i of the stacked parameter by a jitted `dynamic_update_slice` that donates the stack (no second
copy of the stack). Tensor names and shapes are checked against config.json before any is read.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors import safe_open

from jaxsft import parallel
from jaxsft.data.dataset import load_tokenizer  # noqa: F401  (the HF boundary's tokenizer loading)
from jaxsft.model.config import Qwen2Config
from jaxsft.model.qwen2 import ModelSettings, Qwen2ForCausalLM

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# (HF name, parameter path, transposed). "{i}" marks a slice of a stacked per-layer parameter.
NAME_MAP: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("model.embed_tokens.weight", ("embed_tokens", "embedding"), False),
    ("model.layers.{i}.input_layernorm.weight", ("layers", "input_layernorm", "scale"), False),
    ("model.layers.{i}.self_attn.q_proj.weight", ("layers", "self_attn", "q_proj", "kernel"), True),
    ("model.layers.{i}.self_attn.q_proj.bias", ("layers", "self_attn", "q_proj", "bias"), False),
    ("model.layers.{i}.self_attn.k_proj.weight", ("layers", "self_attn", "k_proj", "kernel"), True),
    ("model.layers.{i}.self_attn.k_proj.bias", ("layers", "self_attn", "k_proj", "bias"), False),
    ("model.layers.{i}.self_attn.v_proj.weight", ("layers", "self_attn", "v_proj", "kernel"), True),
    ("model.layers.{i}.self_attn.v_proj.bias", ("layers", "self_attn", "v_proj", "bias"), False),
    ("model.layers.{i}.self_attn.o_proj.weight", ("layers", "self_attn", "o_proj", "kernel"), True),
    ("model.layers.{i}.post_attention_layernorm.weight", ("layers", "post_attention_layernorm", "scale"), False),
    ("model.layers.{i}.mlp.gate_proj.weight", ("layers", "mlp", "gate_proj", "kernel"), True),
    ("model.layers.{i}.mlp.up_proj.weight", ("layers", "mlp", "up_proj", "kernel"), True),
    ("model.layers.{i}.mlp.down_proj.weight", ("layers", "mlp", "down_proj", "kernel"), True),
    ("model.norm.weight", ("norm", "scale"), False),
    ("lm_head.weight", ("lm_head", "kernel"), True),  # absent when tied
)


def _entries(config: Qwen2Config) -> Iterator[tuple[str, tuple[str, ...], int | None, bool]]:
    """(HF name, parameter path, layer index or None, transposed), parameter by parameter: every
    layer of a stacked parameter together, so an exporter needs only one in memory at a time.
    No LM head when the embeddings are tied."""
    for name, path, transposed in NAME_MAP:
        if "{i}" in name:
            for i in range(config.num_hidden_layers):
                yield name.format(i=i), path, i, transposed
        elif not (path[0] == "lm_head" and config.tie_word_embeddings):
            yield name, path, None, transposed


def _ignored(name: str, config: Qwen2Config) -> bool:
    # Old checkpoints carry rotary buffers; some tied ones still save lm_head (HF ignores both).
    return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_word_embeddings)


def read_config(model_dir) -> Qwen2Config:
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: model.partial_pretrain must be a Hugging Face model directory")
    return Qwen2Config.from_hf_dict(json.loads(path.read_text()))


def model_directory(spec) -> Path:
    """The base model directory for the model settings `spec` (`jaxsft.config.settings.ModelSpec`),
    after importing `model.external_lib`. The smoke recipe's tiny model is written first when
    missing (only at the recipe's own path, never at one the user gave); every other directory
    must exist."""
    if spec.external_lib:  # verl imports it before loading the model (to register custom code)
        import importlib

        from jaxsft.config import ConfigError

        try:
            importlib.import_module(spec.external_lib)
        except Exception as e:  # noqa: BLE001 - any failure of the user's module, in one line
            raise ConfigError(f"model.external_lib={spec.external_lib!r} cannot be imported ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    model_dir = Path(spec.partial_pretrain)
    if spec.tiny is not None:
        from jaxsft import distributed, tiny

        if jax.process_index() == 0 and not (model_dir / CONFIG_FILE).exists():
            tiny.ensure_tiny_model(model_dir, spec.tiny.tokenizer_dir, seed=spec.tiny.seed, **spec.tiny.shape)
        distributed.barrier("tiny-model")  # every process meets it, also one that already sees the model
    if not (model_dir / CONFIG_FILE).is_file():  # else transformers would try to download it
        from jaxsft.config import ConfigError

        raise ConfigError(f"model.partial_pretrain={spec.partial_pretrain!r} is not a Hugging Face model directory "
                          f"(no config.json there); jaxsft reads local directories only")
    return model_dir


def _tensor_files(model_dir: Path) -> tuple[Path, dict[str, Path]]:
    """(the file that lists the tensors, {tensor name: safetensors file})."""
    index, single = model_dir / INDEX_FILE, model_dir / SINGLE_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return index, {name: model_dir / file for name, file in weight_map.items()}
    if single.is_file():
        with safe_open(single, framework="numpy") as f:
            return single, {name: single for name in f.keys()}
    raise FileNotFoundError(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def _hf_shape(shape, layer, transposed) -> tuple[int, ...]:
    shape = tuple(shape[1:] if layer is not None else shape)
    return shape[::-1] if transposed else shape


def _hf_spec(spec: P, ndim: int, layer, transposed) -> P:
    """The target parameter's spec, for the tensor as stored by HF (layer axis gone, transposed)."""
    dims = list(spec) + [None] * (ndim - len(spec))
    dims = dims[1:] if layer is not None else dims
    return P(*(dims[::-1] if transposed else dims))


def _read(file: Path, name: str, shape: tuple[int, ...]) -> np.ndarray:
    # One tensor per open: the file is never mapped longer than it takes to copy that tensor.
    with safe_open(file, framework="numpy") as f:
        found = tuple(f.get_slice(name).get_shape())
        if found != shape:
            raise ValueError(f"{file}: tensor {name} has shape {list(found)}; config.json implies {list(shape)}")
        return f.get_tensor(name)


def _put(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Place a host array in `sharding`; each process transfers only its own devices' shards."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


@functools.lru_cache(maxsize=None)
def _converter(transposed: bool, dtype, sharding: NamedSharding):
    return jax.jit(lambda x: (x.T if transposed else x).astype(dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _layer_writer(transposed: bool, sharding: NamedSharding):
    def write(stack, x, i):
        x = (x.T if transposed else x).astype(stack.dtype)
        return jax.lax.dynamic_update_index_in_dim(stack, x, i, 0)

    return jax.jit(write, donate_argnums=0, out_shardings=sharding)


def load_model(model_dir, mesh: Mesh, settings: ModelSettings) -> Qwen2ForCausalLM:
    """The HF model at `model_dir` as a Qwen2ForCausalLM whose parameters live in their
    NamedShardings on `mesh` (see jaxsft.parallel for the rule)."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2ForCausalLM(config, settings, rngs=nnx.Rngs(0))))
    variables = dict(nnx.to_flat_state(state))
    listing, files = _tensor_files(model_dir)

    entries = list(_entries(config))
    expected = {name for name, *_ in entries}
    for name in files:
        if name not in expected and not _ignored(name, config):
            raise ValueError(f"{files[name]}: unexpected tensor {name} (not a weight of this Qwen2 config.json)")
    for name, *_ in entries:
        if name not in files:
            raise ValueError(f"{listing}: tensor {name} is missing")

    values: dict[tuple[str, ...], jax.Array] = {}
    for name, path, layer, transposed in entries:
        var = variables[path]
        target = parallel.param_sharding(var, mesh)
        array = _read(files[name], name, _hf_shape(var.shape, layer, transposed))
        raw = _put(array, NamedSharding(mesh, _hf_spec(target.spec, var.ndim, layer, transposed)))
        del array
        if layer is None:
            same = not transposed and raw.dtype == var.dtype  # raw already has the target sharding
            values[path] = raw if same else _converter(transposed, var.dtype, target)(raw)
        else:
            if path not in values:
                values[path] = jnp.zeros(var.shape, var.dtype, device=target)
            values[path] = _layer_writer(transposed, target)(values[path], raw, layer)
        del raw

    for path, var in variables.items():
        var.set_value(values[path])
    return nnx.merge(graphdef, state)


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


def export_tensors(model_or_params, config: Qwen2Config, *, fetch=None) -> Iterator[tuple[str, jax.Array]]:
    """(HF name, array in HF layout and the parameter dtype), one tensor at a time, parameter by
    parameter (every layer of a stacked parameter together); no lm_head.weight when tied.

    `fetch(path) -> array` (offline conversion) loads one parameter on demand instead of reading
    `model_or_params`, so only one stacked parameter is ever in host memory."""
    if fetch is None:
        params = _param_arrays(model_or_params)
        fetch = lambda path: functools.reduce(lambda d, k: d[k], path, params)  # noqa: E731
    path_loaded, array = None, None
    for name, path, layer, transposed in _entries(config):
        if path != path_loaded:
            array = None  # let the previous parameter go before the next one is loaded
            path_loaded, array = path, fetch(path)
        if layer is None:
            yield name, (array.T if transposed else array)
        else:
            yield name, _layer_slice(array, layer, transposed)
