"""The tiny Qwen3-MoE (tests/tiny_hf.py's MOE: 6 experts, top-2, 3 layers) through `python -m
jaxsft.train` on 8 emulated CPU devices, the smoke recipe's data packed (first_fit): trained,
SIGKILLed after its step-2 save and relaunched with the same command (steps 3 and 4 log the
unbroken run's values bit for bit, router metrics included; both exports equal), the export loaded
by transformers as Qwen3MoeForCausalLM; and LoRA on the attention projections and on the experts
(model.target_parameters) with Ulysses sp = 2 and expert parallelism (16 experts), whose merged
export transformers loads as Qwen3MoeForCausalLM (attention and experts moved, the router not)
and whose adapter PEFT loads onto the base model with the same logits; that model's layer 1 is
dense (mlp_only_layers).
The killed launch is a process (tests/e2e.py), the other launches run in this process (tests/runs.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import runs
import torch
import transformers
from e2e import metrics
from test_modes_e2e import COMMON, killed_and_resumed, same_files, tensors
from convert import to_hf
from test_moe import per_expert
from tiny_hf import MOE, make_tiny_hf_model

from jaxsft import bundled, hf

pytestmark = pytest.mark.slow  # three trainer launches of a MoE model (one a process): CI, not the inner loop

EXACT = ("train/loss", "train/lr", "train/grad_norm", "train/loss_tokens", "train/router_aux_loss",
         "train/expert_load_max_mean")


def _moe_dir(tmp_path_factory, **overrides):
    path = make_tiny_hf_model(tmp_path_factory.mktemp("moe"), seed=11, name="tiny_qwen3_moe",
                              **dict(MOE, vocab_size=1541, max_position_embeddings=512, **overrides))  # the tokenizer's len()
    hf.open_tokenizer(bundled.path("tokenizer")).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return _moe_dir(tmp_path_factory)


def rows(run_dir):
    return {m["step"]: tuple(m["data"][k] for k in EXACT) for m in metrics(run_dir) if "train/loss" in m["data"]}


def load(export):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(model) is transformers.Qwen3MoeForCausalLM
    return model


def test_moe_run_killed_resumes_exactly_and_exports(moe_dir, tmp_path_factory):
    unbroken, resumed = tmp_path_factory.mktemp("moe_unbroken"), tmp_path_factory.mktemp("moe_resumed")
    runs.train(unbroken, moe_dir, *COMMON)
    again = killed_and_resumed(resumed, moe_dir)
    assert f"resumed from {resumed / 'global_step_2'}" in again
    ours, theirs = rows(unbroken), rows(resumed)
    assert sorted(ours) == [1, 2, 3, 4] and {s: ours[s] for s in (3, 4)} == {s: theirs[s] for s in (3, 4)}
    assert all(r[-1] > 1.0 for r in ours.values())  # uneven routing: the load metric is there and moves
    export = unbroken / "global_step_4" / "huggingface"
    same_files(resumed / "global_step_4" / "huggingface", export)
    model, base, trained = load(export), per_expert(tensors(moe_dir)), tensors(export)
    assert torch.isfinite(model(torch.tensor([[5, 17, 300, 1200, 9]])).logits).all()
    assert trained.keys() == base.keys()
    moved = [n for n in trained if not np.array_equal(trained[n], base[n])]
    assert any(".experts.0.down_proj" in n for n in moved) and any("mlp.gate.weight" in n for n in moved)


def test_moe_lora_on_attention_and_experts_with_ulysses_and_expert_parallelism_exports_merged(tmp_path_factory,
                                                                                             tmp_path):
    """16 experts, two whole experts per device (model.expert_layout=expert), sp = 2; layer 1 of the
    3 dense (mlp_only_layers), so the run, its checkpoint and both exports hold two stacks."""
    import peft

    moe_dir = _moe_dir(tmp_path_factory, num_experts=16, mlp_only_layers=[1])
    lora = ("model.lora_rank=4", "model.lora_alpha=8", "model.target_modules=[q_proj,k_proj,v_proj,o_proj]",
            "model.target_parameters=[mlp.experts.gate_up_proj,mlp.experts.down_proj]",
            "ulysses_sequence_parallel_size=2", "model.expert_layout=expert", "--config.trainer.total_training_steps=2")
    said = runs.train(tmp_path, moe_dir, *COMMON, *lora).stdout
    assert "training LoRA adapters (rank 4) on q_proj, k_proj, v_proj, o_proj, mlp.experts.gate_up_proj, " in said
    logged = [m["data"] for m in metrics(tmp_path) if "train/loss" in m["data"]]
    assert len(logged) == 2 and all(m["train/expert_dropped"] == 0 for m in logged)  # no capacity: none dropped
    export = tmp_path / "global_step_2" / "huggingface"
    model, base, merged = load(export), per_expert(tensors(moe_dir)), tensors(export)
    assert torch.isfinite(model(torch.tensor([[5, 17, 300, 9]])).logits).all()
    assert "model.layers.1.mlp.gate_proj.weight" in merged and not any("layers.1.mlp.experts" in n for n in merged)
    for name, w in merged.items():
        adapted = name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")) or ".experts." in name
        # merged W + B·A·α/r moved the attention projections and the experts; the rest (router, norms) is the base's
        assert np.array_equal(w, base[name]) != adapted, name
    # the PEFT adapter beside it, onto the base: the merged model's logits (float32 both; ≤ 1e-5 as the parity tests)
    with_adapter = peft.PeftModel.from_pretrained(load(moe_dir), str(export.parent / "lora_adapter")).eval()
    ids = torch.tensor([[5, 17, 300, 9, 44, 1000]])
    with torch.no_grad():
        a, b = with_adapter(ids).logits, model(ids).logits
    assert float((a - b).abs().max() / b.abs().max()) <= 1e-5
    # bin/convert_to_hf of the step reads the adapters' settings from its config: the same two directories
    to_hf.convert(str(export.parent), str(tmp_path / "converted"))
    same_files(tmp_path / "converted", export)
    same_files(tmp_path / "converted_lora_adapter", export.parent / "lora_adapter")
