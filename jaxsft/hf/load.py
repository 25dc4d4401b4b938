"""Reading a Hugging Face model directory: config.json, then the weights, one tensor at a time.

Every mistake in the directory is found before a weight is read, and reported as one
`ModelDirError` sentence naming the file: config.json missing, unreadable, not JSON or missing a
key; the index naming a shard that is not there, a tensor twice, or a tensor its shard does not
hold; a truncated or corrupt safetensors file (its header does not cover the file); a tensor
missing, unexpected, of the wrong shape or of a dtype jaxsft cannot train; PyTorch `.bin`
weights only. (A few flipped bytes inside a tensor's data cannot be seen: safetensors keeps no
checksum.)

Loading keeps host memory near one tensor: the model is built abstractly (`nnx.eval_shape`, no
random init), each tensor is read alone from its safetensors file, placed on the devices in its
target sharding, and either converted into its parameter (transpose, cast) or written into slice
i of the stacked parameter by a jitted `dynamic_update_slice` that donates the stack (no second
copy of the stack).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors import SafetensorError, safe_open

from jaxsft import parallel
from jaxsft.errors import UserError
from jaxsft.hf.files import ModelDirError, check_readable, read_json  # noqa: F401 (ModelDirError: part of this API)
from jaxsft.hf.names import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, entries, hf_shape, ignored
from jaxsft.model import lora, vocab
from jaxsft.model.config import ModelConfig
from jaxsft.model.decoder import ModelSettings, CausalLM

# safetensors dtype codes jaxsft reads (cast to the parameter dtype on the devices).
FLOAT_DTYPES = ("F32", "F16", "BF16")
# config.json keys without which the architecture is unknown.
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_TORCH_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def read_config(model_dir) -> ModelConfig:
    """config.json as a ModelConfig; every problem is one ModelDirError (or
    UnsupportedConfigError) naming the directory or file."""
    model_dir = Path(model_dir)
    check_readable(model_dir)
    path = model_dir / CONFIG_FILE
    if not path.exists():
        raise ModelDirError(f"{path} not found: model.partial_pretrain must be a Hugging Face model directory")
    d = read_json(path)
    if not isinstance(d, dict):
        raise ModelDirError(f"{path} holds a JSON {type(d).__name__}, not an object of settings")
    for key in REQUIRED_KEYS:
        if key not in d:
            raise ModelDirError(f"{path} has no {key!r}, which a decoder config.json needs")
    for key in REQUIRED_KEYS + ("num_key_value_heads", "head_dim"):
        value = d.get(key)
        if value is not None and (type(value) is not int or value <= 0):
            raise ModelDirError(f"{path}: {key} is {value!r}; it must be a positive integer")
    heads, kv_heads = d["num_attention_heads"], d.get("num_key_value_heads") or d["num_attention_heads"]
    if heads % kv_heads:
        raise ModelDirError(f"{path}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    if not d.get("head_dim") and d["hidden_size"] % heads:
        raise ModelDirError(f"{path}: hidden_size={d['hidden_size']} is not a multiple of num_attention_heads={heads} "
                            f"(and there is no head_dim)")
    try:
        return ModelConfig.from_hf_dict(d)
    except UserError as e:  # names the key, not yet the directory
        raise type(e)(f"{model_dir}: {e}") from None


# ---- the weights' listing -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' code: F32, BF16, ...


def _header(file: Path) -> dict[str, TensorInfo]:
    """Name → TensorInfo of one safetensors file, from its header only. safetensors checks on
    open that the header's offsets cover the file exactly, so a truncated file fails here."""
    try:
        with safe_open(file, framework="numpy") as f:
            out = {}
            for name in f.keys():
                s = f.get_slice(name)
                out[name] = TensorInfo(file, tuple(s.get_shape()), s.get_dtype())
            return out
    except FileNotFoundError:
        raise ModelDirError(f"{file} not found") from None
    except PermissionError:
        raise ModelDirError(f"cannot read {file}: permission denied") from None
    except (SafetensorError, OSError) as e:
        raise ModelDirError(f"{file} is not a readable safetensors file (truncated or corrupt? {e})") from None


def _no_weights(model_dir: Path) -> ModelDirError:
    present = {p.name for p in model_dir.iterdir()} if model_dir.is_dir() else set()
    torch_files = sorted(present & set(_TORCH_WEIGHTS)) or sorted(n for n in present if n.endswith(".bin"))
    if torch_files:
        return ModelDirError(
            f"{model_dir} holds PyTorch weights ({', '.join(torch_files)}) but jaxsft reads safetensors only: convert "
            f"them once with transformers (AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR), which "
            f"writes {SINGLE_FILE})")
    if "adapter_config.json" in present:
        return ModelDirError(f"{model_dir} is a PEFT adapter, not a model: merge it into its base model first")
    others = sorted(n for n in present if n.endswith(".safetensors"))
    found = f" (found {', '.join(others)})" if others else ""
    return ModelDirError(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found{found}")


def _listing(model_dir: Path) -> tuple[Path, dict[str, TensorInfo]]:
    """(the file that lists the tensors, name → TensorInfo), every header read once."""
    index, single = model_dir / INDEX_FILE, model_dir / SINGLE_FILE
    if index.is_file() and single.is_file():
        raise ModelDirError(f"{model_dir} holds both {SINGLE_FILE} and {INDEX_FILE}: transformers would read the "
                            f"first, other tools the shards; remove the one left over from an earlier save")
    if index.is_file():
        listed = read_json(index)
        weight_map = listed.get("weight_map") if isinstance(listed, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelDirError(f"{index} has no \"weight_map\" of tensor name → file name")
        headers: dict[str, dict[str, TensorInfo]] = {}
        for shard in sorted(set(weight_map.values())):
            path = model_dir / shard
            if not path.is_file():
                raise ModelDirError(f"{index} lists the shard {shard}, which is missing from {model_dir}")
            headers[shard] = _header(path)
        tensors = {}
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise ModelDirError(f"{index} places tensor {name} in {shard}, which does not hold it")
            tensors[name] = headers[shard][name]
        return index, tensors
    if single.is_file():
        return single, _header(single)
    raise _no_weights(model_dir)


def _abstract_model(config: ModelConfig, settings: ModelSettings):
    return nnx.eval_shape(lambda: CausalLM(config, settings, rngs=nnx.Rngs(0)))


def check_weights(model_dir, config: ModelConfig | None = None) -> dict[str, TensorInfo]:
    """Name → TensorInfo of every weight `load_model` will read, after checking from the files'
    headers alone (no tensor is read) that they are exactly the weights of config.json's model."""
    model_dir = Path(model_dir)
    config = config or read_config(model_dir)
    listing, tensors = _listing(model_dir)
    variables = dict(nnx.to_flat_state(nnx.state(_abstract_model(config, ModelSettings(attn_implementation="xla")))))
    expected = {name: hf_shape(variables[path].shape, index, transposed)
                for name, path, index, transposed in entries(config)}
    for name, info in tensors.items():
        if name not in expected and not ignored(name, config):
            raise ModelDirError(f"{info.file}: unexpected tensor {name} (not a weight of this {config.model_type} config.json)")
    for name, shape in expected.items():
        if name not in tensors:
            raise ModelDirError(f"{listing}: tensor {name} is missing")
        info = tensors[name]
        if info.shape != shape:
            raise ModelDirError(f"{info.file}: tensor {name} has shape {list(info.shape)}; "
                                f"config.json implies {list(shape)}")
        if info.dtype not in FLOAT_DTYPES:
            raise ModelDirError(f"{info.file}: tensor {name} is stored as {info.dtype}; jaxsft reads float32, float16 "
                                f"and bfloat16 weights (a quantized checkpoint?)")
    return {name: tensors[name] for name in expected}


# ---- loading ------------------------------------------------------------------------------------

def _hf_spec(spec: P, ndim: int, index: tuple[int, ...], transposed) -> P:
    """The target parameter's spec, for the tensor as stored by HF (indexed axes gone, transposed)."""
    dims = list(spec) + [None] * (ndim - len(spec))
    dims = dims[len(index):]
    return P(*(dims[::-1] if transposed else dims))


def _read(info: TensorInfo, name: str) -> np.ndarray:
    # One tensor per open: the file is never mapped longer than it takes to copy that tensor.
    try:
        with safe_open(info.file, framework="numpy") as f:
            return f.get_tensor(name)
    except (SafetensorError, OSError) as e:  # changed on disk since its header was checked
        raise ModelDirError(f"{info.file}: cannot read tensor {name} ({e})") from None


def _put(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Place a host array in `sharding`; each process transfers only its own devices' shards."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


@functools.lru_cache(maxsize=None)
def _converter(transposed: bool, dtype, sharding: NamedSharding):
    return jax.jit(lambda x: (x.T if transposed else x).astype(dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _layer_writer(transposed: bool, sharding: NamedSharding):
    def write(stack, x, index):  # index [n]: the slice's place on the leading n axes
        x = (x.T if transposed else x).astype(stack.dtype)
        n = index.shape[0]
        start = (*(index[j] for j in range(n)), *(0,) * x.ndim)
        return jax.lax.dynamic_update_slice(stack, x.reshape((1,) * n + x.shape), start)

    return jax.jit(write, donate_argnums=0, out_shardings=sharding)


def _adapter_init(path, var, mesh: Mesh, seed: int) -> jax.Array:
    """A LoRA adapter's initial value (PEFT's: A Kaiming-uniform, B zero), made in its sharding;
    the key is a function of (seed, path) only."""
    sharding = parallel.param_sharding(var, mesh)
    if path[-1] == "lora_b":
        return jnp.zeros(var.shape, var.dtype, device=sharding)
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32("/".join(path).encode()))
    return jax.jit(lambda k: lora.initial_a(k, var.shape, var.dtype), out_shardings=sharding)(key)


def load_model(model_dir, mesh: Mesh, settings: ModelSettings, *, seed: int = 0,
               config: ModelConfig | None = None) -> CausalLM:
    """The HF model at `model_dir` as a CausalLM whose parameters live in their
    NamedShardings on `mesh` (see jaxsft.parallel for the rule).

    With `settings.lora`, the adapters start as PEFT's (seeded by `seed`). A `config` whose
    vocab_size differs from config.json's (model.added_tokens) resizes the embedding and the untied
    LM head as transformers' `resize_token_embeddings(vocab_size, mean_resizing=True)`
    (jaxsft.model.vocab; the draw seeded by `seed`)."""
    model_dir = Path(model_dir)
    wanted, config = config, read_config(model_dir)
    if wanted is not None and dataclasses.replace(wanted, vocab_size=config.vocab_size) != config:
        raise ValueError(f"load_model: the config given differs from {model_dir / CONFIG_FILE} beyond vocab_size")
    vocab_size = None if wanted is None else wanted.vocab_size
    tensors = check_weights(model_dir, config)
    graphdef, state = nnx.split(_abstract_model(config, settings))
    variables = dict(nnx.to_flat_state(state))

    values: dict[tuple[str, ...], jax.Array] = {}
    for name, path, index, transposed in entries(config):
        var = variables[path]
        target = parallel.param_sharding(var, mesh)
        array = _read(tensors[name], name)
        raw = _put(array, NamedSharding(mesh, _hf_spec(target.spec, var.ndim, index, transposed)))
        del array
        if not index:
            same = not transposed and raw.dtype == var.dtype  # raw already has the target sharding
            values[path] = raw if same else _converter(transposed, var.dtype, target)(raw)
        else:
            if path not in values:
                values[path] = jnp.zeros(var.shape, var.dtype, device=target)
            values[path] = _layer_writer(transposed, target)(values[path], raw, np.asarray(index, np.int32))
        del raw

    for path, var in variables.items():
        var.set_value(values[path] if path in values else _adapter_init(path, var, mesh, seed))
    model = nnx.merge(graphdef, state)
    if vocab_size is not None and vocab_size != config.vocab_size:
        _resize_vocabulary(model, vocab_size, mesh, seed)
    return model


def _resize_vocabulary(model: CausalLM, vocab_size: int, mesh: Mesh, seed: int) -> None:
    tables = [(model.embed_tokens.embedding, 0)]
    if model.lm_head is not None:
        tables.append((model.lm_head.kernel, 1))
    for k, (var, axis) in enumerate(tables):
        shape = list(var.shape)
        shape[axis] = vocab_size
        sharding = NamedSharding(mesh, parallel.param_spec(var.get_metadata()["axes"], shape, mesh))
        var.set_value(vocab.resized(var[...], vocab_size, axis, seed=(seed, k), sharding=sharding))
    model.config = dataclasses.replace(model.config, vocab_size=vocab_size)
