"""Qwen3-MoE (jaxsft.model.moe) against transformers' Qwen3MoeForCausalLM, in process on a (4, 2)
mesh of 8 CPU devices (FSDP): logits; one full training step with the router's load-balancing loss
on (config.json's weight) and, in the slow tier, off (model.router_aux_loss_coef 0) against torch
AdamW, with the router metrics; the export, loaded by transformers as Qwen3MoeForCausalLM with
every tensor equal to jaxsft's. tests/tiny_hf.py's MOE: 6 experts, top-2 renormalised, 3 sparse
layers, hidden 24; its MOE2, Qwen2-MoE (Qwen2MoeForCausalLM): the same with a gated shared expert,
q/k/v biases and top-2 not renormalised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from modes import Run, adam_close, jax_logits, load_torch, logits_error, model_settings, padded_batch, rel, torch_steps
from tiny_hf import MOE, MOE2, make_tiny_hf_model

from jaxsft import bundled, hf
from jaxsft.model import moe
from jaxsft.model.config import ModelConfig

VOCAB, MESH = 128, (4, 2)
INNER = MOE["moe_intermediate_size"]


def _tiny(tmp_path_factory, name, moe_config):
    path = make_tiny_hf_model(tmp_path_factory.mktemp("moe"), seed=7, name=name, **dict(moe_config, vocab_size=VOCAB))
    hf.open_tokenizer(bundled.path("tokenizer")).save_pretrained(path)  # for the export
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _tiny(tmp_path_factory, "tiny_qwen3_moe", MOE)


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


def _step(run, model_dir, coef):
    """One step of `run` (model.router_aux_loss_coef = coef) and of torch AdamW from the same start,
    with transformers' router loss added: (metrics, torch's step, torch's forward output, batch, weight)."""
    batch = padded_batch(1, 1, 4, 16, VOCAB)  # one micro-batch: transformers' aux loss is per forward pass
    weight = MOE["router_aux_loss_coef"] if coef is None else coef
    model, seen = load_torch(model_dir), []

    def forward(flat):
        out = model(input_ids=flat["input_ids"], attention_mask=flat["segment_ids"], position_ids=flat["positions"],
                    output_router_logits=True)
        seen.append(out)
        return out.logits, weight * out.aux_loss

    ref = torch_steps(forward, dict(model.named_parameters()), [batch], [float(run.schedule(0))])[0]
    return run(batch), ref, seen[0], batch, weight


def _check_step(run, m, ref, out, batch, weight):
    t_loss, t_norm, t_grads, t_params = ref
    # the router metrics: the load-balancing loss (padding excluded) and the worst layer's load max/mean
    assert rel(m["router_aux_loss"], out.aux_loss.item()) <= 1e-6  # float32 sums of ≤ 192 terms: ≤ 8 eps
    real = torch.from_numpy(batch["segment_ids"][0].reshape(-1) > 0)
    loads = []
    for logits in out.router_logits:
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
    print(f"\n{run.config.model_type} step (router loss weight {weight}): loss rel {rel(total, t_loss):.1e}, norm rel "
          f"{rel(m['grad_norm'], t_norm):.1e}, worst entry {worst:.1e} lr, router |grad| max {router_grad:.1e}")


@pytest.mark.slow  # over ~5 s on 2 cores: CI's full run, not the ≤ 3-minute inner loop
def test_logits_step_and_export_match_transformers(model_dir, tmp_path):
    """Logits; one step with the router loss at config.json's weight; the export."""
    run = Run(model_dir, MESH)
    err = logits_error(run, load_torch(model_dir).eval(), padded_batch(0, 1, 4, 16, VOCAB))
    print(f"\nqwen3_moe logits: max rel {err:.2e}")
    # not derivable: jax vs torch op orders (as tests/test_model_parity.py's bound, 84 eps) through 3 layers;
    # the routing itself is equal (routers ~ N(0, 1): no near-tie for rounding to flip)
    assert err <= 1e-5
    _check_step(run, *_step(run, model_dir, None))
    _check_export(run, model_dir, tmp_path, transformers.Qwen3MoeForCausalLM)


def _check_export(run, model_dir, tmp_path, cls):
    """transformers loads the export as `cls`, every tensor found, each equal to what jaxsft trained
    (whose logits are transformers' by the caller's check)."""
    out = hf.write_hf_directory(hf.export_tensors(run.state["params"], run.config), tmp_path / "export",
                                base_model_dir=model_dir, dtype="float32")
    exported, info = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                                       dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(exported) is cls
    loaded = per_expert({n: p.detach().numpy() for n, p in exported.named_parameters()})
    trained = run.hf_params()
    assert set(loaded) == set(trained) and all(np.array_equal(loaded[n], trained[n]) for n in trained)


@pytest.mark.slow  # a step compile (~30 s on 2 cores)
def test_qwen2_moe_with_its_shared_expert_matches_transformers(tmp_path_factory, tmp_path):
    """Qwen2-MoE: logits, one step with the router loss (torch AdamW) and the export, as for
    qwen3_moe; the shared expert and its sigmoid gate are trained (their gradients are compared
    with torch's, entry by entry, in `_check_step`). The step runs the modes qwen3_moe's tests do
    not: model.remat_policy=minimal (the experts' projections saved, in their block layout; the
    router's top-k, sort and block layout recomputed in the backward pass, as under every policy
    but none) and the optimizer state offloaded to host memory (the moments in pinned_host)."""
    model_dir = _tiny(tmp_path_factory, "tiny_qwen2_moe", MOE2)
    run = Run(model_dir, MESH, ms=model_settings(remat_policy="minimal"), offload=True)
    kinds = {leaf.sharding.memory_kind for leaf in jax.tree.leaves(run.state["opt_state"]) if leaf.ndim}
    assert kinds == {"pinned_host"}, kinds
    assert run.config.shared_expert_intermediate_size == 28 and run.config.qkv_bias and not run.config.o_bias
    err = logits_error(run, load_torch(model_dir).eval(), padded_batch(0, 1, 4, 16, VOCAB))
    print(f"\nqwen2_moe logits: max rel {err:.2e}")
    assert err <= 1e-5  # as qwen3_moe's
    _check_step(run, *_step(run, model_dir, None))
    _check_export(run, model_dir, tmp_path, transformers.Qwen2MoeForCausalLM)


@pytest.mark.slow  # a second step compile (~30 s on 2 cores) for the router loss switched off
def test_step_without_router_loss(model_dir):
    run = Run(model_dir, MESH, ms=model_settings(router_aux_loss_coef=0.0))
    _check_step(run, *_step(run, model_dir, 0.0))


def test_experts_run_sparse():
    """The experts are three grouped matmuls over the N·k assignments (no dense pass over all E),
    ragged_dot or blocks, each equal to the dense reference."""
    x, kernel = jax.random.normal(jax.random.key(0), (10, 24)), jax.random.normal(jax.random.key(1), (24, 6))
    w = [jax.random.normal(jax.random.key(2 + i), s) for i, s in enumerate([(6, 24, 20)] * 2 + [(6, 20, 24)])]

    def layer(x, how):
        _, chosen, weights = moe.route(x, kernel, 2, True)
        return moe.grouped_experts(x, chosen, weights, *w, jax.nn.silu, how), chosen, weights

    eqns = jax.make_jaxpr(lambda x: layer(x, "ragged_dot"))(x).jaxpr.eqns
    assert [e.primitive.name for e in eqns].count("ragged_dot_general") == 3
    assert all(e.outvars[0].aval.shape[0] == 20 for e in eqns if e.primitive.name == "ragged_dot_general")
    # and equal to the dense reference: every token through its 2 experts, weighted
    both = jax.jit(lambda x: [layer(x, how) for how in ("ragged_dot", "blocks")])(x)
    for ours, chosen, weights in both:
        ours, chosen, weights, x64 = (np.asarray(a, np.float64) for a in (ours, chosen, weights, x))
        gate, up, down = (np.asarray(a, np.float64) for a in w)
        dense = np.zeros(x64.shape)
        for t, j in np.ndindex(chosen.shape):
            e = int(chosen[t, j])
            g = x64[t] @ gate[e]
            dense[t] += weights[t, j] * ((g / (1 + np.exp(-g))) * (x64[t] @ up[e])) @ down[e]
        # float32 against float64: three chained dots of ≤ 24 terms, each ≤ 24 eps of its operands' scale
        assert np.max(np.abs(ours - dense)) <= 1e-5 * np.max(np.abs(dense))


def test_blocks_matmul_equals_ragged_dot(monkeypatch):
    """model.expert_matmul=blocks (jaxsft.model.grouped_matmul): the values and gradients of
    ragged_dot, with empty groups, groups of several blocks and of partial ones, and rows past the
    groups (output 0)."""
    from jaxsft.model import grouped_matmul as gm

    monkeypatch.setattr(gm, "BLOCK", 4)
    x, w = jax.random.normal(jax.random.key(0), (50, 6)), jax.random.normal(jax.random.key(1), (7, 6, 5))
    sizes = jnp.array([3, 0, 10, 1, 20, 0, 9], jnp.int32)  # 43 of 50 rows
    both = jax.jit(lambda x, w: [jax.value_and_grad(lambda x, w, how=how: jnp.sum(jnp.sin(
        gm.grouped_matmul(x, w, sizes, how))), argnums=(0, 1))(x, w) for how in ("ragged_dot", "blocks")])
    (a, (ga_x, ga_w)), (b, (gb_x, gb_w)) = both(x, w)
    assert not np.asarray(gm.grouped_matmul(x, w, sizes, "blocks")[43:]).any()
    # the same 6-term dot products; dW sums ≤ 20 rows per group in blocks: float32, ≤ 20 eps of Σ|terms|
    assert rel(b, a) <= 1e-6 and rel(gb_x, ga_x) <= 1e-6 and rel(gb_w, ga_w) <= 2e-6


def test_router_loss_key():
    from cfg import settings

    from jaxsft import config

    assert settings().model.router_aux_loss_coef is None  # config.json's weight
    assert settings({"model.router_aux_loss_coef": 0}).model.router_aux_loss_coef == 0
    with pytest.raises(config.ConfigError, match=r"model.router_aux_loss_coef=-0.5 must be >= 0"):
        settings({"model.router_aux_loss_coef": -0.5})
    ep = settings({"model.expert_layout": "expert", "model.expert_capacity_factor": 1.25}).model
    assert (ep.expert_layout, ep.expert_capacity_factor, ep.expert_matmul) == ("expert", 1.25, "blocks")
    with pytest.raises(config.ConfigError, match=r"^model.expert_capacity_factor=1.25: give a number > 0, with model.ex"):
        settings({"model.expert_capacity_factor": 1.25})  # the fsdp layout drops nothing


def test_target_parameters_key():
    """model.target_parameters: PEFT's names of the experts' weights, refused in one line when unknown, with
    LoRA dropout (PEFT's ParamWrapper has none), or on a model without experts."""
    from cfg import settings

    from jaxsft import config
    from jaxsft.errors import ConfigError
    from jaxsft.model.decoder import check_lora_targets
    from jaxsft.model.lora import EXPERT_PARAMETERS

    lora = {"model.lora_rank": 4, "model.target_modules": ["q_proj"]}
    s = settings({**lora, "model.target_parameters": ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]}).model
    assert s.lora.parameters == EXPERT_PARAMETERS and s.lora.targets == ("q_proj",)
    with pytest.raises(config.ConfigError, match=r"^model.target_parameters=\['mlp.experts.up_proj'\]: \['mlp.experts.up_pr"):
        settings({**lora, "model.target_parameters": ["mlp.experts.up_proj"]})
    with pytest.raises(config.ConfigError, match=r"^model.lora_dropout=0.1 with model.target_parameters: PEFT's"):
        settings({**lora, "model.lora_dropout": 0.1, "model.target_parameters": ["mlp.experts.down_proj"]})
    dense = ModelConfig.from_hf_dict(dict(MOE, vocab_size=VOCAB, model_type="qwen3", num_experts=0))
    with pytest.raises(ConfigError, match=r"^model.target_parameters=\['mlp.experts.down_proj'\]: these are the routed"):
        check_lora_targets(dense, settings({**lora, "model.target_parameters": ["mlp.experts.down_proj"]}).model)
    sparse = ModelConfig.from_hf_dict(dict(MOE, vocab_size=VOCAB))
    with pytest.raises(ConfigError, match=r"LoRA on a qwen3_moe model's experts is model.target_parameters"):
        check_lora_targets(sparse, settings({"model.lora_rank": 4}).model)  # all-linear names the MLP


def test_qwen2_moe_config():
    """Qwen2MoeConfig's keys: qkv_bias (default true) gives q/k/v biases and never o_proj's; the
    shared expert's width; the router not renormalised by default."""
    c = ModelConfig.from_hf_dict(dict(MOE2, vocab_size=VOCAB, norm_topk_prob=None))
    assert (c.qkv_bias, c.o_bias, c.qk_norm, c.shared_expert_intermediate_size, c.norm_topk_prob) == (
        True, False, False, 28, False)
    c = ModelConfig.from_hf_dict(dict(MOE2, vocab_size=VOCAB, qkv_bias=False, attention_bias=True))
    assert (c.qkv_bias, c.o_bias) == (False, False)
    q3 = ModelConfig.from_hf_dict(dict(MOE, vocab_size=VOCAB, shared_expert_intermediate_size=28))
    assert q3.shared_expert_intermediate_size == 0  # qwen3_moe has no shared expert, whatever the file says


def test_dense_and_sparse_layers_mixed_config():
    """transformers' rule: layer i is sparse unless i is in mlp_only_layers or (i + 1) % decoder_sparse_step;
    the dense ones are stacked apart (ModelConfig.layer_slots) and FLOPs count their dense MLPs."""
    from jaxsft import metrics

    d = dict(MOE, vocab_size=VOCAB, max_position_embeddings=64, num_hidden_layers=4, mlp_only_layers=[2])
    c = ModelConfig.from_hf_dict(d)
    assert c.dense_layers == (2,) and c.layer_slots() == (("layers", 0), ("layers", 1), ("dense_layers", 0),
                                                          ("layers", 2))
    s = ModelConfig.from_hf_dict(dict(d, mlp_only_layers=[], decoder_sparse_step=2))
    assert s.dense_layers == (0, 2) and [slot[0] for slot in s.layer_slots()] == ["dense_layers", "layers"] * 2
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.norm_topk_prob) == (6, 2, 20, True)
    h, inner, sparse_inner = d["hidden_size"], d["intermediate_size"], d["moe_intermediate_size"]
    dense_mlp, sparse_mlp = 3 * h * inner, 3 * h * sparse_inner * 2 + h * 6
    assert metrics.matmul_flops_per_token(c) - metrics.matmul_flops_per_token(s) == 6 * (sparse_mlp - dense_mlp)
    assert metrics.matmul_flops_per_token(d) == metrics.matmul_flops_per_token(c)  # config.json's dict too
    assert ModelConfig.from_hf_dict(dict(d, mlp_only_layers=[0, 1, 2, 3])).num_experts == 0  # all dense: dense

    # the in-backward gradient sum serves one stack of layers: the step leaves it off here (the decoder
    # would refuse the sink), so a step with 2 micro-batches and remat full traces
    from flax import nnx

    from jaxsft import step
    from jaxsft.model.decoder import CausalLM

    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: CausalLM(c, model_settings(), rngs=nnx.Rngs(0))),
                                       nnx.Param, ...)
    cfg = step.StepConfig("global_tokens", False, 1, 16, accumulate_in_backward=True)
    out = jax.eval_shape(lambda p, b: step.accumulate_gradients(graphdef, rest, p, b, cfg), params,
                         padded_batch(0, 2, 2, 16, VOCAB))
    assert jax.tree.structure(out[1]) == jax.tree.structure(params)


@pytest.mark.slow  # a step compile (~30 s on 2 cores)
def test_dense_and_sparse_layers_mixed_match_transformers(tmp_path_factory, tmp_path):
    """4 layers, layer 2 dense (mlp_only_layers): logits, one step with the router loss (over the
    3 sparse layers, as transformers') against torch AdamW, and the export; and the same logits
    with the layers unrolled (scan_layers false) instead of scanned run by run."""
    model_dir = _tiny(tmp_path_factory, "tiny_qwen3_moe_mixed", dict(MOE, num_hidden_layers=4, mlp_only_layers=[2]))
    run = Run(model_dir, MESH)
    assert run.config.dense_layers == (2,)
    batch = padded_batch(0, 1, 4, 16, VOCAB)
    err = logits_error(run, load_torch(model_dir).eval(), batch)
    print(f"\nmixed qwen3_moe logits: max rel {err:.2e}")
    assert err <= 1e-5  # as qwen3_moe's
    unrolled = Run(model_dir, MESH, ms=model_settings(scan_layers=False))
    # the same layer functions, compiled in another program: float32, the parity bound
    assert rel(jax_logits(unrolled, batch), jax_logits(run, batch)) <= 1e-5
    _check_step(run, *_step(run, model_dir, None))
    _check_export(run, model_dir, tmp_path, transformers.Qwen3MoeForCausalLM)


@pytest.mark.parametrize("name, total, active", [("qwen3-30b-a3b", (30e9, 31e9), (3.0e9, 3.1e9)),
                                                  ("qwen1.5-moe-a2.7b", (14.2e9, 14.4e9), (2.3e9, 2.4e9))])
def test_flops_count_active_parameters(name, total, active):
    """MFU's FLOPs per token for Qwen3-30B-A3B and Qwen1.5-MoE-A2.7B are 6 × the matmul parameters a
    token runs: every weight of the abstract model but the embedding table and norms, with k of E
    experts (+ the router; + Qwen1.5's shared expert and its gate)."""
    from bench.throughput import SHAPES
    from flax import nnx

    from jaxsft import metrics
    from jaxsft.model.decoder import CausalLM, ModelSettings

    shape = dict(SHAPES[name])
    config = ModelConfig.from_hf_dict(shape)
    model = nnx.eval_shape(lambda: CausalLM(config, ModelSettings(attn_implementation="xla"), rngs=nnx.Rngs(0)))
    sizes = {"/".join(map(str, p)): v.size for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    experts = sum(n for p, n in sizes.items() if "/experts/" in p)
    matmuls = sum(n for p, n in sizes.items() if p.endswith(("kernel", "_proj")))
    active_matmuls = matmuls - experts * (1 - config.num_experts_per_tok / config.num_experts)
    # "30.5B total, 3.3B active" and "14.3B total, 2.7B active", embeddings included (in the total here)
    assert active[0] < active_matmuls < active[1] and total[0] < sum(sizes.values()) < total[1]
    active = active_matmuls
    assert metrics.matmul_flops_per_token(config) == pytest.approx(6 * active, rel=1e-12)
    assert metrics.matmul_flops_per_token(shape) == metrics.matmul_flops_per_token(config)  # config.json's dict too


@pytest.mark.slow  # two step compiles (~20 s on 2 cores)
def test_micro_batches_with_in_backward_accumulation(model_dir):
    """K = 2 micro-batches: the in-place layer-gradient sum (jaxsft.model.sink_scan, carrying the
    router statistics) equals autodiff + add, and the router loss is the mean of the micro-batches'."""
    from flax import nnx

    from jaxsft import parallel, step

    mesh = parallel.make_mesh(*MESH)
    batch = padded_batch(4, 2, 4, 16, VOCAB)
    with jax.set_mesh(mesh):
        model = hf.load_model(model_dir, mesh, model_settings())
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        b = {k: jax.device_put(v, parallel.batch_sharding(mesh)) for k, v in batch.items()}
        out = {sink: jax.jit(lambda p, b, sink=sink: step.accumulate_gradients(graphdef, rest, p, b, step.StepConfig(
            "global_tokens", False, MESH[0], 16, accumulate_in_backward=sink)))(params, b) for sink in (False, True)}
        single = jax.jit(lambda p, mb: step.micro_batch_terms(graphdef, p, rest, mb, 16).router)
        per_micro = [single(params, {k: v[i] for k, v in b.items()}) for i in range(2)]
    (la, ga, _, ra), (lb, gb, _, rb) = out[False], out[True]
    assert float(la) == pytest.approx(float(lb), rel=1e-6)  # the same two partial losses summed: ≤ 8 eps
    for a, g in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):  # float32 sums in another order
        assert np.max(np.abs(np.asarray(a) - np.asarray(g))) <= 1e-6 * np.max(np.abs(np.asarray(a))) + 1e-12
    mean = (float(per_micro[0]["router_aux_loss"]) + float(per_micro[1]["router_aux_loss"])) / 2
    worst = max(float(m["expert_load_max_mean"]) for m in per_micro)
    for r in (ra, rb):
        assert float(r["router_aux_loss"]) == pytest.approx(mean, rel=1e-6)
        assert float(r["expert_load_max_mean"]) == worst


def gradients(model_dir, mesh_shape, batch, ms=None):
    """(loss, router metrics, {HF name: gradient}) of one global batch through the step's accumulation."""
    from flax import nnx

    from jaxsft import parallel, step

    mesh = parallel.make_mesh(*mesh_shape)
    with jax.set_mesh(mesh):
        graphdef, params, rest = nnx.split(hf.load_model(model_dir, mesh, ms or model_settings()), nnx.Param, ...)
        b = {k: jax.device_put(v, parallel.batch_sharding(mesh)) for k, v in batch.items()}
        cfg = step.StepConfig("global_tokens", False, mesh_shape[0], 16)
        loss, grads, _, router = jax.jit(lambda p, b: step.accumulate_gradients(graphdef, rest, p, b, cfg))(params, b)
    config = hf.read_config(model_dir)
    return float(loss), {k: float(v) for k, v in router.items()}, {
        n: np.asarray(jax.device_get(a)) for n, a in hf.export_tensors(grads, config)}


def packed(padded):
    """The samples of `padded` [1, R, T], two per row of [1, R/2, 2T]."""
    rows, t = padded["input_ids"].shape[1:]
    out = {k: np.zeros((1, rows // 2, 2 * t), np.int32) for k in padded}
    for r in range(rows):
        n = int(padded["segment_ids"][0, r].sum())
        row, off = r // 2, (r % 2) * t
        for k in ("input_ids", "positions", "loss_mask"):
            out[k][0, row, off:off + n] = padded[k][0, r, :n]
        out["segment_ids"][0, row, off:off + n] = 1 + r % 2
    return out


@pytest.mark.slow  # three gradient compiles (~30 s on 2 cores)
def test_packing_and_ulysses_give_the_same_loss_and_gradients(model_dir):
    """16 samples padded on dp = 8, packed two a row on dp = 8, and padded on dp = 4 × sp = 2: the
    same loss, router loss, load metric and gradients (router loss at config.json's weight)."""
    batch = padded_batch(9, 1, 16, 16, VOCAB)
    ref_loss, ref_router, ref = gradients(model_dir, (8, 1), batch)
    for mesh_shape, b in (((8, 1), packed(batch)), ((4, 2), batch)):
        loss, router, grads = gradients(model_dir, mesh_shape, b)
        # the same per-token terms summed in another order (rows, shards): float32, ≤ 16 partial sums: 8 eps
        assert rel(loss, ref_loss) <= 1e-6 and rel(router["router_aux_loss"], ref_router["router_aux_loss"]) <= 1e-6
        assert router["expert_load_max_mean"] == ref_router["expert_load_max_mean"]  # integer counts: the same routing
        worst = max(rel(grads[n], ref[n]) for n in ref)
        # an expert's gradient entry sums ≤ 512 token terms, taken in another order (rows, packing, shards):
        # γ_512 ≈ 3e-5 of Σ|terms| in the worst case; 1e-5 of max|g| (measured ≤ 1.9e-6)
        assert worst <= 1e-5, (mesh_shape, worst)
        print(f"\n{mesh_shape} {'packed' if b is not batch else 'padded'}: loss rel {rel(loss, ref_loss):.1e}, "
              f"gradients rel {worst:.1e}")


@pytest.fixture(scope="module")
def model_dir16(tmp_path_factory):
    """The tiny MoE with 16 experts: two whole experts per device of the 8."""
    return make_tiny_hf_model(tmp_path_factory.mktemp("moe16"), seed=8, name="tiny_qwen3_moe16",
                              **dict(MOE, vocab_size=VOCAB, num_experts=16))


@pytest.mark.slow  # three gradient compiles (~30 s on 2 cores)
def test_expert_parallel_layout_equals_fsdp(model_dir16):
    """model.expert_layout=expert (each device holds 2 of the 16 experts, tokens exchanged by
    all-to-all, none dropped) gives the fsdp layout's loss, router metrics and gradients on a
    (4, 2) mesh; with a capacity factor of 0.5 assignments are dropped and counted."""
    batch = padded_batch(4, 2, 8, 16, VOCAB)
    loss, router, ref = gradients(model_dir16, MESH, batch, model_settings(expert_layout="fsdp"))
    ep_loss, ep_router, grads = gradients(model_dir16, MESH, batch, model_settings(expert_layout="expert"))
    # the same per-token products; a weight's gradient sums its ≤ 256 token terms in another order (peers):
    # γ_256 ≈ 1.5e-5 of Σ|terms| in the worst case; 1e-5 of max|g|
    assert rel(ep_loss, loss) <= 1e-6 and router["expert_dropped"] == ep_router["expert_dropped"] == 0
    assert ep_router["expert_load_max_mean"] == router["expert_load_max_mean"]
    worst = max(rel(grads[n], ref[n]) for n in ref)
    assert worst <= 1e-5, worst
    print(f"\nexpert layout vs fsdp: loss rel {rel(ep_loss, loss):.1e}, gradients rel {worst:.1e}")
    cut_loss, cut, _ = gradients(model_dir16, MESH, batch, model_settings(expert_layout="expert",
                                                                       expert_capacity_factor=0.5))
    # per device and micro-batch 16 tokens × 2 = 32 assignments, 2 slots for each of 8 peers: at most 16 kept
    # of 32, on each of 8 devices, 3 layers, 2 micro-batches; only real tokens' assignments are counted
    real = int((batch["segment_ids"] > 0).sum()) * 2 * 3
    assert max(1, real - 8 * 3 * 2 * 16) <= cut["expert_dropped"] <= real and cut_loss != ep_loss


def test_capacity_drops_count_real_tokens_only():
    """train/expert_dropped counts the assignments of real tokens: on a (4, 2) mesh every token
    chooses expert 0 (device 0), whose capacity (factor 2) is 1 slot per peer, so each device keeps
    its first token and drops the other 3, of which 2 are padding: 8 dropped, not 24."""
    from jaxsft import parallel
    from jaxsft.model import moe_parallel

    b, t, h, e = 4, 8, 4, 8
    x = jax.random.normal(jax.random.key(0), (b, t, h))
    chosen, weights = jnp.zeros((b, t, 1), jnp.int32), jnp.ones((b, t, 1))
    w = [jax.random.normal(jax.random.key(1 + i), s) for i, s in enumerate([(e, h, 6)] * 2 + [(e, 6, h)])]
    real = (jnp.arange(t) % 4 < 2)[None].repeat(b, 0)  # per device (a row, 4 tokens): 2 real, 2 padding
    with jax.set_mesh(parallel.make_mesh(4, 2)):
        y, dropped = jax.jit(lambda x, real: moe_parallel.experts(x, chosen, weights, *w, jax.nn.silu, "expert", 2.0,
                                                                  real=real))(x, real)
    assert float(dropped) == 8
    kept = np.arange(t) % 4 == 0  # each device's first token
    assert np.all(np.abs(np.asarray(y)[:, kept]) > 0) and not np.asarray(y)[:, ~kept].any()


def test_expert_layout_refuses_experts_that_do_not_divide():
    from jaxsft import devices, parallel
    from jaxsft.errors import ConfigError

    config = ModelConfig.from_hf_dict(dict(MOE, vocab_size=VOCAB, max_position_embeddings=64))
    devices.check_heads(config, parallel.make_mesh(2, 1), "expert")  # 6 experts over 2 devices: 3 each
    with pytest.raises(ConfigError, match=r"^model.expert_layout=expert: num_experts=6 does not divide over the 8 "):
        devices.check_heads(config, parallel.make_mesh(*MESH), "expert")
