"""LoRA on a mixture-of-experts model's routed experts (`model.target_parameters`) against torch +
PEFT 0.21's `target_parameters` (its ParamWrapper) on the tiny Qwen3-MoE (tests/tiny_hf.py's MOE:
6 experts, top-2, 3 layers), with LoRA on q_proj and v_proj too.

The start is jaxsft's initial adapters written by jaxsft's adapter export and loaded by
`peft.PeftModel.from_pretrained` (so the export's layout, lora_A [E·r, in] and lora_B [out, r·E],
is what step 1's gradients test: another layout gives other gradients); then two steps against
torch AdamW with the router's load-balancing loss; then the trained adapter, loaded by PEFT onto a
fresh base, gives jaxsft's logits, and the merged export equals PEFT's merge_and_unload().
"""

from __future__ import annotations

import jax
import numpy as np
import peft
import pytest
from modes import LR, Run, adam_close, load_torch, logits_error, padded_batch, rel, torch_steps
from safetensors.numpy import load_file
from test_moe import MESH, VOCAB, _tiny, per_expert
from tiny_hf import MOE

from jaxsft import hf
from jaxsft.hf import adapter
from jaxsft.model.lora import EXPERT_PARAMETERS, LoRASettings

pytestmark = pytest.mark.slow  # a step compile of a MoE with adapters (~30 s on 2 cores): CI, not the inner loop

LORA = LoRASettings(rank=2, alpha=8.0, targets=("q_proj", "v_proj"), parameters=EXPERT_PARAMETERS)


def test_expert_lora_matches_peft_and_exports_what_peft_loads(tmp_path_factory, tmp_path):
    """Loss (with the router loss) and pre-clip gradient norm ≤ 1e-6 relative at both steps, every
    adapter entry within tests/modes.py's adam_close; the trained adapter in PEFT gives jaxsft's
    logits (≤ 1e-5 relative); the merged export equals PEFT's merge (≤ 8 eps of max|W| per
    tensor), the experts and q/v changed, every other weight bit-identical to the base."""
    model_dir = _tiny(tmp_path_factory, "tiny_qwen3_moe", MOE)
    run = Run(model_dir, MESH, lora=LORA)
    initial = hf.Export(run.config, LORA).write_adapter(run.state["params"], tmp_path / "initial",
                                                        base_model_name_or_path="base")
    pm = peft.PeftModel.from_pretrained(load_torch(model_dir), str(initial), is_trainable=True)
    torch_params = {n.replace(".default", ""): p for n, p in pm.named_parameters() if "lora_" in n}
    ours = dict(adapter.adapter_tensors(run.state["params"], run.config, LORA))
    assert set(torch_params) == set(ours) and len(ours) == 2 * 3 * 4  # (A, B) × 3 layers × (q, v, gate_up, down)
    assert any(".mlp.experts.base_layer.lora_A." in n for n in ours)  # PEFT's nesting: gate_up inside down

    weight = MOE["router_aux_loss_coef"]

    def forward(flat):
        out = pm(input_ids=flat["input_ids"], attention_mask=flat["segment_ids"], position_ids=flat["positions"],
                 output_router_logits=True)
        return out.logits, weight * out.aux_loss

    batches = [padded_batch(s, 1, 4, 16, VOCAB) for s in (1, 2)]  # one micro-batch: transformers' aux loss is per pass
    ref = torch_steps(forward, torch_params, batches, [float(run.schedule(0)), float(run.schedule(1))])
    for i, batch in enumerate(batches):
        m = run(batch)
        t_loss, t_norm, _, t_params = ref[i]
        total = m["loss"] + weight * m["router_aux_loss"]
        # end to end vs torch/PEFT: not derivable (op orders through the layers); 8 eps as tests/test_train_step.py
        assert rel(total, t_loss) <= 1e-6 and rel(m["grad_norm"], t_norm) <= 1e-6, (i, m, t_loss, t_norm)
        ours = dict(adapter.adapter_tensors(run.state["params"], run.config, LORA))
        worst = [adam_close(np.asarray(jax.device_get(ours[n])), t_params[n], [r[2][n] for r in ref[:i + 1]], LR)
                 for n in torch_params]
        expert_grads = [np.abs(ref[i][2][n]).max() for n in torch_params if ".mlp.experts" in n and "lora_A" in n]
        assert min(expert_grads) > 0 or i == 0  # B = 0 at step 1: A's gradient is 0 there, not after
        print(f"step {i + 1}: loss rel {rel(total, t_loss):.1e}, norm rel {rel(m['grad_norm'], t_norm):.1e}, "
              f"worst adapter entry {max(w[0] for w in worst):.1e} lr (conditioned {max(w[1] for w in worst):.1e} lr)")

    # the trained adapter onto a fresh base, and the merged export
    trained = hf.Export(run.config, LORA).write_adapter(run.state["params"], tmp_path / "trained",
                                                        base_model_name_or_path="base")
    pm = peft.PeftModel.from_pretrained(load_torch(model_dir), str(trained)).eval()
    assert logits_error(run, pm, padded_batch(7, 1, 4, 16, VOCAB)) <= 1e-5  # jax vs torch: as tests/test_moe.py
    unloaded = per_expert({n: p.detach().numpy() for n, p in pm.merge_and_unload().state_dict().items()})
    merged, base = run.hf_params(lora=LORA), load_file(model_dir / "model.safetensors")
    assert set(merged) == set(unloaded) == set(base)
    changed = 0
    for name, w in merged.items():
        if ".mlp.experts." in name or any(f".{t}." in name for t in LORA.targets):
            changed += 1
            # W + α/r·A·B, a rank-2 product and one addition in other orders: ≤ 8 eps of max|W|
            assert rel(w, unloaded[name]) <= 8 * np.finfo(np.float32).eps and not np.array_equal(w, base[name]), name
        else:
            assert np.array_equal(w, base[name]), name
    assert changed == 3 * (2 + 3 * MOE["num_experts"])  # per layer q, v and each expert's gate, up, down
