"""LoRA (`model.lora_rank > 0`) against torch + PEFT 0.21 on a tiny untied float32 Qwen2.

The reference: transformers' Qwen2ForCausalLM (eager attention) with jaxsft's initial adapters
loaded by `peft.PeftModel.from_pretrained(model, lora_adapter_dir, is_trainable=True)` (the same
starting point: torch's and JAX's random generators differ, so the initial A is jaxsft's, written by
jaxsft's adapter export), torch.optim.AdamW over the adapters, clip_grad_norm_(1.0).
"""

from __future__ import annotations

import jax
import numpy as np
import peft
import pytest
from modes import (LR, Run, adam_close, hf_forward, load_torch, logits_error, model_settings, padded_batch, rel,
                   torch_steps)
from safetensors.numpy import load_file
from tiny_hf import make_tiny_hf_model

from jaxsft import hf, step
from jaxsft.hf import adapter
from jaxsft.model import lora as lora_lib
from jaxsft.model.lora import LoRASettings

VOCAB = 256
LORA = LoRASettings(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("lora"), vocab_size=VOCAB)


def export_adapter(run, out):
    hf.Export(run.config, run.settings.lora).write_adapter(run.state["params"], out, base_model_name_or_path="base")
    return out


def peft_model(model_dir, adapter_dir, trainable=False):
    return peft.PeftModel.from_pretrained(load_torch(model_dir), str(adapter_dir), is_trainable=trainable)


def peft_adapters(pm) -> dict:
    """name → PEFT adapter tensor, named as jaxsft's adapter export names them."""
    return {n.replace(".default", ""): p for n, p in pm.named_parameters() if "lora_" in n}


@pytest.mark.slow  # over ~5 s on 2 cores: CI's full run, not the ≤ 3-minute inner loop
def test_two_steps_match_torch_peft(model_dir, tmp_path):
    """Loss and pre-clip gradient norm ≤ 1e-6 relative at both steps (the loss of step 1 is the
    base model's); every adapter entry after each step within the tolerance of
    tests/test_train_step.py (≤ 1e-2·lr everywhere, ≤ 1e-4·lr where |g| ≥ 1e-6). Mesh (4, 2): FSDP
    over 8 devices with Ulysses sp = 2."""
    batches = [padded_batch(1, 2, 4, 24, VOCAB), padded_batch(2, 2, 4, 24, VOCAB)]
    run = Run(model_dir, (4, 2), lora=LORA)
    pm = peft_model(model_dir, export_adapter(run, tmp_path / "initial"), trainable=True)
    torch_params = peft_adapters(pm)
    assert len(torch_params) == 2 * 2 * len(LORA.targets)
    lrs = [float(run.schedule(0)), float(run.schedule(1))]
    ref = torch_steps(hf_forward(pm), torch_params, batches, lrs)
    for i, batch in enumerate(batches):
        m = run(batch)
        t_loss, t_norm, _, t_params = ref[i]
        # end to end vs torch/PEFT: not derivable (op orders through the layers); 8 eps as tests/test_train_step.py
        assert rel(m["loss"], t_loss) <= 1e-6 and rel(m["grad_norm"], t_norm) <= 1e-6, (i, m, t_loss, t_norm)
        ours = dict(adapter.adapter_tensors(run.state["params"], run.config, LORA))
        worst = [adam_close(np.asarray(jax.device_get(ours[n])), t_params[n], [r[2][n] for r in ref[:i + 1]], LR) for n in torch_params]
        print(f"step {i + 1}: loss rel {rel(m['loss'], t_loss):.1e}, norm rel {rel(m['grad_norm'], t_norm):.1e}, "
              f"worst adapter entry {max(w[0] for w in worst):.1e} lr (conditioned {max(w[1] for w in worst):.1e} lr)")


@pytest.mark.slow  # over ~5 s on 2 cores: CI's full run, not the ≤ 3-minute inner loop
def test_step_zero_is_the_base_model_and_the_base_stays_frozen(model_dir):
    """B = 0 at the start: the first loss is bit-identical to full fine-tuning's first loss; after
    training, every base weight is bit-identical to the HF file; the optimizer holds moments for
    the adapters only; adapters are float32 over a bfloat16 base."""
    batch = padded_batch(3, 1, 8, 16, VOCAB)
    full, lora = Run(model_dir, (4, 2)), Run(model_dir, (4, 2), lora=LORA)
    assert lora({**batch})["loss"] == full(batch)["loss"]
    lora(padded_batch(4, 1, 8, 16, VOCAB))
    base = load_file(model_dir / "model.safetensors")
    now = lora.hf_params()  # unmerged: the base weights as they are held
    assert base.keys() == now.keys()
    for name in base:
        assert np.array_equal(now[name], base[name]), name
    mu = lora.state["opt_state"][1].inner_state[0].mu
    shapes = sorted(np.shape(x) for x in jax.tree.leaves(mu))
    assert shapes == sorted(np.shape(x) for x in jax.tree.leaves(lora.partition.select(lora.state["params"])))
    # hidden 64, q 64, k/v 32, intermediate 128, 2 layers: Σ rank·(in + out) over the targets
    sizes = {"q_proj": (64, 64), "v_proj": (64, 32), "o_proj": (64, 64), "up_proj": (64, 128), "down_proj": (128, 64)}
    assert sum(int(np.prod(s)) for s in shapes) == 2 * sum(4 * (i + o) for i, o in sizes.values()) == 5888
    bf16 = Run(model_dir, (4, 2), lora=LORA, ms=model_settings(LORA, param_dtype="bfloat16"))
    q = bf16.state["params"]["layers"]["self_attn"]["q_proj"]
    assert q["kernel"][...].dtype == np.dtype("bfloat16") and q["lora_a"][...].dtype == np.float32


def test_initialisation_is_peft_s(model_dir):
    """A ~ U(−1/√in, 1/√in) (PEFT's kaiming_uniform_(a=√5)), different in every layer and module,
    reproducible from the seed; B = 0. Checked: bounds, mean and variance within 5 standard errors."""
    a = Run(model_dir, (1, 1), lora=LORA).param("layers", "mlp", "down_proj", "lora_a")  # [L, 128, 4]
    bound = 1 / np.sqrt(128)
    assert np.abs(a).max() <= bound and not np.array_equal(a[0], a[1])
    n = a.size
    assert abs(a.mean()) <= 5 * bound / np.sqrt(3 * n)
    assert abs(a.var() - bound ** 2 / 3) <= 5 * bound ** 2 * np.sqrt(4 / 45 / n)
    again = Run(model_dir, (4, 2), lora=LORA)
    assert np.array_equal(again.param("layers", "mlp", "down_proj", "lora_a"), a)
    assert not again.param("layers", "mlp", "down_proj", "lora_b").any()
    assert not np.array_equal(again.param("layers", "mlp", "up_proj", "lora_a")[:, :64], a[:, :64])


@pytest.mark.slow  # over ~3 s on 2 cores: CI's full run, not the ≤ 3-minute inner loop
def test_merged_export_equals_peft_merge_and_unload(model_dir, tmp_path):
    """After two steps: `lora_adapter/` loads in PEFT and gives jaxsft's logits (≤ 1e-5 relative);
    the merged export equals PEFT's merge_and_unload() (≤ 1e-6 relative per tensor, float32); every
    weight LoRA does not target is bit-identical to the base model's."""
    run = Run(model_dir, (4, 2), lora=LORA)
    for seed in (5, 6):
        run(padded_batch(seed, 1, 8, 16, VOCAB))
    adapter_dir = export_adapter(run, tmp_path / "lora_adapter")
    merged = run.hf_params(lora=LORA)
    pm = peft_model(model_dir, adapter_dir).eval()
    batch = padded_batch(7, 1, 4, 16, VOCAB)
    assert logits_error(run, pm, batch) <= 1e-5  # jax vs torch forward: not derivable, as tests/test_model_parity.py
    unloaded = {n: p.detach().numpy() for n, p in pm.merge_and_unload().state_dict().items()}
    base = load_file(model_dir / "model.safetensors")
    targeted = 0
    for name, w in merged.items():
        if any(f".{t}." in name for t in LORA.targets) and name.endswith("proj.weight"):
            targeted += 1
            # W + (B·A)·α/r, a rank-4 product (γ_4) and one addition, in other orders: ≤ 8 eps of max|W|
            assert rel(w, unloaded[name]) <= 8 * np.finfo(np.float32).eps and not np.array_equal(w, base[name]), name
        else:
            assert np.array_equal(w, base[name]), name
    assert targeted == 2 * len(LORA.targets)


@pytest.mark.slow  # over ~5 s on 2 cores: CI's full run, not the ≤ 3-minute inner loop
def test_dropout_is_peft_s_and_deterministic(model_dir):
    """The LoRA term with dropout p equals ((x·m/(1−p))·A)·B·α/r for the mask m the key draws
    (≤ 1e-6 relative); the same seed gives bit-identical steps, another seed another loss."""
    settings = LoRASettings(rank=4, alpha=8.0, targets=("q_proj",), dropout=0.25)
    key = jax.random.key(3)
    x = jax.random.normal(jax.random.key(1), (2, 5, 64))
    a, b = jax.random.normal(jax.random.key(2), (64, 4)), jax.random.normal(jax.random.key(4), (4, 32))
    keep = np.asarray(jax.random.bernoulli(key, 0.75, x.shape))
    expect = ((np.asarray(x) * keep / 0.75) @ np.asarray(a)) @ np.asarray(b) * 2.0
    assert 0.6 < keep.mean() < 0.9
    # float32 ((x·m/(1-p))·A)·B·α/r in other orders: γ_N, N = 64 + 4 + 3 roundings, of the terms' |X|·|A|·|B|·α/r
    tol = lambda xm, want: 71 * np.finfo(np.float32).eps * np.max(np.abs(xm) @ np.abs(a) @ np.abs(b) * 2.0) / np.max(np.abs(want))
    assert rel(lora_lib.delta(x, a, b, settings, key), expect) <= tol(np.asarray(x) * keep / 0.75, expect)
    plain = (np.asarray(x) @ np.asarray(a)) @ np.asarray(b) * 2.0
    assert rel(lora_lib.delta(x, a, b, settings, None), plain) <= tol(x, plain)
    drop = LoRASettings(rank=4, alpha=8.0, targets=LORA.targets, dropout=0.25)
    batches = [padded_batch(s, 2, 4, 16, VOCAB) for s in (8, 9)]
    runs = [Run(model_dir, (4, 2), lora=drop, dropout_seed=seed) for seed in (1, 1, 2)]
    losses = [[r(b)["loss"] for b in batches] for r in runs]
    assert losses[0] == losses[1] and losses[0][1] != losses[2][1]


_REFERENCE: dict = {}


@pytest.mark.slow  # a sweep over every mesh: CI, not the inner loop
@pytest.mark.parametrize("mesh_shape, scan, remat", [((1, 1), True, "none"), ((8, 1), False, "minimal"),
                                                     ((2, 4), True, "full")])
def test_adapter_gradients_do_not_depend_on_mesh_scan_or_remat(model_dir, mesh_shape, scan, remat):
    """The adapters' gradients of one packed batch (two samples per row) on a mesh with Ulysses
    sp ∈ {1, 4}, scanned or unrolled layers and three remat policies equal those of a (4, 2) mesh
    with scan and full remat: ≤ 2e-6 relative per tensor (float32 summation order)."""
    batch = padded_batch(10, 2, 8, 32, VOCAB)
    batch["segment_ids"][:, :, 16:] = np.where(batch["segment_ids"][:, :, 16:] > 0, 2, 0)  # a second sample
    batch["positions"][:, :, 16:] = np.arange(16)

    def grads(shape, **kw):
        run = Run(model_dir, shape, lora=LORA, ms=model_settings(LORA, **kw))
        fn = jax.jit(lambda p, b: step.accumulate_gradients(run.graphdef, run.rest, p, b, run.cfg, run.partition)[:2])
        with jax.set_mesh(run.mesh):
            loss, g = fn(run.state["params"], run.put(batch))
        return float(loss), jax.tree.map(np.asarray, jax.device_get(g))

    if "ref" not in _REFERENCE:  # the (4, 2) reference once for all three cases
        _REFERENCE["ref"] = grads((4, 2))
    ref_loss, ref = _REFERENCE["ref"]
    loss, got = grads(mesh_shape, scan_layers=scan, remat_policy=remat)
    assert rel(loss, ref_loss) <= 1e-6  # the same sums regrouped (as tests/test_train_step.py): γ_16 = 8 eps
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        assert rel(a, b) <= 2e-6  # as test_global_tokens_invariant_to_split_and_mesh: γ_16 of Σ|partial| ≤ 2·max|g|
