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


@pytest.mark.parametrize("lora", [None, LoRASettings(rank=4, alpha=8.0, targets=("q_proj", "down_proj"))])
def test_offloaded_steps_are_bit_identical(model_dir, lora):
    """Three steps of two micro-batches, full fine-tuning and LoRA: metrics, parameters and moments
    bit-identical with and without offload; between steps every moment is in pinned_host memory and
    the scalars (Adam's count, the lr) on the device."""
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
