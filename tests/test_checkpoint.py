"""Checkpointer: Orbax round trip across meshes, step naming, tracker timing, retention across
launches, incomplete steps, resume resolution, save_contents, preemption flag, save cost."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cfg import settings

from jaxsft import checkpoint
from jaxsft.config import ConfigError
from jaxsft.checkpoint import TRACKER, Checkpointer, CheckpointError, resolve_resume

AUTO = (jax.sharding.AxisType.Auto,) * 2
# Per-leaf partition specs on each mesh: the restore meshes shard differently from the save mesh.
SPECS = {
    (4, 2): {"w": jax.P("dp", "sp"), "b": jax.P("sp"), "emb": jax.P("dp", None)},
    (8, 1): {"w": jax.P(None, "dp"), "b": jax.P("dp"), "emb": jax.P(None, None)},
    (2, 4): {"w": jax.P("sp", "dp"), "b": jax.P(), "emb": jax.P("sp", "dp")},
}


def mesh(shape):
    return jax.make_mesh(shape, ("dp", "sp"), axis_types=AUTO)


def shardings(shape):
    m = mesh(shape)
    p = {k: jax.NamedSharding(m, s) for k, s in SPECS[shape].items()}
    rep = jax.NamedSharding(m, jax.P())
    return {"params": p, "opt_state": (optax.ScaleByAdamState(count=rep, mu=p, nu=p), optax.EmptyState()),
            "step": rep}


def make_state(shape=(4, 2), seed=0, scale=1):
    keys = iter(jax.random.split(jax.random.key(seed), 16))

    def params():
        return {"w": jax.random.normal(next(keys), (16 * scale, 8)),
                "b": jax.random.normal(next(keys), (8,)).astype(jnp.bfloat16),
                "emb": jax.random.normal(next(keys), (32 * scale, 4))}

    state = {"params": params(),
             "opt_state": (optax.ScaleByAdamState(count=jnp.int32(7), mu=params(), nu=params()), optax.EmptyState()),
             "step": jnp.int32(7)}
    return jax.device_put(state, shardings(shape))


def abstract(state, shape):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings(shape))


def make_settings(root, **trainer):
    keys = {"trainer.default_local_dir": str(root)}
    for k, v in trainer.items():
        in_checkpoint = k in ("save_contents", "load_contents", "async_save", "hf_dtype", "max_shard_size")
        keys[f"trainer.checkpoint.{k}" if in_checkpoint else f"trainer.{k}"] = v
    return settings(keys)


def make_ckpt(root, *, base=None, **trainer) -> Checkpointer:
    s = make_settings(root, **trainer)
    return Checkpointer(s.checkpoint, base_model_dir=base or root, max_length=s.data.max_length)


def host(tree):
    return jax.tree.map(np.asarray, tree)


def assert_identical(a, b):
    la, lb = jax.tree.leaves(host(a)), jax.tree.leaves(host(b))
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def test_round_trip_onto_other_meshes(tmp_path):
    state = make_state()
    expected = host(state)
    ckpt = make_ckpt(tmp_path)
    meta = {"config": {"data": {"max_length": 16}}, "epoch": 1, "base_model": "/models/x"}
    step_dir = ckpt.save(7, state, data_state={"epoch": 1, "position": 3}, meta=meta)
    jax.tree.map(lambda x: x.delete(), state)  # the next train step donates these buffers
    ckpt.close()
    assert step_dir == tmp_path / "global_step_7" and checkpoint.is_complete(step_dir)
    for shape in [(8, 1), (2, 4)]:
        restored, data_state, got_meta = make_ckpt(tmp_path).restore(step_dir, abstract(expected, shape))
        assert_identical(restored, expected)
        for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings(shape))):
            assert x.sharding == s
        assert data_state == {"epoch": 1, "position": 3}
        assert {k: got_meta[k] for k in meta} == meta
        assert got_meta["step"] == 7 and got_meta["save_contents"] == ["model", "optimizer", "extra"]


def test_step_naming_and_tracker_written_after_completion(tmp_path):
    ckpt = make_ckpt(tmp_path)
    ckpt.save(3, make_state(), data_state={"position": 0})
    assert not (tmp_path / TRACKER).exists()  # the background write is not yet known to be complete
    ckpt.wait()
    assert (tmp_path / TRACKER).read_text() == "3"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["global_step_3", TRACKER]
    assert sorted(p.name for p in (tmp_path / "global_step_3").iterdir() if p.is_dir()) == \
        ["data_process_0", "meta", "state"]

    ckpt.save(5, make_state())
    deadline = time.monotonic() + 60
    while not ckpt.poll():  # poll finalises without blocking once the write is done
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert (tmp_path / TRACKER).read_text() == "5"
    ckpt.close()


def test_retention_counts_directories_of_earlier_launches(tmp_path):
    state = make_state()
    first = make_ckpt(tmp_path, max_ckpt_to_keep=2)
    for s in (1, 2, 3):
        first.save(s, state)
    first.close()
    assert sorted(checkpoint.step_dirs(tmp_path)) == [2, 3]

    # A second launch (resumed at 3) keeps counting the directories already on disk.
    (tmp_path / "global_step_9").mkdir()  # an abandoned run's leftover goes before real steps
    second = make_ckpt(tmp_path, max_ckpt_to_keep=2)
    second.save(4, state)
    second.wait()
    assert sorted(checkpoint.step_dirs(tmp_path)) == [3, 4]
    second.save(5, state)
    second.close()
    assert sorted(checkpoint.step_dirs(tmp_path)) == [4, 5]
    assert (tmp_path / TRACKER).read_text() == "5"

    keep_all = make_ckpt(tmp_path, max_ckpt_to_keep=None)
    keep_all.save(6, state)
    keep_all.close()
    assert sorted(checkpoint.step_dirs(tmp_path)) == [4, 5, 6]


def test_retention_keeps_complete_steps_not_a_damaged_one_the_run_resumed_past(tmp_path, monkeypatch):
    from jaxsft.checkpoint import checkpointer as checkpointer_module

    """Found by the fault soak (seed 4004): steps 8 and 9 saved, a file of 9 deleted, the run
    resumed from 8 and saved 10; retention (keep 2) kept the damaged 9 and deleted the complete 8,
    leaving one usable checkpoint. A damaged step older than the newest can never be resumed
    from: it goes first, and the kept steps are complete ones."""
    state = make_state()
    first = make_ckpt(tmp_path, max_ckpt_to_keep=2)
    for s in (8, 9):
        first.save(s, state)
    first.close()
    (tmp_path / "global_step_9" / "state" / "commit_success.txt").unlink()
    assert not checkpoint.is_complete(tmp_path / "global_step_9")
    second = make_ckpt(tmp_path, max_ckpt_to_keep=2)  # resumed from 8, as the fallback said
    second.save(10, state)
    # Finalising reads no checkpoint: a step's meta is read through Orbax, a collective in a 2-process job,
    # and each process finalises when it sees its own background write done (the soak's 2-process LoRA
    # reference hung here: process 0 in retention's read, process 1 in the next train step).
    monkeypatch.setattr(checkpointer_module, "step_problems", lambda *_: pytest.fail("finalising read a checkpoint"))
    second.close()
    assert sorted(checkpoint.step_dirs(tmp_path)) == [8, 10]
    assert all(checkpoint.is_complete(p) for p in checkpoint.step_dirs(tmp_path).values())


def test_a_kill_during_retention_leaves_no_half_deleted_step(tmp_path, monkeypatch):
    """Found by the fault soak (seed 4004, campaign 14): a SIGKILL while retention deleted
    global_step_2 left it half deleted (no commit marker), an incomplete step directory that stayed
    through the next launches. Retention renames a step out of the way before deleting it, so a kill
    leaves a temporary, which the next launch removes."""
    from jaxsft.checkpoint import checkpointer as checkpointer_module

    state = make_state()
    first = make_ckpt(tmp_path, max_ckpt_to_keep=2)
    for s in (1, 2):
        first.save(s, state)
    first.close()

    def killed(path, *args, **kwargs):  # what SIGKILL leaves: part of the directory deleted, then nothing
        if "global_step_1" in str(path) and not kwargs.get("ignore_errors"):
            next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
            raise SystemExit("killed")
        return real_rmtree(path, *args, **kwargs)

    real_rmtree = shutil.rmtree
    second = make_ckpt(tmp_path, max_ckpt_to_keep=2)
    monkeypatch.setattr(checkpointer_module.shutil, "rmtree", killed)
    second.save(3, state)
    with pytest.raises(SystemExit):
        second.wait()
    monkeypatch.undo()
    assert sorted(checkpoint.step_dirs(tmp_path)) == [2, 3]  # no global_step_1 left half deleted
    assert all(checkpoint.is_complete(p) for p in checkpoint.step_dirs(tmp_path).values())
    assert [p.name for p in tmp_path.glob(".deleting.*")] == [".deleting.global_step_1.tmp"]
    make_ckpt(tmp_path, max_ckpt_to_keep=2).close()  # the next launch
    assert not list(tmp_path.glob(".deleting.*"))


def test_incomplete_latest_step_is_skipped(tmp_path, caplog):
    state = make_state()
    ckpt = make_ckpt(tmp_path)
    for s in (1, 2):
        ckpt.save(s, state)
    ckpt.close()
    caplog.set_level(logging.WARNING, logger="jaxsft.checkpoint")

    # Killed mid-save after the tracker moved on: commit marker missing.
    marker = tmp_path / "global_step_2" / "commit_success.txt"
    marker_text = marker.read_text()
    marker.unlink()
    assert checkpoint.latest_complete(tmp_path) == tmp_path / "global_step_1"
    assert ("global_step_2 is incomplete (its save never finished: no Orbax commit marker); resuming from "
            "global_step_1 instead") in caplog.text

    # A bare directory newer than the tracker, and Orbax's temporary directory, are ignored.
    caplog.clear()
    (tmp_path / TRACKER).write_text("1")
    (tmp_path / "global_step_3").mkdir()
    (tmp_path / "global_step_4.orbax-checkpoint-tmp").mkdir()
    assert checkpoint.latest_complete(tmp_path) == tmp_path / "global_step_1"
    assert "ignoring global_step_2, global_step_3" in caplog.text

    # Tracker naming a missing step: the newest complete one before it.
    caplog.clear()
    (tmp_path / TRACKER).write_text("9")
    marker.write_text(marker_text)
    assert checkpoint.latest_complete(tmp_path) == tmp_path / "global_step_2"
    assert "global_step_9 is missing" in caplog.text

    # Resuming from step 1 and saving step 2 or 3 again replaces the leftovers.
    (tmp_path / "global_step_2" / "commit_success.txt").unlink()
    again = make_ckpt(tmp_path)
    again.save(2, state)
    again.save(3, state)
    again.close()
    assert checkpoint.is_complete(tmp_path / "global_step_2") and checkpoint.is_complete(tmp_path / "global_step_3")
    assert checkpoint.latest_complete(tmp_path) == tmp_path / "global_step_3"


def test_hf_export_lands_inside_the_step_before_the_tracker(tmp_path, base_model):
    base = tmp_path / "base"
    shutil.copytree(base_model, base)
    (base / "config.json").write_text(json.dumps({**json.loads((base / "config.json").read_text()),
                                                  "max_position_embeddings": 8}))
    root = tmp_path / "run"
    ckpt = make_ckpt(root, base=base, save_contents=("model", "hf_model"), hf_dtype="bfloat16")
    state = make_state()
    ckpt.save(2, state, export=lambda: iter(state["params"].items()))
    assert not (root / "global_step_2" / "huggingface").exists() and not (root / TRACKER).exists()
    ckpt.close()
    hf_dir = root / "global_step_2" / "huggingface"
    hf_config = json.loads((hf_dir / "config.json").read_text())
    assert hf_config["dtype"] == "bfloat16" and hf_config["max_position_embeddings"] == settings().data.max_length
    assert (hf_dir / "model.safetensors").is_file() and (root / TRACKER).read_text() == "2"
    assert checkpoint.is_complete(root / "global_step_2")
    (hf_dir / "config.json").unlink()  # a step that was to carry an export is incomplete without it
    assert not checkpoint.is_complete(root / "global_step_2")


def test_save_and_load_contents(tmp_path):
    state = make_state()
    expected = host(state)
    model_only = make_ckpt(tmp_path / "a", save_contents=("model",))
    model_only.save(1, state, data_state={"position": 1})
    model_only.close()
    restored, data_state, meta = make_ckpt(tmp_path / "a").restore(
        tmp_path / "a" / "global_step_1", abstract(expected, (8, 1)))
    assert list(restored) == ["params"] and data_state is None and meta["save_contents"] == ["model"]
    assert_identical(restored["params"], expected["params"])

    full = make_ckpt(tmp_path / "b")
    full.save(1, state, data_state={"position": 1})
    full.close()
    reader = make_ckpt(tmp_path / "b", load_contents=("model", "extra"))
    restored, data_state, _ = reader.restore(tmp_path / "b" / "global_step_1", abstract(expected, (2, 4)))
    assert sorted(restored) == ["params", "step"] and data_state == {"position": 1}
    assert_identical(restored["step"], expected["step"])

    on_host = checkpoint.restore_entry(tmp_path / "b" / "global_step_1")
    assert isinstance(on_host["w"], np.ndarray) and on_host["w"].tobytes() == expected["params"]["w"].tobytes()
    cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    assert checkpoint.restore_entry(tmp_path / "b" / "global_step_1", "step", cpu).sharding == cpu
    with pytest.raises(ConfigError, match=r"trainer\.checkpoint\.save_contents has \['weights'\]"):
        make_ckpt(tmp_path / "c", save_contents=("model", "weights"))


def test_a_meta_older_than_the_mode_keys_reads_them_as_their_defaults(tmp_path):
    """The training-mode check reads a key that an older step's meta lacks as the key's default,
    which the run's checkpointer takes from the configuration (jaxsft.setup.make_checkpointer; the
    checkpoint package restates none)."""
    state = make_state()
    old = make_ckpt(tmp_path)
    old.save(1, state, meta={"config": {"model": {}}})  # saved before any mode key existed
    old.save(2, state, meta={"config": {"model": {"lora_rank": 4}}})
    old.close()
    from jaxsft import setup

    run = setup.make_checkpointer(make_settings(tmp_path), setup.BaseModel(tmp_path, None, None, None))
    restored, _, _ = run.restore(tmp_path / "global_step_1", abstract(host(state), (4, 2)))
    assert sorted(restored) == ["opt_state", "params", "step"]
    with pytest.raises(CheckpointError, match=r"other settings — model\.lora_rank=4 there, 0 here; resume with its"):
        run.restore(tmp_path / "global_step_2", abstract(host(state), (4, 2)))


def test_resolve_resume(tmp_path):
    def trainer(**kw):
        return make_settings(tmp_path / "run", **kw).checkpoint

    assert resolve_resume(trainer(resume_mode="auto")) is None  # nothing saved yet
    ckpt = make_ckpt(tmp_path / "run")
    ckpt.save(4, make_state())
    ckpt.close()
    step4 = tmp_path / "run" / "global_step_4"
    assert resolve_resume(trainer(resume_mode="auto")) == step4
    assert resolve_resume(trainer(resume_mode="disable")) is None
    assert resolve_resume(trainer(resume_mode="resume_path", resume_from_path=str(step4))) == step4
    assert resolve_resume(trainer(resume_mode="auto", resume_from_path=str(step4))) == step4

    with pytest.raises(ConfigError, match="needs trainer.resume_from_path"):
        trainer(resume_mode="resume_path")
    for kw, message in [
        (dict(resume_mode="resume_path", resume_from_path=str(tmp_path / "nope")), "does not exist"),
        (dict(resume_mode="auto", resume_from_path=str(tmp_path)), "is not a global_step_N directory"),
    ]:
        with pytest.raises(CheckpointError, match=message) as e:
            resolve_resume(trainer(**kw))
        assert "trainer.resume_from_path" in str(e.value) and "\n" not in str(e.value)
    (step4 / "commit_success.txt").unlink()
    with pytest.raises(CheckpointError, match="trainer.resume_from_path=.* is an incomplete checkpoint"):
        resolve_resume(trainer(resume_mode="resume_path", resume_from_path=str(step4)))


def test_preemption_flag_restores_previous_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    flag = checkpoint.PreemptionFlag()
    try:
        assert not flag.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.is_set() and flag.check(3)
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait for the step
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        flag.restore()
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.slow  # over ~3 s on 2 cores: CI's full run, not the ≤ 3-minute inner loop
def test_async_versus_sync_save_cost(tmp_path):
    """Save cost seen by the train loop for a ~50 MB state on the (4, 2) mesh."""
    state = make_state(scale=16_000)
    mb = sum(x.nbytes for x in jax.tree.leaves(state)) / 1e6
    timings = {}
    for mode in ("sync", "async"):
        ckpt = make_ckpt(tmp_path / mode, async_save=mode == "async")
        ckpt.save(1, state)  # warm-up (first save compiles and creates the layout)
        ckpt.wait()
        t0 = time.perf_counter()
        ckpt.save(2, state)
        t1 = time.perf_counter()
        ckpt.wait()
        t2 = time.perf_counter()
        ckpt.close()
        timings[mode] = (t1 - t0, t2 - t0)
        assert checkpoint.is_complete(tmp_path / mode / "global_step_2")
    print(f"\nsave of {mb:.0f} MB: sync blocks {timings['sync'][0]:.2f} s; async blocks {timings['async'][0]:.2f} s "
          f"and completes after {timings['async'][1]:.2f} s")
