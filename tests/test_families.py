"""The training modes on each family beyond Qwen2 (tests/tiny_hf.py's FAMILIES: qwen3, llama tied
with llama3 rope, mistral, gemma tied), in process on a (2, 4) mesh.

Logits per family are in tests/test_model_parity.py, one full step through the command line
(`python -m jaxsft.train` in this process) against torch AdamW in tests/test_train_step.py; here,
per family: LoRA over every projection with the optimizer state offloaded, one step against
torch + PEFT (whose adapter is jaxsft's export, loaded onto the family's base), a checkpoint of the
offloaded state resumed exactly, and the merged export loaded by transformers as the same family;
and new tokens (model.added_tokens, full fine-tuning) one step against torch.
"""

from __future__ import annotations

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from cfg import settings
from modes import LR, Run, adam_close, hf_forward, load_torch, logits_error, padded_batch, rel, torch_steps
from tiny_hf import FAMILIES, make_tiny_hf_model

from jaxsft import bundled, hf
from jaxsft.checkpoint import Checkpointer
from jaxsft.hf import adapter
from jaxsft.model.lora import LoRASettings

pytestmark = pytest.mark.slow  # every mode on every family: two-step torch/PEFT comparisons per family: CI, not the inner loop

BASE_VOCAB = 1541  # the bundled tokenizer's len()
LORA = LoRASettings(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"))
MESH = (2, 4)


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            path = make_tiny_hf_model(tmp_path_factory.mktemp(family), seed=5,
                                      **dict(FAMILIES[family], vocab_size=BASE_VOCAB))
            hf.open_tokenizer(bundled.path("tokenizer")).save_pretrained(path)
            cache[family] = path
        return cache[family]

    return get


def _step_matches(m, ref, ours: dict, label):
    """One step's loss, pre-clip norm and tensors (name → array) against torch_steps' first step."""
    t_loss, t_norm, t_grads, t_params = ref[0]
    # end to end vs torch: not derivable (op orders through the layers); 8 eps as tests/test_train_step.py
    assert rel(m["loss"], t_loss) <= 1e-6 and rel(m["grad_norm"], t_norm) <= 1e-6, (label, m, t_loss, t_norm)
    assert set(ours) == set(t_params), (label, set(ours) ^ set(t_params))
    worst = [adam_close(ours[n], t_params[n], [t_grads[n]], LR) for n in t_params]
    print(f"{label}: loss rel {rel(m['loss'], t_loss):.1e}, norm rel {rel(m['grad_norm'], t_norm):.1e}, worst entry "
          f"{max(w[0] for w in worst):.1e} lr (conditioned {max(w[1] for w in worst):.1e} lr)")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_offload_resume_export(family_dir, family, tmp_path):
    model_dir = family_dir(family)
    batches = [padded_batch(s, 2, 4, 16, BASE_VOCAB) for s in (1, 2)]
    run = Run(model_dir, MESH, lora=LORA, offload=True)
    export = hf.Export(run.config, LORA)
    export.write_adapter(run.state["params"], tmp_path / "initial", base_model_name_or_path=str(model_dir))
    pm = peft.PeftModel.from_pretrained(load_torch(model_dir), str(tmp_path / "initial"), is_trainable=True)
    torch_params = {n.replace(".default", ""): p for n, p in pm.named_parameters() if "lora_" in n}
    assert len(torch_params) == 2 * 2 * len(LORA.targets)  # PEFT found every target on the family's base
    ref = torch_steps(hf_forward(pm), torch_params, batches[:1], [float(run.schedule(0))])
    m = run(batches[0])
    ours = {n: np.asarray(jax.device_get(a)) for n, a in adapter.adapter_tensors(run.state["params"], run.config, LORA)}
    _step_matches(m, ref, ours, f"{family} LoRA + offload")

    # the offloaded state saved after step 1, step 2 taken, then step 1 restored (into the same compiled
    # step: one compile per family) and step 2 taken again: bit for bit the same metrics and state
    s = settings({"trainer.default_local_dir": str(tmp_path / "run"), "trainer.checkpoint.async_save": False})
    ckpt = Checkpointer(s.checkpoint, base_model_dir=model_dir, max_length=s.data.max_length)
    ckpt.save(1, run.state)
    ckpt.close()
    unbroken = run(batches[1])
    after = [np.asarray(x).tobytes() for x in jax.tree.leaves(run.state)]
    run.state, _ = Checkpointer(s.checkpoint, base_model_dir=model_dir, max_length=s.data.max_length).restore_state(
        tmp_path / "run" / "global_step_1", run.state, run.shardings)
    assert int(run.state["step"]) == 1
    assert run(batches[1]) == unbroken
    assert [np.asarray(x).tobytes() for x in jax.tree.leaves(run.state)] == after

    # merged export: transformers loads it as the family's own class and computes jaxsft's logits
    out = hf.write_hf_directory(export.tensors(run.state["params"]), tmp_path / "export",
                                base_model_dir=model_dir, dtype="float32")
    exported, info = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                                       dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(exported) is type(load_torch(model_dir)) and exported.config.model_type == family
    assert exported.config.tie_word_embeddings == FAMILIES[family].get("tie_word_embeddings", False)
    # jax vs torch forward: not derivable (op orders), the bound of tests/test_model_parity.py
    assert logits_error(run, exported.eval(), padded_batch(7, 1, 4, 16, BASE_VOCAB)) <= 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_new_tokens_full_step(family_dir, family):
    """model.added_tokens on the family (tied: one table grows): the old rows are the base's, and
    one full step from that start equals torch's on the same resized model."""
    model_dir = family_dir(family)
    tokens = tuple(f"<item_{i}>" for i in range(8))
    added, cfg = hf.extend_vocabulary(tokens, hf.load_tokenizer(model_dir), hf.read_config(model_dir),
                                      say=lambda *a: None)
    run = Run(model_dir, MESH, added=added)
    start = run.hf_params()
    base = hf.read_config(model_dir)
    assert start["model.embed_tokens.weight"].shape[0] == cfg.vocab_size > base.vocab_size
    assert ("lm_head.weight" in start) == (not base.tie_word_embeddings)
    model = load_torch(model_dir)
    model.resize_token_embeddings(cfg.vocab_size, mean_resizing=False)
    missing, unexpected = model.load_state_dict({n: torch.from_numpy(a.copy()) for n, a in start.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    params = dict(model.named_parameters())  # a tied lm_head is the embedding: listed once
    batch = padded_batch(3, 2, 4, 16, cfg.vocab_size)
    batch["input_ids"][..., ::2] = np.where(batch["segment_ids"][..., ::2] > 0, np.asarray(added.new_ids)[
        np.arange(batch["input_ids"][..., ::2].size).reshape(batch["input_ids"][..., ::2].shape) % len(tokens)],
        batch["input_ids"][..., ::2])
    ref = torch_steps(hf_forward(model), params, [batch], [float(run.schedule(0))])
    m = run(batch)
    _step_matches(m, ref, run.hf_params(), f"{family} new tokens")
