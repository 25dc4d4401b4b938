"""A model directory as users break it (issue 11 group 3, issue 10 items 5, 6, 9).

Every mistake in `model.partial_pretrain` stops `python -m jaxsft.train` with one
`jaxsft: error:` line naming the file, exit 2, before the data is read (the command's own
`jaxsft.train.main`, in this process: tests/runs.py; a hub id missing from the cache through a
real process, since HF_HOME is read when huggingface_hub is imported); hub ids resolve from the
local Hugging Face cache only; a directory without its vocabulary is refused instead of giving an
empty tokenizer; exported files honour the umask; the exported config.json is read the same by
transformers, jaxsft and older readers; resuming onto another base model is one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import runs
import transformers
from e2e import ROOT, env_for, train_args
from safetensors.numpy import load_file, save_file
from unprivileged import run_python

from jaxsft import bundled, hf, tiny
from jaxsft.errors import UserError
from jaxsft.hf import ModelDirError



# ---- making broken copies of the tiny base model ---------------------------------------------------

def copy_of(base_model: Path, tmp_path: Path, name: str = "model") -> Path:
    out = tmp_path / name
    shutil.copytree(base_model, out)
    return out


def sharded(model_dir: Path) -> Path:
    """Rewrite the weights as several shards + model.safetensors.index.json (100 KB shards)."""
    tensors = load_file(model_dir / hf.SINGLE_FILE)
    (model_dir / hf.SINGLE_FILE).unlink()
    hf.write_weights(tensors.items(), model_dir, dtype="float32", max_shard_size="100KB")
    assert len(list(model_dir.glob("model-*-of-*.safetensors"))) > 2
    return model_dir


def edit_json(path: Path, change) -> None:
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d, indent=2))


def remove_shard(d):
    shard = sorted(sharded(d).glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    return shard.name


def truncate(d):
    f = d / hf.SINGLE_FILE
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def wrong_shape(d):
    edit_json(d / hf.CONFIG_FILE, lambda c: c.update(intermediate_size=96))


def pytorch_only(d):
    (d / hf.SINGLE_FILE).unlink()
    (d / "pytorch_model.bin").write_bytes(b"\0" * 64)


def config_not_json(d):
    (d / hf.CONFIG_FILE).write_text('{"hidden_size": 64,')


def config_without_hidden_size(d):
    edit_json(d / hf.CONFIG_FILE, lambda c: c.pop("hidden_size"))


def no_tokenizer_files(d):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (d / name).unlink()


def no_tokenizer_json(d):
    (d / "tokenizer.json").unlink()


def index_names_a_tensor_twice(d):
    index = sharded(d) / hf.INDEX_FILE
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    # the same name again, in another shard: json.loads would silently keep the last one
    index.write_text(index.read_text().replace('"weight_map": {', f'"weight_map": {{"model.norm.weight": "{shards[0]}",'))


def index_omits_a_tensor(d):
    edit_json(sharded(d) / hf.INDEX_FILE, lambda i: i["weight_map"].pop("model.norm.weight"))


# (break the copy, expected text of the one error line; "{dir}" is the model directory)
CLI_CASES = {
    "shard_missing": (remove_shard, "{dir}/model.safetensors.index.json lists the shard model-00002-of-"),
    "truncated": (truncate, "{dir}/model.safetensors is not a readable safetensors file (truncated or corrupt?"),
    "wrong_shape": (wrong_shape, "{dir}/model.safetensors: tensor model.layers.0.mlp.gate_proj.weight has shape "
                                 "[160, 64]; config.json implies [96, 64]"),
    "pytorch_bin_only": (pytorch_only, "{dir} holds PyTorch weights (pytorch_model.bin) but jaxsft reads safetensors"),
    "config_not_json": (config_not_json, "{dir}/config.json is not valid JSON"),
    "config_without_hidden_size": (config_without_hidden_size, "{dir}/config.json has no 'hidden_size'"),
    "no_tokenizer_files": (no_tokenizer_files, "{dir} has no tokenizer files"),
    "no_tokenizer_json": (no_tokenizer_json, "{dir}/tokenizer.json is missing"),
    "index_names_a_tensor_twice": (index_names_a_tensor_twice,
                                   "{dir}/model.safetensors.index.json gives the key 'model.norm.weight' more than once"),
    "index_omits_a_tensor": (index_omits_a_tensor,
                             "{dir}/model.safetensors.index.json: tensor model.norm.weight is missing"),
}


def one_error_line(proc: subprocess.CompletedProcess | runs.Launch) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("jaxsft: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def train(tmp_path: Path, model: str | Path, *overrides: str) -> runs.Launch:
    return runs.train(tmp_path / "run", model, *overrides, check=False)


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_model_directory_mistake_is_one_line_exit_2(base_model, tmp_path, case):
    breaker, expected = CLI_CASES[case]
    model_dir = copy_of(base_model, tmp_path)
    breaker(model_dir)
    proc = train(tmp_path, model_dir)
    line = one_error_line(proc)
    assert expected.format(dir=model_dir) in line, line
    assert "train data" not in proc.stdout  # stopped before the data was read
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_hub_id_not_in_the_cache_says_how_to_download(tmp_path):
    environ = {k: v for k, v in env_for(1, HF_HOME=tmp_path / "hf_home").items() if k != "HF_HUB_CACHE"}  # HF_HOME decides
    proc = subprocess.run(train_args(tmp_path / "run", "Org/NotCached"), cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=300)
    line = one_error_line(proc)
    assert "model.partial_pretrain='Org/NotCached' is neither a local directory nor a model in the Hugging Face cache" \
        in line and f"{tmp_path / 'hf_home' / 'hub'}" in line and "`hf download Org/NotCached`" in line, line
    assert not (ROOT / "Org").exists() and not (tmp_path / "hf_home" / "hub" / "models--Org--NotCached").exists()


# ---- unit level: the rest of the listing, config.json and tokenizer checks --------------------------

def load_error(model_dir: Path) -> str:
    with pytest.raises(ModelDirError) as info:
        hf.check_weights(model_dir)
    message = str(info.value)
    assert "\n" not in message
    return message


WEIGHT_AND_CONFIG_CASES = ("shard_missing", "truncated", "wrong_shape", "pytorch_bin_only", "config_not_json",
                           "config_without_hidden_size", "index_names_a_tensor_twice", "index_omits_a_tensor")


@pytest.mark.parametrize("case", WEIGHT_AND_CONFIG_CASES)
def test_weight_and_config_mistakes_are_found_from_the_headers(base_model, tmp_path, case):
    """The same checks without a process: check_weights reads headers only, before load_model."""
    breaker, expected = CLI_CASES[case]
    model_dir = copy_of(base_model, tmp_path)
    breaker(model_dir)
    assert expected.format(dir=model_dir) in load_error(model_dir)


def test_index_places_a_tensor_in_a_shard_that_does_not_hold_it(base_model, tmp_path):
    model_dir = sharded(copy_of(base_model, tmp_path))
    index = json.loads((model_dir / hf.INDEX_FILE).read_text())
    right = index["weight_map"]["model.norm.weight"]
    wrong = next(f for f in sorted(set(index["weight_map"].values())) if f != right)
    edit_json(model_dir / hf.INDEX_FILE, lambda i: i["weight_map"].update({"model.norm.weight": wrong}))
    assert f"places tensor model.norm.weight in {wrong}, which does not hold it" in load_error(model_dir)


def test_single_file_and_index_together_are_ambiguous(base_model, tmp_path):
    model_dir = sharded(copy_of(base_model, tmp_path))
    shutil.copyfile(base_model / hf.SINGLE_FILE, model_dir / hf.SINGLE_FILE)
    assert f"{model_dir} holds both model.safetensors and model.safetensors.index.json" in load_error(model_dir)


def test_index_without_weight_map(base_model, tmp_path):
    model_dir = sharded(copy_of(base_model, tmp_path))
    (model_dir / hf.INDEX_FILE).write_text(json.dumps({"metadata": {}}))
    assert f"{model_dir / hf.INDEX_FILE} has no \"weight_map\"" in load_error(model_dir)


def test_quantized_tensor_is_refused(base_model, tmp_path):
    model_dir = copy_of(base_model, tmp_path)
    tensors = load_file(model_dir / hf.SINGLE_FILE)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int8)
    save_file(tensors, model_dir / hf.SINGLE_FILE)
    assert "tensor model.norm.weight is stored as I8; jaxsft reads float32, float16 and bfloat16" in load_error(model_dir)


def test_peft_adapter_and_other_file_names(base_model, tmp_path):
    adapter = copy_of(base_model, tmp_path, "adapter")
    (adapter / hf.SINGLE_FILE).rename(adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text("{}")
    assert f"{adapter} is a PEFT adapter, not a model" in load_error(adapter)
    renamed = copy_of(base_model, tmp_path, "renamed")
    (renamed / hf.SINGLE_FILE).rename(renamed / "weights.safetensors")
    assert "neither model.safetensors nor model.safetensors.index.json found (found weights.safetensors)" in \
        load_error(renamed)


@pytest.mark.parametrize("change, expected", [
    (lambda c: c.update(hidden_size="64"), "hidden_size is '64'; it must be a positive integer"),
    (lambda c: c.update(num_hidden_layers=0), "num_hidden_layers is 0; it must be a positive integer"),
    (lambda c: c.update(num_key_value_heads=3), "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    (lambda c: c.update(model_type="phi3"), "{dir}: config.json has model_type='phi3'"),
], ids=["string", "zero_layers", "heads", "model_type"])
def test_config_json_values(base_model, tmp_path, change, expected):
    model_dir = copy_of(base_model, tmp_path)
    edit_json(model_dir / hf.CONFIG_FILE, change)
    with pytest.raises(UserError) as info:  # model_type: UnsupportedConfigError, the others ModelDirError
        hf.read_config(model_dir)
    assert expected.format(dir=model_dir) in str(info.value)


def test_config_json_key_given_twice(base_model, tmp_path):
    model_dir = copy_of(base_model, tmp_path)
    path = model_dir / hf.CONFIG_FILE
    path.write_text(path.read_text().replace('"hidden_size": 64,', '"hidden_size": 64,\n  "hidden_size": 32,'))
    with pytest.raises(ModelDirError, match="gives the key 'hidden_size' more than once"):
        hf.read_config(model_dir)


READ_CONFIG = """
from jaxsft import hf
from jaxsft.errors import UserError
for call in (hf.read_config, hf.resolve_model_dir):
    try:
        call({path!r})
        print("read")
    except UserError as e:
        print(type(e).__name__, e)
"""


@pytest.mark.slow  # over ~5 s on 2 cores: CI's full run, not the ≤ 3-minute inner loop
def test_unreadable_directory(base_model, tmp_path):
    """As a user whom permissions bind (root with its file overrides dropped, tests/unprivileged.py)."""
    model_dir = copy_of(base_model, tmp_path)
    model_dir.chmod(0)
    try:
        lines = run_python(READ_CONFIG.format(path=str(model_dir))).stdout.splitlines()
    finally:
        model_dir.chmod(0o755)
    assert len(lines) == 2 and all(line.startswith(f"ModelDirError cannot read {model_dir}: permission denied")
                                   for line in lines), lines


@pytest.mark.slow  # over ~5 s on 2 cores: CI's full run, not the ≤ 3-minute inner loop
def test_unreadable_config_json(base_model, tmp_path):
    model_dir = copy_of(base_model, tmp_path)
    (model_dir / hf.CONFIG_FILE).chmod(0)
    lines = run_python(READ_CONFIG.format(path=str(model_dir))).stdout.splitlines()
    assert lines[0].startswith(f"ModelDirError cannot read {model_dir / hf.CONFIG_FILE}: permission denied"), lines
    (model_dir / hf.CONFIG_FILE).chmod(0o644)
    assert run_python(READ_CONFIG.format(path=str(model_dir))).stdout.splitlines() == ["read", "read"]


# ---- tokenizer --------------------------------------------------------------------------------

def tokenizer_error(model_dir, **kw) -> str:
    with pytest.raises(ModelDirError) as info:
        hf.load_tokenizer(model_dir, **kw)
    return str(info.value)


def test_missing_tokenizer_json_was_an_empty_vocabulary(base_model, tmp_path):
    """What transformers does on its own (the reason for the check), and the refusal."""
    model_dir = copy_of(base_model, tmp_path)
    no_tokenizer_json(model_dir)
    silent = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert len(silent) < 10 and silent.encode("def f(): return 1") == []
    assert "tokenizer.json is missing (and there is no vocab.json + merges.txt)" in tokenizer_error(model_dir)


def test_slow_vocabulary_files_are_enough(base_model, tmp_path):
    """vocab.json + merges.txt (no tokenizer.json) is a real byte-level vocabulary: it loads."""
    model_dir = copy_of(base_model, tmp_path)
    bpe = json.loads((model_dir / "tokenizer.json").read_text())["model"]
    (model_dir / "vocab.json").write_text(json.dumps(bpe["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (model_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (model_dir / "tokenizer.json").unlink()
    edit_json(model_dir / "tokenizer_config.json", lambda c: c.update(tokenizer_class="Qwen2Tokenizer"))
    tok = hf.load_tokenizer(model_dir)
    assert len(tok) >= hf.tokenizer.MIN_VOCABULARY
    assert tok.encode("def f(): return 1") == hf.load_tokenizer(base_model).encode("def f(): return 1")


def test_empty_or_corrupt_tokenizer_json(base_model, tmp_path):
    empty = copy_of(base_model, tmp_path, "empty")
    edit_json(empty / "tokenizer.json", lambda t: t["model"].update(vocab={}, merges=[]))
    assert f"the tokenizer in {empty} has only" in tokenizer_error(empty)
    corrupt = copy_of(base_model, tmp_path, "corrupt")
    (corrupt / "tokenizer.json").write_text("{not json")
    assert f"transformers cannot load the tokenizer in {corrupt}: " in tokenizer_error(corrupt)


REMOTE_TOKENIZER = textwrap.dedent("""
    from transformers import PreTrainedTokenizerFast


    class RemoteTokenizer(PreTrainedTokenizerFast):
        pass
""")


def test_trust_remote_code_reaches_the_tokenizer(base_model, tmp_path):
    model_dir = copy_of(base_model, tmp_path)
    (model_dir / "remote_tokenizer.py").write_text(REMOTE_TOKENIZER)
    edit_json(model_dir / "tokenizer_config.json",
              lambda c: c.update(auto_map={"AutoTokenizer": [None, "remote_tokenizer.RemoteTokenizer"]}))
    assert type(hf.load_tokenizer(model_dir, trust_remote_code=True)).__name__ == "RemoteTokenizer"
    assert type(hf.load_tokenizer(model_dir, trust_remote_code=False)).__name__ != "RemoteTokenizer"


# ---- hub ids ----------------------------------------------------------------------------------

_RESOLVE = textwrap.dedent("""
    import sys
    from jaxsft.hf import ModelDirError, resolve_model_dir
    for value in sys.argv[1:]:
        try:
            print("path", resolve_model_dir(value))
        except ModelDirError as e:
            print("error", e)
""")


def fake_cache(hf_home: Path, repo_id: str, source: Path | None, revision: str = "0123abcd") -> Path:
    """The layout huggingface_hub writes: hub/models--Org--Name/ with blobs/<hash>, refs/main naming
    the revision, and snapshots/<revision>/<file> symlinks to ../../blobs/<hash>."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(source.iterdir()) if source is not None else []):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.mark.slow  # over ~5 s on 2 cores: CI's full run, not the ≤ 3-minute inner loop
def test_hub_id_resolves_from_the_cache_that_hf_home_names(base_model, tmp_path):
    hf_home = tmp_path / "hf_home"
    snapshot = fake_cache(hf_home, "Org/Name", base_model)
    fake_cache(hf_home, "Org/Partial", None)
    env = {k: v for k, v in env_for(1, HF_HOME=hf_home).items() if k != "HF_HUB_CACHE"}
    proc = subprocess.run([sys.executable, "-c", _RESOLVE, "Org/Name", "Org/Partial", "Org/Missing"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = proc.stdout.strip().splitlines()
    assert got[0] == f"path {snapshot}"
    assert got[1].startswith("error model.partial_pretrain='Org/Partial': the cached snapshot") and \
        "has no config.json" in got[1]
    assert got[2].startswith("error model.partial_pretrain='Org/Missing' is neither a local directory nor a model "
                             f"in the Hugging Face cache ({hf_home / 'hub'}") and "hf download Org/Missing" in got[2]


def test_local_paths_are_never_looked_up(base_model, tmp_path):
    assert hf.resolve_model_dir(base_model) == base_model
    assert hf.resolve_model_dir(str(base_model)) == base_model
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("")
    for value, expected in [(tmp_path / "empty", "is not a Hugging Face model directory (no config.json there)"),
                            (tmp_path / "file", "is a file, not a Hugging Face model directory"),
                            (tmp_path / "gone", f"(no config.json there): {tmp_path / 'gone'} does not exist"),
                            ("./Org/Name", "does not exist"), ("runs/jaxsft-test/no-such-model", "does not exist")]:
        with pytest.raises(ModelDirError, match=None) as info:
            hf.resolve_model_dir(value)
        assert str(info.value).startswith(f"model.partial_pretrain={str(value)!r}") and expected in str(info.value)


# ---- what an export writes ----------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_exported_files_honour_the_umask(base_model, tmp_path, umask, mode):
    """safetensors alone creates its files 0600: another user's inference server could not read them."""
    previous = os.umask(umask)
    try:
        tensors = load_file(base_model / hf.SINGLE_FILE)
        out = hf.write_hf_directory(iter(tensors.items()), tmp_path / "single", base_model_dir=base_model,
                                    dtype="float32")
        shards = hf.write_hf_directory(iter(tensors.items()), tmp_path / "shards", base_model_dir=base_model,
                                       dtype="bfloat16", max_shard_size="100KB")
        made = tiny.ensure_tiny_model(tmp_path / "tiny", bundled.path("tokenizer"))
    finally:
        os.umask(previous)
    for d in (out, shards, made):
        modes = {p.name: p.stat().st_mode & 0o777 for p in d.iterdir()}
        assert set(modes.values()) == {mode}, modes
    assert len(list(shards.glob("model-*.safetensors"))) > 2


QWEN25_STYLE = {  # a transformers-4-era config.json, as Qwen2.5 ships it, at the tiny model's size
    "architectures": ["Qwen2ForCausalLM"], "bos_token_id": None, "eos_token_id": 1538, "hidden_act": "silu",
    "hidden_size": 64, "intermediate_size": 160, "max_position_embeddings": 2048, "max_window_layers": 2,
    "model_type": "qwen2", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 2048, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 1600,
}


@pytest.mark.parametrize("rope_scaling", [None, {"type": "yarn", "factor": 4.0}], ids=["plain", "yarn"])
def test_exported_config_reads_the_same_everywhere(base_model, tmp_path, rope_scaling):
    """From an old-format config.json, the export (max_position_embeddings raised to the training
    max_length) reads as the base does in jaxsft and in transformers, apart from that raise and the
    dtype, and keeps the spellings older readers use. With yarn and no explicit
    original_max_position_embeddings (which defaults to max_position_embeddings) the raise must
    not move the yarn window: config.json carries it explicitly."""
    base = copy_of(base_model, tmp_path, "base")
    config = dict(QWEN25_STYLE, **({"rope_scaling": rope_scaling} if rope_scaling else {}))
    (base / hf.CONFIG_FILE).write_text(json.dumps(config))
    out = hf.write_hf_directory(iter(load_file(base / hf.SINGLE_FILE).items()), tmp_path / "out",
                                base_model_dir=base, dtype="float32", min_max_position_embeddings=8192)
    written = json.loads((out / hf.CONFIG_FILE).read_text())
    assert written["dtype"] == written["torch_dtype"] == "float32" and written["max_position_embeddings"] == 8192
    assert written["rope_theta"] == 1e6  # transformers 5 alone would drop it: old readers would use 10000
    ours, theirs = hf.read_config(out), hf.read_config(base)
    assert ours == dataclasses.replace(theirs, max_position_embeddings=8192)
    got, expected = transformers.AutoConfig.from_pretrained(out), transformers.AutoConfig.from_pretrained(base)
    assert got.rope_parameters == expected.rope_parameters
    if rope_scaling:
        assert got.rope_parameters["original_max_position_embeddings"] == 2048
        assert written["rope_scaling"]["original_max_position_embeddings"] == 2048
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.max_position_embeddings == 8192


# ---- resuming onto another base model ----------------------------------------------------------------

@pytest.mark.slow
def test_resuming_with_another_base_model_is_one_line(base_model, reference, tmp_path):
    """The session's reference run (tests/conftest.py) resumed with a base model of another shape,
    in this process."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    other = tiny.ensure_tiny_model(tmp_path / "other", bundled.path("tokenizer"), intermediate_size=96)
    line = one_error_line(runs.train(run_dir, other, *runs.REFERENCE, check=False))
    assert f"cannot resume from {run_dir / 'global_step_6'}: it holds a different model" in line, line
    assert "params/layers/mlp/down_proj/kernel has shape [2, 160, 64] there but [2, 96, 64] here" in line, line
    assert f"it was trained from {base_model.resolve()}" in line, line
    assert sorted(p.name for p in run_dir.glob("global_step_*")) == ["global_step_3", "global_step_6"]  # nothing overwritten


def test_resume_refuses_a_checkpoint_with_other_parameters(tmp_path):
    """Unit level, the other direction: an untied checkpoint's LM head onto a tied model would be
    dropped without a word by a partial restore."""
    import jax
    import jax.numpy as jnp

    from cfg import settings

    from jaxsft.checkpoint import Checkpointer, CheckpointError

    s = settings({"trainer.default_local_dir": str(tmp_path), "trainer.checkpoint.save_contents": ["model"],
                  "trainer.checkpoint.async_save": False})

    def checkpointer():
        return Checkpointer(s.checkpoint, base_model_dir=tmp_path, max_length=s.data.max_length)

    untied = {"params": {"embed": jnp.ones((8, 4)), "lm_head": jnp.ones((4, 8))}}
    ckpt = checkpointer()
    step_dir = ckpt.save(1, untied, meta={"base_model": "/models/untied"})
    ckpt.close()
    tied = {"params": {"embed": jax.ShapeDtypeStruct((8, 4), jnp.float32)}}
    with pytest.raises(CheckpointError, match="params/lm_head is in it but not in this model; it was trained from "
                                              "/models/untied"):
        checkpointer().restore(step_dir, tied)
    wider = {"params": {"embed": jax.ShapeDtypeStruct((8, 6), jnp.float32),
                        "lm_head": jax.ShapeDtypeStruct((4, 8), jnp.float32)}}
    with pytest.raises(CheckpointError, match=r"params/embed has shape \[8, 4\] there but \[8, 6\] here"):
        checkpointer().restore(step_dir, wider)
