"""The training modes through `python -m jaxsft.train` (8 emulated CPU devices, the smoke recipe's
tiny tied Qwen2): LoRA with dropout, Ulysses sp = 2, packing and optimizer offload; new tokens with
`model.trainable=new_token_embeddings`. Each run is SIGKILLed after its step-2 save and relaunched
with the same command: steps 3 and 4 log the unbroken run's values bit for bit. The exports of the
last step load in transformers (and the adapter in PEFT), and `bin/convert_to_hf` writes the same
files. The killed launch is a process; the unbroken run and the relaunch run the command's own
`jaxsft.train.main` in this process (tests/runs.py).
"""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import runs
import torch
import transformers
from e2e import metrics, start_train
from safetensors.numpy import load_file

from convert import to_hf

COMMON = ("--config.data.max_length=256", "--config.data.train_batch_size=8", "--config.data.micro_batch_size_per_gpu=1",
          "--config.data.train_max_samples=24", "--config.data.val_files=None", "--config.trainer.total_epochs=2",
          "--config.trainer.test_freq=-1", "--config.trainer.save_freq=2", "--config.trainer.total_training_steps=4")
LORA = ("model.lora_rank=4", "model.lora_alpha=8", "model.lora_dropout=0.1", "ulysses_sequence_parallel_size=2",
        "model.fsdp_config.optimizer_offload=true")
TOKENS = tuple(f"<item_{i}>" for i in range(5))
pytestmark = pytest.mark.slow

EXACT = ("train/loss", "train/lr", "train/grad_norm", "train/loss_tokens")


def rows(run_dir):
    return {m["step"]: tuple(m["data"][k] for k in EXACT) for m in metrics(run_dir) if "train/loss" in m["data"]}


def killed_and_resumed(run_dir, base_model, *overrides):
    """Run to the step-2 save, SIGKILL, relaunch to the end; returns the relaunch's stdout."""
    proc = start_train(run_dir, base_model, *COMMON, *overrides, hook="pause:2")
    for line in proc.stdout:
        if "test hook: paused after step 2" in line:
            break
    else:
        raise AssertionError(f"exited {proc.wait()} before step 2")
    proc.kill()
    proc.wait()
    return runs.train(run_dir, base_model, *COMMON, *overrides).stdout


def tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def same_files(a, b):
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and all(ta[k].tobytes() == tb[k].tobytes() for k in ta)


@pytest.fixture(scope="module")
def lora_runs(base_model, tmp_path_factory):
    unbroken, resumed = tmp_path_factory.mktemp("lora_unbroken"), tmp_path_factory.mktemp("lora_resumed")
    said = runs.train(unbroken, base_model, *COMMON, *LORA).stdout
    return unbroken, resumed, said, killed_and_resumed(resumed, base_model, *LORA)


def test_lora_run_resumes_exactly_and_exports_merged_and_adapter(base_model, lora_runs, tmp_path):
    unbroken, resumed, said, again = lora_runs
    assert "training LoRA adapters (rank 4)" in said and "same RAM" in said  # the CPU offload note
    assert f"resumed from {resumed / 'global_step_2'}" in again
    assert {s: rows(unbroken)[s] for s in (3, 4)} == {s: rows(resumed)[s] for s in (3, 4)}
    step = unbroken / "global_step_4"
    merged, adapter = step / "huggingface", step / "lora_adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["lora_dropout"] == 0.1
    base = tensors(base_model)
    peft_model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
        base_model, dtype=torch.float32), str(adapter))
    unloaded = {n: p.detach().numpy() for n, p in peft_model.merge_and_unload().state_dict().items()}
    ours = tensors(merged)
    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)  # a plain Qwen2
    assert type(model).__name__ == "Qwen2ForCausalLM"
    for name, w in ours.items():
        if name.endswith("_proj.weight"):
            d = np.abs(w - unloaded[name]).max() / np.abs(unloaded[name]).max()
            # W + (B·A)·α/r, rank 4, in other orders (jaxsft vs PEFT): ≤ 8 eps of max|W| (as tests/test_lora.py)
            assert d <= 1e-6 and not np.array_equal(w, base[name]), (name, d)
        else:
            assert np.array_equal(w, base[name]), name  # norms, biases, embeddings: untouched
    converted = tmp_path / "merged"
    to_hf.convert(str(unbroken), str(converted))
    same_files(converted, merged)
    same_files(tmp_path / "merged_lora_adapter", adapter)
    assert json.loads((tmp_path / "merged_lora_adapter" / "adapter_config.json").read_text())["r"] == 4


@pytest.fixture(scope="module")
def token_runs(base_model, tmp_path_factory):
    listing = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    listing.write_text("\n".join(TOKENS) + "\n")
    keys = (f"model.added_tokens={listing}", "model.trainable=new_token_embeddings")
    unbroken, resumed = tmp_path_factory.mktemp("tokens_unbroken"), tmp_path_factory.mktemp("tokens_resumed")
    said = runs.train(unbroken, base_model, *COMMON, *keys).stdout
    return unbroken, resumed, said, killed_and_resumed(resumed, base_model, *keys)


def test_new_token_run_trains_only_the_new_rows_resumes_and_exports(base_model, token_runs, tmp_path):
    unbroken, resumed, said, again = token_runs
    assert "model.added_tokens: 5 new tokens, ids 1541–1545; vocabulary 1600 → 1546 rows" in said
    assert "training new_token_embeddings: 320 of" in said
    assert {s: rows(unbroken)[s] for s in (3, 4)} == {s: rows(resumed)[s] for s in (3, 4)}
    export = unbroken / "global_step_4" / "huggingface"
    base, ours = tensors(base_model), tensors(export)
    assert ours.keys() == base.keys()  # tied: no lm_head
    for name in base:
        if name != "model.embed_tokens.weight":
            assert np.array_equal(ours[name], base[name]), name
    table = ours["model.embed_tokens.weight"]
    assert table.shape == (1546, 64) and np.array_equal(table[:1541], base["model.embed_tokens.weight"][:1541])
    assert not (table[1541:] == base["model.embed_tokens.weight"][1541:1546]).all(axis=1).any()  # every new row moved
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    assert tokenizer.convert_tokens_to_ids(list(TOKENS)) == list(range(1541, 1546))
    model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    assert model.config.vocab_size == 1546
    ids = tokenizer("say <item_2> and <item_4>", return_tensors="pt").input_ids
    assert 1543 in ids[0].tolist() and torch.isfinite(model(ids).logits).all()
    converted = tmp_path / "hf"
    to_hf.convert(str(unbroken / "global_step_4"), str(converted))
    same_files(converted, export)
    assert transformers.AutoTokenizer.from_pretrained(converted).convert_tokens_to_ids("<item_4>") == 1545
