"""Reading HF config.json and safetensors: name map, shardings, dtypes, errors, host memory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file, save_file
from e2e import env_for
from tiny_hf import load_hf_model, make_tiny_hf_model

from jaxsft import hf, parallel
from jaxsft.model.config import ModelConfig, UnsupportedConfigError
from jaxsft.model.decoder import ModelSettings

ROOT = Path(__file__).resolve().parent.parent
F32 = ModelSettings(param_dtype="float32", compute_dtype="float32", remat_policy="none", attn_implementation="xla")
FSDP = ("dp", "sp")


def load(model_dir, mesh_shape=(4, 2), settings=F32):
    mesh = parallel.make_mesh(*mesh_shape)
    with jax.set_mesh(mesh):
        return mesh, hf.load_model(model_dir, mesh, settings)


def file_tensors(model_dir) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def exported(model, model_dir) -> dict[str, np.ndarray]:
    return {name: np.asarray(jax.device_get(a)) for name, a in hf.export_tensors(model, hf.read_config(model_dir))}


def assert_round_trip(model, model_dir):
    """HF → jaxsft → HF gives back every tensor bit for bit (and nothing else)."""
    ours, theirs = exported(model, model_dir), file_tensors(model_dir)
    assert set(ours) == set(theirs)
    for name, a in theirs.items():
        assert ours[name].dtype == a.dtype and np.array_equal(ours[name], a), name


# Expected specs by the rule in jaxsft.parallel: the first of vocab, embed, mlp, q_heads, kv_heads
# that the parameter has and whose size divides by dp·sp = 8 is sharded over ('dp', 'sp').
DIVISIBLE: dict = {}  # the factory defaults: vocab 256, hidden 64, heads 4 / kv 2 (kv width 32), mlp 128
DIVISIBLE_SPECS = {
    "embed_tokens/embedding": P(FSDP, None),
    "layers/input_layernorm/scale": P(None, FSDP),
    "layers/self_attn/q_proj/kernel": P(None, FSDP, None),
    "layers/self_attn/q_proj/bias": P(None, FSDP),
    "layers/self_attn/k_proj/kernel": P(None, FSDP, None),
    "layers/self_attn/k_proj/bias": P(None, FSDP),
    "layers/self_attn/v_proj/kernel": P(None, FSDP, None),
    "layers/self_attn/v_proj/bias": P(None, FSDP),
    "layers/self_attn/o_proj/kernel": P(None, None, FSDP),
    "layers/post_attention_layernorm/scale": P(None, FSDP),
    "layers/mlp/gate_proj/kernel": P(None, FSDP, None),
    "layers/mlp/up_proj/kernel": P(None, FSDP, None),
    "layers/mlp/down_proj/kernel": P(None, None, FSDP),
    "norm/scale": P(FSDP),
    "lm_head/kernel": P(None, FSDP),
}
# vocab 260 and hidden 36 (3 heads of 12, kv width 12) divide by nothing: those parameters are
# replicated; only the MLP falls back to its `mlp` dimension (64).
FALLBACK = dict(vocab_size=260, hidden_size=36, num_attention_heads=3, num_key_value_heads=1, intermediate_size=64)
FALLBACK_SPECS = {
    "embed_tokens/embedding": P(),
    "layers/input_layernorm/scale": P(),
    "layers/self_attn/q_proj/kernel": P(),
    "layers/self_attn/q_proj/bias": P(),
    "layers/self_attn/k_proj/kernel": P(),
    "layers/self_attn/k_proj/bias": P(),
    "layers/self_attn/v_proj/kernel": P(),
    "layers/self_attn/v_proj/bias": P(),
    "layers/self_attn/o_proj/kernel": P(),
    "layers/post_attention_layernorm/scale": P(),
    "layers/mlp/gate_proj/kernel": P(None, None, FSDP),
    "layers/mlp/up_proj/kernel": P(None, None, FSDP),
    "layers/mlp/down_proj/kernel": P(None, FSDP, None),
    "norm/scale": P(),
    "lm_head/kernel": P(),
}


@pytest.mark.parametrize("overrides,specs", [(DIVISIBLE, DIVISIBLE_SPECS), (FALLBACK, FALLBACK_SPECS)],
                         ids=["divisible", "fallback"])
def test_loaded_parameters_follow_the_sharding_rule(tmp_path, overrides, specs):
    model_dir = make_tiny_hf_model(tmp_path, **overrides)
    mesh, model = load(model_dir, (4, 2))
    state = nnx.state(model, nnx.Param)
    params = {"/".join(map(str, path)): v[...] for path, v in nnx.to_flat_state(state)}
    assert set(params) == set(specs)
    rule = jax.tree.leaves(parallel.param_shardings(state, mesh))  # what random init would use
    assert [s.spec for s in rule] == [specs[p] for p in sorted(specs)]
    for path, array in params.items():
        expected = NamedSharding(mesh, specs[path])
        assert isinstance(array.sharding, NamedSharding), path
        assert array.sharding.is_equivalent_to(expected, array.ndim), (path, array.sharding.spec, specs[path])
        sharded = [d for d, s in enumerate(specs[path]) if s is not None]
        shard_shape = array.addressable_shards[0].data.shape
        assert shard_shape == tuple(n // 8 if d in sharded else n for d, n in enumerate(array.shape)), path
    assert_round_trip(model, model_dir)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_sharded_index_round_trip(tmp_path, tied):
    """Shards + model.safetensors.index.json load like a single file, on a (2, 4) mesh; tied models
    export no lm_head and use the embedding as the LM head."""
    model_dir = make_tiny_hf_model(tmp_path, tie_word_embeddings=tied, max_shard_size="40KB")
    assert (model_dir / hf.INDEX_FILE).is_file() and len(list(model_dir.glob("*.safetensors"))) > 2
    _, model = load(model_dir, (2, 4))
    assert_round_trip(model, model_dir)
    names = [n for n, _ in hf.export_tensors(model, hf.read_config(model_dir))]
    assert ("lm_head.weight" in names) is (not tied)
    if tied:
        np.testing.assert_array_equal(model.lm_head_kernel(), np.asarray(model.embed_tokens.embedding[...]).T)


def test_export_accepts_model_state_and_dict(tmp_path):
    model_dir = make_tiny_hf_model(tmp_path)
    _, model = load(model_dir, (1, 1))
    config = hf.read_config(model_dir)
    params = nnx.state(model, nnx.Param)
    expected = exported(model, model_dir)
    for source in (params, nnx.to_pure_dict(params)):
        got = {n: np.asarray(a) for n, a in hf.export_tensors(source, config)}
        assert got.keys() == expected.keys() and all(np.array_equal(got[n], expected[n]) for n in got)


@pytest.mark.parametrize("param_dtype", ["bfloat16", "float32"])
def test_bfloat16_checkpoint(tmp_path, param_dtype):
    """A bf16 checkpoint (as Qwen ships) reads without torch; bf16 params keep its bits exactly."""
    model_dir = make_tiny_hf_model(tmp_path)
    load_hf_model(model_dir).to(torch.bfloat16).save_pretrained(model_dir)
    theirs = file_tensors(model_dir)
    assert all(str(a.dtype) == "bfloat16" for a in theirs.values())
    _, model = load(model_dir, (4, 2), ModelSettings(param_dtype=param_dtype, attn_implementation="xla"))
    ours = exported(model, model_dir)
    for name, a in theirs.items():
        assert str(ours[name].dtype) == param_dtype
        np.testing.assert_array_equal(ours[name], a.astype(param_dtype), err_msg=name)


@pytest.fixture
def single_file_model(tmp_path):
    model_dir = make_tiny_hf_model(tmp_path)
    return model_dir, load_file(model_dir / hf.SINGLE_FILE)


def load_error(model_dir) -> str:
    with pytest.raises(ValueError) as info:
        load(model_dir, (1, 1))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_tensor_names_file_and_tensor(single_file_model):
    model_dir, tensors = single_file_model
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, model_dir / hf.SINGLE_FILE)
    message = load_error(model_dir)
    assert str(model_dir / hf.SINGLE_FILE) in message and "model.layers.1.mlp.up_proj.weight is missing" in message


def test_unexpected_tensor_names_file_and_tensor(single_file_model):
    model_dir, tensors = single_file_model
    tensors["model.layers.2.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, model_dir / hf.SINGLE_FILE)
    message = load_error(model_dir)
    assert str(model_dir / hf.SINGLE_FILE) in message and "unexpected tensor model.layers.2.mlp.up_proj.weight" in message


def test_shape_mismatch_names_file_and_tensor(single_file_model):
    model_dir, _ = single_file_model
    config = json.loads((model_dir / hf.CONFIG_FILE).read_text())
    config["intermediate_size"] = 96
    (model_dir / hf.CONFIG_FILE).write_text(json.dumps(config))
    message = load_error(model_dir)
    assert str(model_dir / hf.SINGLE_FILE) in message
    assert "model.layers.0.mlp.gate_proj.weight has shape [128, 64]; config.json implies [96, 64]" in message


def test_old_rotary_buffers_are_ignored(single_file_model):
    model_dir, tensors = single_file_model
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    save_file(tensors, model_dir / hf.SINGLE_FILE)
    load(model_dir, (1, 1))


# ---- config.json --------------------------------------------------------------------------------

QWEN25_7B = {  # Qwen2.5-7B-Instruct's config.json (transformers 4 era)
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2",
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}


def test_reads_old_and_new_config_json(tmp_path):
    old = ModelConfig.from_hf_dict(QWEN25_7B)
    assert (old.head_dim, old.rope_theta, old.rope_scaling, old.num_key_value_heads) == (128, 1e6, None, 4)
    # transformers 5 writes rope_parameters instead of rope_theta
    new = dict(QWEN25_7B, rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    del new["rope_theta"]
    assert ModelConfig.from_hf_dict(new) == old
    model_dir = make_tiny_hf_model(tmp_path, rope_theta=1e6, head_dim=8)
    assert "rope_parameters" in json.loads((model_dir / "config.json").read_text())
    read = hf.read_config(model_dir)
    assert (read.rope_theta, read.head_dim, read.hidden_size) == (1e6, 8, 64)


def test_old_rope_scaling_yarn_equals_rope_parameters():
    """Qwen2.5's long-context recipe adds `rope_scaling: {type: yarn, ...}` to an old config.json."""
    old = ModelConfig.from_hf_dict(dict(QWEN25_7B, rope_scaling={"type": "yarn", "factor": 4.0,
                                                                 "original_max_position_embeddings": 32768}))
    new = dict(QWEN25_7B, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                           "original_max_position_embeddings": 32768})
    del new["rope_theta"]
    assert old == ModelConfig.from_hf_dict(new)
    assert old.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert hash(old) == hash(ModelConfig.from_hf_dict(new))


@pytest.mark.parametrize("change,sentence", [
    (dict(use_sliding_window=True), "use_sliding_window: true; jaxsft implements full causal attention only"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope type 'dynamic'; jaxsft supports only 'default', 'yarn', 'llama3'"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e6}), "rope type 'longrope'"),
    (dict(model_type="phi3"), "model_type='phi3'; jaxsft supports 'qwen2', 'qwen3', 'qwen3_moe', 'qwen2_moe', 'llama', 'mistral', 'gemma'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(model_type="qwen3", layer_types=["full_attention", "sliding_attention"]), "layer_types ['sliding_attention']"),
    (dict(model_type="llama", rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     "llama3 rope scaling has no low_freq_factor, high_freq_factor"),
    (dict(model_type="gemma", hidden_act="silu"), "hidden_act='silu'; the gemma MLP here is gelu_pytorch_tanh-gated"),
    (dict(model_type="gemma", hidden_act="gelu", use_bidirectional_attention=True), "use_bidirectional_attention"),
], ids=["sliding_window", "dynamic_rope", "longrope", "model_type", "gelu", "layer_types", "llama3_keys", "gemma_act",
        "bidirectional"])
def test_config_refusals(change, sentence):
    with pytest.raises(UnsupportedConfigError, match=re.escape(sentence)):
        ModelConfig.from_hf_dict(dict(QWEN25_7B, **change))


def test_family_defaults_and_mistral_window():
    """Keys a config.json omits take the family's transformers default; a mistral sliding_window
    shorter than data.max_length is one ConfigError naming both (jaxsft.setup.check_window)."""
    from jaxsft.errors import ConfigError
    from jaxsft.setup import check_window

    bare = {k: QWEN25_7B[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                      "num_attention_heads", "num_key_value_heads")}
    gemma = ModelConfig.from_hf_dict(dict(bare, model_type="gemma"))
    assert (gemma.head_dim, gemma.tie_word_embeddings, gemma.hidden_act, gemma.qkv_bias) == (256, True,
                                                                                            "gelu_pytorch_tanh", False)
    assert ModelConfig.from_hf_dict(dict(bare, model_type="gemma", hidden_act="gelu")).hidden_act == "gelu_pytorch_tanh"
    qwen3 = ModelConfig.from_hf_dict(dict(bare, model_type="qwen3"))
    assert (qwen3.head_dim, qwen3.qk_norm, qwen3.qkv_bias, qwen3.o_bias) == (128, True, False, False)
    llama = ModelConfig.from_hf_dict(dict(bare, model_type="llama", attention_bias=True, mlp_bias=True))
    assert (llama.head_dim, llama.qkv_bias, llama.o_bias, llama.mlp_bias) == (128, True, True, True)
    assert ModelConfig.from_hf_dict(dict(bare, model_type="mistral")).sliding_window == 4096  # transformers' default
    assert ModelConfig.from_hf_dict(dict(bare, model_type="mistral", sliding_window=None)).sliding_window is None
    assert ModelConfig.from_hf_dict(QWEN25_7B).sliding_window is None  # qwen2: use_sliding_window false
    mistral = ModelConfig.from_hf_dict(dict(bare, model_type="mistral", sliding_window=4096))
    check_window(mistral, 4096, "m")  # a row of 4096 tokens never reaches past the window
    with pytest.raises(ConfigError, match=r"^m/config.json has sliding_window=4096, shorter than data.max_length=4097"):
        check_window(mistral, 4097, "m")


def test_missing_config_json(tmp_path):
    with pytest.raises(hf.ModelDirError, match="must be a Hugging Face model directory"):
        hf.read_config(tmp_path)


# ---- host memory ------------------------------------------------------------------------------

_MEASURE = textwrap.dedent("""
    import json, sys
    import jax
    from flax import nnx
    from jaxsft import hf, parallel
    from jaxsft.model.decoder import ModelSettings

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    mesh = parallel.make_mesh(4, 2)
    jax.numpy.zeros(1).block_until_ready()
    try:
        open("/proc/self/clear_refs", "w").write("5")  # restart VmHWM from the current RSS
    except OSError:
        pass
    base, hwm_before = status("VmRSS"), status("VmHWM")
    with jax.set_mesh(mesh):
        model = hf.load_model(sys.argv[1], mesh, ModelSettings(param_dtype="float32"))
        jax.block_until_ready(nnx.state(model))
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    print(json.dumps(dict(base=base, hwm_before=hwm_before, peak=status("VmHWM"), model_bytes=model_bytes)))
""")


def measure_load(model_dir) -> dict:
    env = dict(os.environ, XLA_FLAGS=env_for(8)["XLA_FLAGS"], JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(model_dir)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_loading_peak_host_memory(tmp_path):
    """Loading a 72 MB model (largest tensor 33.5 MB) in a fresh process raises peak RSS by the
    model itself (on CPU the devices' buffers are host memory) plus a fixed cost of compiling the
    loader's small jitted functions, plus at most 2x the largest tensor. The fixed cost is taken
    from loading a 0.7 MB model of the same structure in another fresh process."""
    big = make_tiny_hf_model(tmp_path, name="big", vocab_size=32768, hidden_size=256, intermediate_size=512)
    small = make_tiny_hf_model(tmp_path, name="small")
    largest = max(a.nbytes for a in load_file(big / hf.SINGLE_FILE).values())
    assert (big / hf.SINGLE_FILE).stat().st_size >= 50e6
    b, s = measure_load(big), measure_load(small)
    fixed = s["peak"] - s["base"] - s["model_bytes"]
    transient = b["peak"] - b["base"] - b["model_bytes"] - fixed
    mb = 1e-6
    print(f"\nload peak RSS: baseline {b['base'] * mb:.0f} MB, peak {b['peak'] * mb:.0f} MB "
          f"(+{(b['peak'] - b['base']) * mb:.0f}); model {b['model_bytes'] * mb:.1f} MB; fixed compile cost "
          f"{fixed * mb:.0f} MB; transient {transient * mb:.1f} MB = {transient / largest:.2f}x the largest tensor "
          f"({largest * mb:.1f} MB)")
    assert transient <= 2 * largest
