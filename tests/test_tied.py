"""Tied word embeddings (`tie_word_embeddings: true`, as Qwen2.5-0.5B, 1.5B and 3B) on every path a
tied model takes, in float32 and bfloat16 compute, on the CPU.

Tied, the LM head is the embedding table E [V, H]: logits = h·Eᵀ and E's gradient is the gather's
plus the head's. References: the same model untied with lm_head.weight = E (its two gradients summed
are the tied gradient, computed by the same bf16 products), and transformers' tied model (float32)
through tests/modes.py. Other tied paths tested elsewhere: logits vs transformers
(tests/test_model_parity.py `tied_*`), HF loading of tied shards (tests/test_hf_loading.py), export
round trips (tests/test_export.py `tied`), `lm_head.weight` in model.trainable refused
(tests/test_added_tokens.py), tied plans (tests/test_plan.py's TINY is tied).
"""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from cfg import settings
from modes import LR, Run, adam_close, hf_forward, load_torch, model_settings, padded_batch, rel, torch_steps
from safetensors.numpy import load_file, save_file
from tiny_hf import make_tiny_hf_model

from jaxsft import hf, metrics, optim, parallel, step
from jaxsft.model.lora import LoRASettings

pytestmark = pytest.mark.slow  # two-step torch/PEFT comparisons on a tied model in float32 and bfloat16: CI, not the inner loop

VOCAB, H = 256, 64
EPS = float(np.finfo(np.float32).eps)
DTYPES = ["float32", "bfloat16"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(tied model, its untied twin: the same weights and lm_head.weight = E)."""
    root = tmp_path_factory.mktemp("tied")
    tied = make_tiny_hf_model(root, name="tied", vocab_size=VOCAB, tie_word_embeddings=True)
    twin = root / "twin"
    shutil.copytree(tied, twin)
    cfg = json.loads((twin / "config.json").read_text())
    (twin / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    tensors = load_file(twin / "model.safetensors")
    assert "lm_head.weight" not in tensors
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}, twin / "model.safetensors",
              metadata={"format": "pt"})
    return tied, twin


def loss_and_grads(model_dir, ms, batch, in_backward=False):
    """The train step's loss and float32 gradients (K micro-batches of `batch`), on a (4, 2) mesh."""
    mesh = parallel.make_mesh(4, 2)
    tx, _ = optim.make_optimizer(settings().optim, 10, "float32")
    with jax.set_mesh(mesh):
        graphdef, rest, state, _ = step.init_train_state(hf.load_model(model_dir, mesh, ms), tx, mesh)
        cfg = step.StepConfig("global_tokens", False, 4, 16, accumulate_in_backward=in_backward)
        fn = jax.jit(lambda p, b: step.accumulate_gradients(graphdef, rest, p, b, cfg)[:2])
        b = {k: jax.device_put(v, parallel.batch_sharding(mesh)) for k, v in batch.items()}
        loss, grads = fn(state["params"], b)
    return float(loss), flat(grads)


def flat(tree) -> dict[tuple[str, ...], np.ndarray]:
    return {tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)): np.asarray(x)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


VARIANTS = {  # (scan_layers, remat_policy, micro-batches, gradient sink, T): the loss chunk is 16 tokens
    # one chunk (T ≤ trainer.loss_chunk_size, as with verl's defaults): the loss scan vanishes and the
    # head's gradient dot met the transpose of E — the case that crashed
    "one_chunk_scan_full": (True, "full", 1, False, 16),
    "one_chunk_sink": (True, "full", 2, True, 16),
    "two_chunks_loop_minimal": (False, "minimal", 1, False, 24),
}


@pytest.mark.parametrize("compute, variant", [("float32", "one_chunk_scan_full")] + [("bfloat16", v) for v in VARIANTS])
def test_tied_gradients_are_the_untied_twins_summed(dirs, compute, variant):
    """The tied-embedding crash (XLA:CPU, bfloat16 compute over float32 weights, verl's defaults):
    the train step's loss and E's gradient equal the untied twin's loss and embed + lm_head
    gradients summed, for scanned / looped layers, remat policies and the gradient sink."""
    scan, policy, k, sink, t = VARIANTS[variant]
    ms = model_settings(compute_dtype=compute, scan_layers=scan, remat_policy=policy)
    batch = padded_batch(7, k, 8, t, VOCAB)
    tied_loss, tied = loss_and_grads(dirs[0], ms, batch, sink)
    twin_loss, twin = loss_and_grads(dirs[1], ms, batch, sink)
    head = ("lm_head", "kernel")
    assert head not in tied and head in twin
    e = ("embed_tokens", "embedding")
    summed = twin[e] + twin[head].T
    assert np.isfinite(tied_loss) and np.all(np.isfinite(tied[e]))
    # the same products in the same dtype: E's two parts are summed by one float32 addition on either side
    # (≤ ½ ulp each of max|g|); measured 6.5e-8 ≈ 0.55 eps
    tol = 4 * EPS
    assert abs(tied_loss - twin_loss) <= tol * abs(twin_loss), (tied_loss, twin_loss)
    print(f"\n{compute} {variant}: loss {tied_loss:.6f}, E grad rel {rel(tied[e], summed):.1e}")
    assert rel(tied[e], summed) <= tol
    for name in twin:
        if name not in (e, head):
            assert rel(tied[name], twin[name]) <= tol, name


def torch_reference(run, forward, params, batches):
    return torch_steps(forward, params, batches, [float(run.schedule(i)) for i in range(len(batches))])


def check_steps(run, ref, batches, compute):
    """Each step's loss and pre-clip norm against torch's float32 step: ≤ 1e-6 relative in float32
    (tests/test_train_step.py's end-to-end bound); in bfloat16 compute within LOSS_BF16."""
    for i, batch in enumerate(batches):
        m = run(batch)
        t_loss, t_norm = ref[i][:2]
        print(f"{compute} step {i + 1}: loss rel {rel(m['loss'], t_loss):.1e}, norm rel {rel(m['grad_norm'], t_norm):.1e}")
        assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])
        tol = (1e-6, 1e-6) if compute == "float32" else BF16_TOL
        assert rel(m["loss"], t_loss) <= tol[0] and rel(m["grad_norm"], t_norm) <= tol[1], (i, m, t_loss, t_norm)


# not derivable: bfloat16 rounds every activation of 2 layers (ulp 2^-7) and the errors average out over the
# ~100 loss tokens; measured ≤ 6e-5 (loss) and ≤ 1.2e-2 (norm, new-token rows) over these tests (printed)
BF16_TOL = (1e-3, 5e-2)


@pytest.mark.parametrize("compute", DTYPES)
def test_tied_full_and_embedding_only_steps_match_torch(dirs, compute):
    """Full fine-tuning, and model.trainable = model.embed_tokens.weight (on a tied model that is the
    head too: its gradient has both parts), two steps each against torch's tied model; E after
    each float32 step within tests/test_train_step.py's Adam tolerance; every other tensor of the
    embedding-only run bit-identical to the start."""
    tied = dirs[0]
    ms = model_settings(compute_dtype=compute)
    batches = [padded_batch(s, 2, 4, 24, VOCAB) for s in (1, 2)]
    for items in (("all",), ("model.embed_tokens.weight",)):
        run = Run(tied, (4, 2), trainable_items=items, ms=ms)
        start = run.hf_params()
        assert "lm_head.weight" not in start
        model = load_torch(tied)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        params = dict(model.named_parameters())  # tied: the table once
        if items != ("all",):
            params = {"model.embed_tokens.weight": params["model.embed_tokens.weight"]}
            for n, p in model.named_parameters():
                p.requires_grad_(n in params)
        ref = torch_reference(run, hf_forward(model), params, batches)
        check_steps(run, ref, batches, compute)
        now = run.hf_params()
        e = "model.embed_tokens.weight"
        if compute == "float32":
            adam_close(now[e], ref[-1][3][e], [r[2][e] for r in ref], LR)
        if items != ("all",):
            assert all(np.array_equal(now[n], start[n]) for n in now if n != e)
            assert run.partition.count(run.state["params"])[0] == VOCAB * H


LORA = LoRASettings(rank=4, alpha=8.0, targets=("q_proj", "down_proj"))


@pytest.mark.parametrize("compute", DTYPES)
def test_tied_lora_matches_peft_and_merges_without_lm_head(dirs, compute, tmp_path):
    """LoRA on a tied model: two steps against PEFT on transformers' tied model; the table stays
    frozen; the merged export's tensors are the base's names (no lm_head.weight)."""
    from test_lora import export_adapter, peft_adapters, peft_model

    tied = dirs[0]
    run = Run(tied, (4, 2), lora=LORA, ms=model_settings(LORA, compute_dtype=compute))
    pm = peft_model(tied, export_adapter(run, tmp_path / "initial"), trainable=True)
    batches = [padded_batch(s, 2, 4, 24, VOCAB) for s in (3, 4)]
    check_steps(run, torch_reference(run, hf_forward(pm), peft_adapters(pm), batches), batches, compute)
    merged = run.hf_params(lora=LORA)
    base = load_file(tied / "model.safetensors")
    assert merged.keys() == base.keys() and "lm_head.weight" not in merged
    assert np.array_equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


@pytest.mark.parametrize("compute", DTYPES)
def test_tied_new_tokens_rows_once_and_export(tmp_path, compute):
    """model.added_tokens on a tied model growing its table: the new rows exist once (in E, no head
    rows), new_token_embeddings trains exactly them (40·H values), two steps against torch's tied
    resized model, and the export (no lm_head.weight) loads in transformers tied, with the new rows."""
    from test_added_tokens import BASE_VOCAB, jaxsft_added, new_token_batch, with_tokenizer

    d = with_tokenizer(make_tiny_hf_model(tmp_path, vocab_size=BASE_VOCAB, tie_word_embeddings=True))
    added, cfg, _ = jaxsft_added(d)
    run = Run(d, (4, 2), trainable_items=("new_token_embeddings",), added=added, ms=model_settings(compute_dtype=compute))
    start = run.hf_params()
    e = "model.embed_tokens.weight"
    assert "lm_head.weight" not in start and start[e].shape == (cfg.vocab_size, H)
    assert run.partition.count(run.state["params"])[0] == len(added.new_ids) * H
    model = load_torch(d)
    model.resize_token_embeddings(cfg.vocab_size, mean_resizing=False)
    model.load_state_dict({n: torch.from_numpy(start[n]) for n in start}, strict=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for p in model.parameters():
        p.requires_grad_(False)
    new = {"rows": torch.nn.Parameter(torch.from_numpy(start[e][BASE_VOCAB:].copy()))}
    old = model.model.embed_tokens.weight[:BASE_VOCAB]

    def forward(flat):  # tie_weights: the one table replaces embed_tokens and the tied lm_head alike
        return torch.func.functional_call(model, {e: torch.cat([old, new["rows"]])}, (), dict(
            input_ids=flat["input_ids"], attention_mask=flat["segment_ids"], position_ids=flat["positions"])).logits

    batches = [new_token_batch(s, added.new_ids, cfg.vocab_size) for s in (1, 2)]
    ref = torch_reference(run, forward, new, batches)
    check_steps(run, ref, batches, compute)
    now = run.hf_params()
    if compute == "float32":
        adam_close(now[e][BASE_VOCAB:], ref[-1][3]["rows"], [r[2]["rows"] for r in ref], LR)
    assert np.array_equal(now[e][:BASE_VOCAB], start[e][:BASE_VOCAB])
    assert all(np.array_equal(now[n], start[n]) for n in now if n != e)
    export = hf.Export(cfg, added=added)
    out = hf.write_hf_directory(export.tensors(run.state["params"]), tmp_path / "hf", base=export.base_files(d),
                                dtype="float32")
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    back = transformers.Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert back.config.tie_word_embeddings and back.config.vocab_size == cfg.vocab_size
    assert np.array_equal(back.lm_head.weight.detach().numpy(), now[e])


def test_tied_offload_bf16_is_bit_identical(dirs):
    """Optimizer offload on a tied model in bfloat16 compute: two steps bit-identical with and
    without it (the moments of E, the only vocabulary table, offloaded whole)."""
    ms = model_settings(compute_dtype="bfloat16")
    runs = [Run(dirs[0], (4, 2), ms=ms), Run(dirs[0], (4, 2), ms=ms, offload=True)]
    for seed in (1, 2):
        batch = padded_batch(seed, 2, 4, 16, VOCAB)
        a, b = (r(batch) for r in runs)
        assert a == b and np.isfinite(a["loss"]), (a, b)
    for x, y in zip(jax.tree.leaves(runs[0].state), jax.tree.leaves(runs[1].state)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_tied_checkpoint_converts_without_lm_head(dirs, tmp_path):
    """bin/convert_to_hf (convert.to_hf.convert, in process) of a tied run's checkpoint: no
    lm_head.weight, config tied, transformers' logits equal jaxsft's (≤ 1e-5, as tests/test_model_parity.py)."""
    from convert import to_hf
    from modes import logits_error

    from jaxsft.checkpoint import Checkpointer

    from test_added_tokens import with_tokenizer

    base = with_tokenizer(shutil.copytree(dirs[0], tmp_path / "base"))  # an export copies the base's tokenizer
    run = Run(base, (4, 2), ms=model_settings(compute_dtype="bfloat16"))
    run(padded_batch(5, 2, 4, 16, VOCAB))
    s = settings({"trainer.default_local_dir": str(tmp_path / "run"), "trainer.checkpoint.async_save": False})
    ckpt = Checkpointer(s.checkpoint, base_model_dir=base, max_length=s.data.max_length,
                        meta={"config": {"model": {"param_dtype": "float32"}}, "base_model": str(base)})
    ckpt.save(1, run.state)
    ckpt.close()
    out = to_hf.convert(str(tmp_path / "run"), str(tmp_path / "hf"), dtype="float32")
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    back = transformers.Qwen2ForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    assert back.lm_head.weight is back.model.embed_tokens.weight
    f32 = Run(out, (4, 2))
    assert logits_error(f32, back, padded_batch(6, 1, 4, 16, VOCAB)) <= 1e-5
    assert np.array_equal(f32.hf_params()["model.embed_tokens.weight"], run.hf_params()["model.embed_tokens.weight"])


def test_tied_plan_counts_no_lm_head():
    """Plans of a tied model: the abstract state has no lm_head and its values are the HF model's
    (E once); the MaxText FLOPs count the head's matmul (h·Eᵀ runs, tied or not) but no extra
    parameter, so tied and untied geometries give the same per-token FLOPs."""
    from test_plan import TINY

    from jaxsft import plan
    from jaxsft.model.config import ModelConfig

    config = ModelConfig.from_hf_dict(TINY)
    assert config.tie_word_embeddings
    mesh = parallel.make_mesh(4, 2)
    tx, _ = optim.make_optimizer(settings().optim, 10, "float32")
    _, _, state, _ = plan.abstract_train_state(config, model_settings(), mesh, tx, say=lambda *a: None)
    assert "lm_head" not in state["params"]
    values = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    hf_config = transformers.Qwen2Config(**{k: v for k, v in TINY.items() if k != "model_type"})
    with torch.device("meta"):
        hf_model = transformers.Qwen2ForCausalLM(hf_config)
    assert values == sum(p.numel() for p in hf_model.parameters())  # parameters() lists a tied table once
    untied = {**TINY, "tie_word_embeddings": False}
    assert metrics.matmul_flops_per_token(TINY) == metrics.matmul_flops_per_token(untied)
