"""HF export: tensors streamed into safetensors shards load in transformers unchanged."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from jaxsft.hf import INDEX_FILE, SINGLE_FILE, parse_size, write_hf_directory

TOKENIZER = Path(__file__).resolve().parent.parent / "jaxsft" / "assets" / "tokenizer"


def tiny_model_dir(path: Path, *, tied: bool) -> Path:
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    transformers.Qwen2ForCausalLM(cfg).float().save_pretrained(path)
    for f in TOKENIZER.iterdir():
        shutil.copyfile(f, path / f.name)
    return path


def hf_tensors(model_dir: Path):
    """The base model's tensors as jax arrays, one at a time (what jaxsft.hf.export_tensors yields)."""
    for name, array in load_file(model_dir / SINGLE_FILE).items():
        yield name, jnp.asarray(array)


def load(out: Path, dtype: torch.dtype):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


def assert_same_metadata(out: Path, base_dir: Path) -> None:
    """Generation config and tokenizer are saved by transformers (not copied): the same objects."""
    assert transformers.GenerationConfig.from_pretrained(out).to_dict() == \
        transformers.GenerationConfig.from_pretrained(base_dir).to_dict()
    ours, theirs = transformers.AutoTokenizer.from_pretrained(out), transformers.AutoTokenizer.from_pretrained(base_dir)
    assert type(ours) is type(theirs) and ours.get_vocab() == theirs.get_vocab()
    assert ours.chat_template == theirs.chat_template and ours.special_tokens_map == theirs.special_tokens_map
    chat = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "def f():\n    return 1"}]
    assert ours.apply_chat_template(chat, tokenize=True, return_dict=False) == \
        theirs.apply_chat_template(chat, tokenize=True, return_dict=False)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def base(request, tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("base"), tied=request.param), request.param


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_single_file(base, tmp_path, dtype):
    base_dir, tied = base
    out = write_hf_directory(hf_tensors(base_dir), tmp_path / "hf", base_model_dir=base_dir, dtype=dtype,
                             min_max_position_embeddings=256)
    assert (out / SINGLE_FILE).is_file() and not (out / INDEX_FILE).exists()
    assert ("lm_head.weight" in load_file(out / SINGLE_FILE)) is (not tied)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == dtype and cfg["max_position_embeddings"] == 256
    assert_same_metadata(out, base_dir)

    torch_dtype = getattr(torch, dtype)
    expected = load(base_dir, torch.float32).to(torch_dtype).state_dict()  # torch's own fp32 → bf16 rounding
    got = load(out, torch_dtype).state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k].dtype == torch_dtype and torch.equal(got[k], expected[k]), k


def test_sharded_with_index(base, tmp_path):
    base_dir, tied = base
    out = write_hf_directory(hf_tensors(base_dir), tmp_path / "hf", base_model_dir=base_dir, dtype="float32",
                             max_shard_size="20KB")
    index = json.loads((out / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 2 and files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert not (out / SINGLE_FILE).exists() and not list(out.glob(".shard-*"))
    sizes = {f: sum(a.nbytes for a in load_file(out / f).values()) for f in files}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    largest = max(a.nbytes for _, a in hf_tensors(base_dir))
    assert all(s <= max(parse_size("20KB"), largest) for s in sizes.values())

    expected = load(base_dir, torch.float32).state_dict()
    got = load(out, torch.float32).state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    # Re-exporting into the same directory as one file leaves no stale shards behind.
    write_hf_directory(hf_tensors(base_dir), out, base_model_dir=base_dir, dtype="float32")
    assert sorted(p.name for p in out.glob("model*")) == [SINGLE_FILE]


def test_sharded_array_is_gathered(base, tmp_path):
    base_dir, _ = base
    mesh = jax.make_mesh((4, 2), ("dp", "sp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def sharded():
        for name, a in hf_tensors(base_dir):
            spec = jax.P("dp", "sp") if a.ndim == 2 else jax.P()
            yield name, jax.device_put(a, jax.NamedSharding(mesh, spec))

    out = write_hf_directory(sharded(), tmp_path / "hf", base_model_dir=base_dir, dtype="float32")
    got, expected = load_file(out / SINGLE_FILE), load_file(base_dir / SINGLE_FILE)
    assert got.keys() == expected.keys() and all((got[k] == expected[k]).all() for k in got)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("five gigs")


_MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jaxsft.hf import BaseModelFiles, write_hf_directory

    base, out, dtype = sys.argv[1:4]
    shapes = {"model.embed_tokens.weight": (4096, 1024), "lm_head.weight": (4096, 1024)}
    shapes.update({f"model.layers.{i}.mlp.up_proj.weight": (1024, 1024) for i in range(8)})
    keys = jax.random.split(jax.random.key(0), len(shapes))
    params = {n: jax.random.normal(k, s, jnp.float32) for (n, s), k in zip(shapes.items(), keys)}
    jax.block_until_ready(params)

    def rss(field):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))

    def gathered():  # a fresh host copy per tensor, as a gather from GPU memory makes
        for name, p in params.items():
            yield name, np.array(p)

    files = BaseModelFiles.read(base)  # config and tokenizer: a fixed cost, not the streaming measured here
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = rss("VmRSS:")
    write_hf_directory(gathered(), out, base=files, dtype=dtype, max_shard_size="20MB")
    print(json.dumps({"growth": rss("VmHWM:") - before, "model": sum(p.nbytes for p in params.values()),
                      "largest": max(p.nbytes for p in params.values())}))
""")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.slow
def test_export_peak_host_memory_is_bounded(tmp_path, dtype):
    """A 67 MB float32 model exported with 20 MB shards: the peak RSS growth stays within two of
    its largest tensors plus one shard, well under the model size."""
    base_dir = tiny_model_dir(tmp_path / "base", tied=False)
    proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(base_dir), str(tmp_path / "hf"), dtype],
                          capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    bound = 2 * r["largest"] + parse_size("20MB")
    print(f"\nexport {dtype}: model {r['model'] / 1e6:.1f} MB, largest tensor {r['largest'] / 1e6:.1f} MB, "
          f"peak RSS growth {r['growth'] / 1e6:.1f} MB (bound {bound / 1e6:.1f} MB)")
    assert r["growth"] <= bound
