"""Optimizer-state offload (`model.fsdp_config.optimizer_offload`): the Adam moments live in
`pinned_host` memory between steps and the steps compute exactly what they compute without it;
checkpoints of an offloaded state restore into host memory and resume exactly.

On this CPU `pinned_host` is the same RAM as device memory (jaxsft.offload), so these tests check
placement and numerics, not memory saved; see docs/PERFORMANCE.md for the memory figures.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from cfg import settings
from e2e import under_xla_defaults
from modes import Run, padded_batch
from tiny_hf import make_tiny_hf_model

from jaxsft import offload
from jaxsft.checkpoint import Checkpointer
from jaxsft.model.lora import LoRASettings

VOCAB = 256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("offload"), vocab_size=VOCAB)


def kinds(opt_state):
    return sorted({(x.ndim > 0, x.sharding.memory_kind) for x in jax.tree.leaves(opt_state)})


def host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow  # over ~5 s on 2 cores: CI's full run, not the ≤ 3-minute inner loop
@pytest.mark.parametrize("lora", [None, LoRASettings(rank=4, alpha=8.0, targets=("q_proj", "down_proj"))])
def test_offloaded_steps_are_bit_identical(model_dir, lora, request):
    """Three steps of two micro-batches, full fine-tuning and LoRA: metrics, parameters and moments
    bit-identical with and without offload; between steps every moment is in pinned_host memory and
    the scalars (Adam's count, the lr) on the device. Bit-identity of two programs depends on XLA's
    code generation: checked with the emitters users get (tests/e2e.py under_xla_defaults); the
    suite's faster emitters round grad_norm 1 ulp apart here."""
    if under_xla_defaults(request):
        return
    said = []
    runs = [Run(model_dir, (4, 2), lora=lora), Run(model_dir, (4, 2), lora=lora, offload=True)]
    assert kinds(runs[0].state["opt_state"]) == [(False, "device"), (True, "device")]
    for seed in (1, 2, 3):
        batch = padded_batch(seed, 2, 4, 16, VOCAB)
        a, b = (r(batch) for r in runs)
        assert a == b, (seed, a, b)
        assert kinds(runs[1].state["opt_state"]) == [(False, "device"), (True, offload.HOST)]
    for x, y in zip(host(runs[0].state), host(runs[1].state)):
        assert x.tobytes() == y.tobytes()
    offload.to_host_shardings(runs[1].state["opt_state"], runs[1].shardings["opt_state"], runs[1].mesh, say=said.append)
    assert said and "same RAM" in said[0]


@pytest.mark.slow  # over ~3 s on 2 cores: CI's full run, not the ≤ 3-minute inner loop
def test_offloaded_state_checkpoints_and_resumes_exactly(model_dir, tmp_path):
    """Save an offloaded state after two steps, restore it into a fresh offloaded state: the moments
    come back in pinned_host memory, and the third step equals the unbroken run's bit for bit."""
    unbroken = Run(model_dir, (4, 2), offload=True)
    batches = [padded_batch(s, 2, 4, 16, VOCAB) for s in (4, 5, 6)]
    for b in batches[:2]:
        unbroken(b)
    s = settings({"trainer.default_local_dir": str(tmp_path / "run"), "trainer.checkpoint.async_save": False})
    ckpt = Checkpointer(s.checkpoint, base_model_dir=model_dir, max_length=s.data.max_length)
    ckpt.save(2, unbroken.state)
    ckpt.close()
    resumed = Run(model_dir, (4, 2), offload=True)
    resumed.state, _ = Checkpointer(s.checkpoint, base_model_dir=model_dir, max_length=s.data.max_length).restore_state(
        tmp_path / "run" / "global_step_2", resumed.state, resumed.shardings)
    assert kinds(resumed.state["opt_state"]) == [(False, "device"), (True, offload.HOST)]
    assert int(resumed.state["step"]) == 2
    assert unbroken(batches[2]) == resumed(batches[2])
    for x, y in zip(host(unbroken.state), host(resumed.state)):
        assert x.tobytes() == y.tobytes()


def test_resume_under_other_training_mode_settings_is_refused(model_dir, tmp_path):
    """A checkpoint of a LoRA run resumed by a run without LoRA (or with other added tokens): one
    sentence naming the keys, before any array is read."""
    from jaxsft.checkpoint import CheckpointError

    run = Run(model_dir, (4, 2), lora=LoRASettings(rank=4, alpha=8.0, targets=("q_proj",)))
    s = settings({"trainer.default_local_dir": str(tmp_path / "run"), "trainer.checkpoint.async_save": False})

    def ckpt(model_keys, **meta):
        config = {"model": {"lora_rank": 0, "lora_alpha": 16, "target_modules": ["all-linear"], **model_keys}}
        return Checkpointer(s.checkpoint, base_model_dir=model_dir, max_length=s.data.max_length,
                            meta={"config": config, **meta})

    saver = ckpt({"lora_rank": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}, added_tokens=["<a>"])
    saver.save(1, run.state)
    saver.close()
    full = Run(model_dir, (4, 2))
    with pytest.raises(CheckpointError, match=r"model\.lora_rank=4 there, 0 here.*model\.added_tokens=\['<a>'\] there, "
                                              r"None here") as e:
        ckpt({}).restore_state(tmp_path / "run" / "global_step_1", full.state, full.shardings)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_update_equals_the_whole_tree_update(dtype):
    """offload.streamed_update on a tree of stacked layer leaves (scanned a layer at a time, two
    leading sizes) and whole leaves, moments in pinned_host on 8 CPU devices, against
    optim.apply_update: moments, Adam's count and the grad norm bit-identical, parameters within 1
    ulp (float32: one or two entries of a layer differ by 1 ulp, where XLA:CPU fuses the last
    multiply-add differently; bfloat16: identical), over a normal step, a non-finite one (skipped in
    both) and another normal one."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxsft import optim, parallel

    mesh = parallel.make_mesh(4, 2)
    fsdp = ("dp", "sp")
    rng = np.random.default_rng(0)
    shapes = {"embed": ((16, 8), P(fsdp, None)), "norm": ((8,), P(fsdp)),
              "layers": {"kernel": ((3, 8, 16), P(None, fsdp, None)), "scale": ((3, 8), P(None, fsdp)),
                         "picked": ((2, 8, 8), P(None, None, fsdp))}}

    def tree(make):
        return jax.tree.map(lambda sp: make(*sp), shapes, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2
                            and isinstance(x[1], P))

    def array(shape, spec, scale=1.0):
        return jax.device_put(jnp.asarray(rng.normal(size=shape) * scale, dtype), NamedSharding(mesh, spec))

    params = tree(array)
    tx, _ = optim.make_optimizer(settings({"optim.clip_grad": 0.5}).optim, 10, dtype)
    opt_state = tx.init(params)
    dev_shardings = jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else
                                 NamedSharding(mesh, P()), opt_state)
    host_shardings = offload.to_host_shardings(opt_state, dev_shardings, mesh, say=lambda *a: None)
    whole = jax.jit(lambda p, o, g, lr: optim.apply_update(tx, p, o, g, lr))
    p_shardings = jax.tree.map(lambda x: x.sharding, params)
    streamed = jax.jit(lambda p, o, g, lr: offload.streamed_update(tx, p, o, g, lr, host_shardings),
                       in_shardings=(p_shardings, host_shardings, p_shardings, None), donate_argnums=(0, 1),  # as the step
                       out_shardings=(p_shardings, host_shardings, None, None))
    o_whole, o_streamed = opt_state, jax.device_put(opt_state, host_shardings)
    p_whole, p_streamed = params, jax.tree.map(jnp.copy, params)
    for i in range(3):
        grads = tree(lambda shape, spec: array(shape, spec, scale=3.0))
        if i == 1:  # a non-finite gradient: the step is skipped
            grads["layers"]["scale"] = grads["layers"]["scale"].at[1, 2].set(jnp.nan)
        lr = jnp.float32(1e-2 / (i + 1))  # a skipped step keeps the previous step's lr in the state too
        p_whole, o_whole, n1, f1 = whole(p_whole, o_whole, grads, lr)
        p_streamed, o_streamed, n2, f2 = streamed(p_streamed, o_streamed, grads, lr)
        assert float(n1) == float(n2) or (np.isnan(float(n1)) and np.isnan(float(n2)))
        assert bool(f1) == bool(f2) == (i != 1)
        assert kinds(o_streamed) == [(False, "device"), (True, offload.HOST)]
        for x, y in zip(host(o_whole), host(o_streamed)):
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), i
        for x, y in zip(host(p_whole), host(p_streamed)):  # XLA:CPU fuses AdamW's last multiply-add per layer
            ulps = np.abs(x.astype(np.float64) - y.astype(np.float64)) / np.spacing(np.abs(x).astype(x.dtype))
            # the same ops but one may fuse lr·u into an FMA: one rounding of |lr·u| ≪ |p| skipped: ≤ 1 ulp of p
            assert x.dtype == y.dtype and ulps.max() <= 1, (i, ulps.max())  # otherwise: 1-2 of 128 differ by 1 ulp
    assert int(jax.tree.leaves(o_streamed)[0]) == 2  # Adam's count: the skipped step does not count
    whole_idx, stacked = offload.layer_groups(params)
    assert len(whole_idx) == 2 and sorted(len(v) for v in stacked.values()) == [1, 2]
