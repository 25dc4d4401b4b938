"""Qwen3-MoE (jaxsft.model.moe) against transformers' Qwen3MoeForCausalLM, in process on 8 CPU
devices (FSDP): logits; one full training step with the router's load-balancing loss on (config.json's
weight) and off (model.router_aux_loss_coef 0) against torch AdamW, with the router metrics; the
export loaded by transformers as Qwen3MoeForCausalLM with the same logits. tests/tiny_hf.py's MOE:
6 experts, top-2 renormalised, 3 sparse layers, hidden 24.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers
from modes import Run, adam_close, load_torch, logits_error, model_settings, padded_batch, rel, torch_steps
from tiny_hf import MOE, make_tiny_hf_model

from jaxsft import bundled, hf
from jaxsft.model import moe
from jaxsft.model.config import ModelConfig, UnsupportedConfigError

VOCAB, MESH = 128, (4, 2)
INNER = MOE["moe_intermediate_size"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_tiny_hf_model(tmp_path_factory.mktemp("moe"), seed=7, name="tiny_qwen3_moe",
                              **dict(MOE, vocab_size=VOCAB))
    hf.open_tokenizer(bundled.path("tokenizer")).save_pretrained(path)  # for the export
    return path


def per_expert(tensors: dict) -> dict:
    """transformers 5's fused expert tensors (gate_up_proj [E, 2I, H], down_proj [E, H, I]) under
    the per-expert names of the checkpoints (and of jaxsft's export)."""
    out = {}
    for name, a in tensors.items():
        base = name.rsplit(".", 1)[0]
        if name.endswith("mlp.experts.gate_up_proj"):
            for e in range(a.shape[0]):
                out[f"{base}.{e}.gate_proj.weight"], out[f"{base}.{e}.up_proj.weight"] = a[e, :INNER], a[e, INNER:]
        elif name.endswith("mlp.experts.down_proj"):
            for e in range(a.shape[0]):
                out[f"{base}.{e}.down_proj.weight"] = a[e]
        else:
            out[name] = a
    return out


def test_logits_match_transformers(model_dir):
    run = Run(model_dir, MESH)
    err = logits_error(run, load_torch(model_dir).eval(), padded_batch(0, 1, 4, 16, VOCAB))
    print(f"\nqwen3_moe logits: max rel {err:.2e}")
    # not derivable: jax vs torch op orders (as tests/test_model_parity.py's bound, 84 eps) through 3 layers;
    # the routing itself is equal (routers ~ N(0, 1): no near-tie for rounding to flip)
    assert err <= 1e-5


@pytest.mark.parametrize("coef", [None, 0.0], ids=["router_loss_on", "router_loss_off"])
def test_step_matches_torch_and_exports(model_dir, coef, tmp_path):
    batch = padded_batch(1, 1, 4, 16, VOCAB)  # one micro-batch: transformers' aux loss is per forward pass
    run = Run(model_dir, MESH, ms=model_settings(router_aux_loss_coef=coef))
    weight = MOE["router_aux_loss_coef"] if coef is None else coef
    model, seen = load_torch(model_dir), []

    def forward(flat):
        out = model(input_ids=flat["input_ids"], attention_mask=flat["segment_ids"], position_ids=flat["positions"],
                    output_router_logits=True)
        seen.append(out)
        return out.logits, weight * out.aux_loss

    params = dict(model.named_parameters())
    (t_loss, t_norm, t_grads, t_params), = torch_steps(forward, params, [batch], [float(run.schedule(0))])
    m = run(batch)

    # the router metrics: the load-balancing loss (padding excluded) and the worst layer's load max/mean
    assert rel(m["router_aux_loss"], seen[0].aux_loss.item()) <= 1e-6  # float32 sums of ≤ 192 terms: ≤ 8 eps
    real = torch.from_numpy(batch["segment_ids"][0].reshape(-1) > 0)
    loads = []
    for logits in seen[0].router_logits:
        chosen = torch.topk(logits.softmax(-1), MOE["num_experts_per_tok"], dim=-1).indices[real]
        counts = torch.bincount(chosen.reshape(-1), minlength=MOE["num_experts"]).double()
        loads.append(float(counts.max() / counts.mean()))
    assert m["expert_load_max_mean"] == pytest.approx(max(loads), rel=1e-6)  # integer counts: one rounding
    assert max(loads) > 1.0  # the test's routing is uneven, so the metric can show it

    # end to end vs torch: not derivable (op orders through the layers); 8 eps as tests/test_train_step.py
    total = m["loss"] + weight * m["router_aux_loss"]
    assert rel(total, t_loss) <= 1e-6 and rel(m["grad_norm"], t_norm) <= 1e-6, (m, t_loss, t_norm)
    ours, theirs, grads = run.hf_params(), per_expert(t_params), per_expert(t_grads)
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    worst = max(adam_close(ours[n], theirs[n], [grads[n]])[0] for n in theirs)
    router_grad = max(float(np.abs(g).max()) for n, g in grads.items() if n.endswith("mlp.gate.weight"))
    print(f"\nqwen3_moe step (coef {weight}): loss rel {rel(total, t_loss):.1e}, norm rel "
          f"{rel(m['grad_norm'], t_norm):.1e}, worst entry {worst:.1e} lr, router |grad| {router_grad:.1e}")
    if coef is not None:
        return
    # the export: transformers loads it as Qwen3MoeForCausalLM, every tensor found, and computes jaxsft's logits
    out = hf.write_hf_directory(hf.export_tensors(run.state["params"], run.config), tmp_path / "export",
                                base_model_dir=model_dir, dtype="float32")
    exported, info = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                                       dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(exported) is transformers.Qwen3MoeForCausalLM
    assert logits_error(run, exported.eval(), padded_batch(2, 1, 4, 16, VOCAB)) <= 1e-5  # the bound above


def test_experts_run_sparse():
    """The experts are three grouped matmuls over the N·k assignments (no dense pass over all E)."""
    x, kernel = jax.random.normal(jax.random.key(0), (10, 24)), jax.random.normal(jax.random.key(1), (24, 6))
    w = [jax.random.normal(jax.random.key(2 + i), s) for i, s in enumerate([(6, 24, 20)] * 2 + [(6, 20, 24)])]

    def layer(x):
        _, chosen, weights = moe.route(x, kernel, 2, True)
        return moe.grouped_experts(x, chosen, weights, *w, jax.nn.silu)

    eqns = jax.make_jaxpr(layer)(x).jaxpr.eqns
    assert [e.primitive.name for e in eqns].count("ragged_dot_general") == 3
    assert all(e.outvars[0].aval.shape[0] == 20 for e in eqns if e.primitive.name == "ragged_dot_general")
    # and equal to the dense reference: every token through its 2 experts, weighted
    _, chosen, weights = moe.route(x, kernel, 2, True)
    gate, up, down = w
    dense = jnp_dense(x, chosen, weights, gate, up, down)
    np.testing.assert_allclose(layer(x), dense, rtol=1e-5, atol=1e-5)  # float32, two op orders of ≤ 24 terms


def jnp_dense(x, chosen, weights, gate, up, down):
    out = np.zeros(x.shape, np.float32)
    for t in range(x.shape[0]):
        for j in range(chosen.shape[1]):
            e = int(chosen[t, j])
            h = jax.nn.silu(x[t] @ gate[e]) * (x[t] @ up[e])
            out[t] += float(weights[t, j]) * np.asarray(h @ down[e])
    return out


def test_mixed_dense_and_sparse_layers_are_refused():
    d = dict(MOE, vocab_size=VOCAB, max_position_embeddings=64, mlp_only_layers=[1])
    with pytest.raises(UnsupportedConfigError, match=r"layers \[1\] dense MLPs"):
        ModelConfig.from_hf_dict(d)
    c = ModelConfig.from_hf_dict(dict(d, mlp_only_layers=[]))
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.norm_topk_prob) == (6, 2, 20, True)


def test_flops_count_active_parameters():
    """MFU's FLOPs per token for Qwen3-30B-A3B are 6 × the matmul parameters a token runs: every
    weight of the abstract model but the embedding table and norms, with k of E experts (+ the router)."""
    from bench.throughput import SHAPES
    from flax import nnx

    from jaxsft import metrics
    from jaxsft.model.decoder import CausalLM, ModelSettings

    shape = dict(SHAPES["qwen3-30b-a3b"])
    config = ModelConfig.from_hf_dict(shape)
    model = nnx.eval_shape(lambda: CausalLM(config, ModelSettings(attn_implementation="xla"), rngs=nnx.Rngs(0)))
    sizes = {"/".join(map(str, p)): v.size for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    experts = sum(n for p, n in sizes.items() if "/experts/" in p)
    matmuls = sum(n for p, n in sizes.items() if p.endswith(("kernel", "_proj")))
    active = matmuls - experts * (1 - config.num_experts_per_tok / config.num_experts)
    assert 3.0e9 < active < 3.1e9 and 30e9 < sum(sizes.values()) < 31e9  # "30.5B total, 3.3B active" with embeddings
    assert metrics.matmul_flops_per_token(config) == pytest.approx(6 * active, rel=1e-12)
    assert metrics.matmul_flops_per_token(shape) == metrics.matmul_flops_per_token(config)  # config.json's dict too
