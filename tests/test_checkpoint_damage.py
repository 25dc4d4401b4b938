"""Damaged checkpoints are never resumed as if whole (issue 11, group 1), and a full disk during a
save is one line (group 2): through the real Checkpointer on 8 emulated devices.

A step is damaged here as a user or a failing disk would: a directory or one array file deleted,
a file truncated, the listing or metadata removed. Each time the step is named as incomplete with
what it lacks; `resume_mode=auto` falls back to the newest complete step and says so in one line;
`resume_from_path` to it, `restore` of it and `convert_to_hf` of it are refused naming the part.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest
import small_disk
from test_checkpoint import abstract, assert_identical, host, make_ckpt, make_settings, make_state

from jaxsft import checkpoint
from jaxsft.checkpoint import MANIFEST, TRACKER, CheckpointError, resolve_resume


def largest_array_file(step_dir: Path) -> Path:
    return max((f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"),
               key=lambda f: f.stat().st_size)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


# name → (how the step is damaged, a regex of what the message names first)
ARRAY_FILE = r"state/ocdbt\.process_0/d/[0-9a-f]+"
DAMAGE = {
    "state_deleted": (lambda d: shutil.rmtree(d / "state"), r"state/ is missing"),
    "data_process_0_deleted": (lambda d: shutil.rmtree(d / "data_process_0"), r"data_process_0/ is missing"),
    "meta_deleted": (lambda d: shutil.rmtree(d / "meta"), r"meta/ cannot be read"),
    "one_array_file_deleted": (lambda d: largest_array_file(d).unlink(), ARRAY_FILE + " is missing"),
    "one_array_file_truncated": (lambda d: truncate(largest_array_file(d)), ARRAY_FILE + r" holds \d+ bytes, \d+ were written"),
    "state_metadata_deleted": (lambda d: (d / "state" / "_METADATA").unlink(), r"state/_METADATA is missing"),
    "listing_deleted": (lambda d: (d / MANIFEST).unlink(), f"its save never finished: no {re.escape(MANIFEST)}"),
    "commit_marker_deleted": (lambda d: (d / "commit_success.txt").unlink(), r"its save never finished: no Orbax commit marker"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Steps 1 and 2 of a run (2 tracked), states distinct, on the (4, 2) mesh: copied per test."""
    root = tmp_path_factory.mktemp("saved")
    ckpt = make_ckpt(root)
    states = {s: make_state(seed=s) for s in (1, 2)}
    for s, state in states.items():
        ckpt.save(s, state, data_state={"next_step": s})
    ckpt.close()
    assert (root / TRACKER).read_text() == "2" and checkpoint.is_complete(root / "global_step_2")
    return root, {s: host(v) for s, v in states.items()}


def copy_run(saved, tmp_path) -> Path:
    root = tmp_path / "run"
    shutil.copytree(saved[0], root)
    return root


def test_the_listing_holds_every_file_of_a_finished_step(saved):
    root = saved[0]
    listed = json.loads((root / "global_step_2" / MANIFEST).read_text())
    on_disk = {f.relative_to(root / "global_step_2").as_posix(): f.stat().st_size
               for f in (root / "global_step_2").rglob("*") if f.is_file() and f.name != MANIFEST}
    assert listed == on_disk and any("/d/" in f for f in listed) and "data_process_0/metadata" in listed
    meta = checkpoint.read_meta(root / "global_step_2")
    assert meta["files_manifest"] == MANIFEST and meta["state_keys"] == ["opt_state", "params", "step"]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_step_is_not_resumed(saved, tmp_path, damage):
    root = copy_run(saved, tmp_path)
    step2 = root / "global_step_2"
    hurt, expected = DAMAGE[damage]
    hurt(step2)
    problems = checkpoint.step_problems(step2)
    assert problems and re.fullmatch(expected + r"( \(and \d+ more\))?", checkpoint.describe(problems)), problems

    # auto: the tracker names step 2; step 1 is resumed, and one line says why
    said = []
    settings = make_settings(root)
    ckpt = make_ckpt(root)
    fresh = make_state(seed=99)
    data_states = []  # what the trainer hands its data loader
    state = ckpt.resume(settings.checkpoint, fresh, jax.tree.map(lambda x: x.sharding, fresh),
                        restore_data=data_states.append, say=said.append)
    assert_identical(state, saved[1][1])
    assert data_states == [{"next_step": 1}]
    warnings = [line for line in said if "warning" in line]
    assert len(warnings) == 1 and re.fullmatch(rf"\[jaxsft\] warning: global_step_2 is incomplete \({expected}.*\); "
                                               r"resuming from global_step_1 instead", warnings[0]), said
    assert said[-1] == f"[jaxsft] resumed from {root / 'global_step_1'} at step 7"  # make_state's step counter

    # named: refused, naming the part
    named = make_settings(root, resume_mode="resume_path", resume_from_path=str(step2)).checkpoint
    with pytest.raises(CheckpointError, match=rf"trainer\.resume_from_path='{step2}' is an incomplete checkpoint "
                                              rf"\({expected}.*\); choose an earlier global_step_N"):
        resolve_resume(named)
    with pytest.raises(CheckpointError, match="it is an incomplete checkpoint"):
        ckpt.restore(step2, abstract(saved[1][1], (8, 1)))
    ckpt.close()

    # convert_to_hf: the step is refused; the run root gives the newest complete step
    from convert import to_hf

    with pytest.raises(CheckpointError, match=rf"{step2} is an incomplete checkpoint \({expected}"):
        to_hf.find_step_dir(str(step2))
    assert to_hf.find_step_dir(str(root)) == root / "global_step_1"


def test_the_only_finished_step_damaged_is_an_error_not_a_fresh_start(saved, tmp_path):
    """Nothing complete is left, but step 2 had been finished (tracked): auto refuses instead of
    restarting from the base weights (and then overwriting the damaged steps)."""
    root = copy_run(saved, tmp_path)
    shutil.rmtree(root / "global_step_1")
    shutil.rmtree(root / "global_step_2" / "state")
    with pytest.raises(CheckpointError, match=rf"{root} holds no complete checkpoint to resume from \(global_step_2 is "
                                              r"incomplete \(state/ is missing"):
        resolve_resume(make_settings(root).checkpoint)


def test_unfinished_first_save_starts_fresh_and_says_so(saved, tmp_path):
    """Killed after Orbax's commit but before the save was finished (no listing, no tracker):
    nothing was ever complete, so the run starts from the base model, saying why once."""
    root = copy_run(saved, tmp_path)
    shutil.rmtree(root / "global_step_2")
    (root / TRACKER).unlink()
    (root / "global_step_1" / MANIFEST).unlink()
    said = []
    assert resolve_resume(make_settings(root).checkpoint, warn=said.append) is None
    assert said == [f"global_step_1 is incomplete (its save never finished: no {MANIFEST}); starting from the base model"]


def test_tracker_on_a_damaged_step_and_newer_leftovers(saved, tmp_path):
    root = copy_run(saved, tmp_path)
    shutil.copytree(root / "global_step_2", root / "global_step_3")  # an abandoned run's, untracked
    largest_array_file(root / "global_step_2").unlink()
    said = []
    assert resolve_resume(make_settings(root).checkpoint, warn=said.append) == root / "global_step_1"
    assert said[0].startswith("ignoring global_step_3: newer than") and len(said) == 2
    assert said[1].startswith("global_step_2 is incomplete (state/ocdbt.process_0/d/")


def old_format(step_dir: Path, **meta_changes) -> None:
    """As written before the file listing existed (meta without files_manifest, no listing)."""
    path = step_dir / "meta" / "metadata"
    meta = json.loads(path.read_text())
    meta.pop("files_manifest")
    meta.update(meta_changes)
    path.write_text(json.dumps(meta))
    (step_dir / MANIFEST).unlink()


def test_steps_saved_before_the_listing(saved, tmp_path):
    """Checked by Orbax's metadata only: whole, they resume; a missing data_process_i of the meta's
    process_count is seen, and so is an array file holding array metadata; a deleted file of array
    data alone is not, and its read failure becomes one line instead of a tensorstore traceback."""
    root = copy_run(saved, tmp_path)
    step2 = root / "global_step_2"
    old_format(step2)
    assert checkpoint.is_complete(step2)
    restored, data_state, _ = make_ckpt(root).restore(step2, abstract(saved[1][2], (8, 1)))
    assert_identical(restored, saved[1][2]) and data_state == {"next_step": 2}

    old_format(root / "global_step_1", process_count=2)
    assert checkpoint.step_problems(root / "global_step_1") == ["data_process_1/ is missing"]

    (metadata_file,) = (step2 / "state" / "d").iterdir()  # Orbax's merged OCDBT index and array metadata
    metadata_file.unlink()
    assert checkpoint.step_problems(step2) == [f"state/d/{metadata_file.name} is missing"]

    bigger = tmp_path / "bigger"
    state = make_state(scale=100)  # large enough for the array data to have files of its own
    ckpt = make_ckpt(bigger)
    ckpt.save(1, state)
    ckpt.close()
    step_dir = bigger / "global_step_1"
    old_format(step_dir)
    largest_array_file(step_dir).unlink()
    assert checkpoint.is_complete(step_dir)
    with pytest.raises(CheckpointError) as e:
        make_ckpt(bigger).restore(step_dir, abstract(host(state), (8, 1)))
    message = str(e.value)
    assert message.startswith(f"cannot read {step_dir}: state/ cannot be read (FAILED_PRECONDITION: Error reading ")
    assert message.endswith("so the checkpoint is damaged; resume from an earlier global_step_N "
                            "(trainer.resume_from_path) or restore its files")
    assert "\n" not in message and "tensorstore_spec" not in message


def test_hf_export_damage(tmp_path, base_model):
    root = tmp_path / "run"
    ckpt = make_ckpt(root, base=base_model, save_contents=("model", "hf_model"))
    state = make_state()
    for s in (1, 2):
        ckpt.save(s, state, export=lambda: iter(state["params"].items()))
    ckpt.close()
    truncate(root / "global_step_2" / "huggingface" / "model.safetensors")
    assert "huggingface/model.safetensors holds" in checkpoint.describe(checkpoint.step_problems(root / "global_step_2"))
    assert checkpoint.latest_complete(root) == root / "global_step_1"


# ---- a full disk ---------------------------------------------------------------------------------

def test_full_disk_during_a_save_is_one_line_and_leaves_no_step(saved, tmp_path, monkeypatch, base_model):
    """ENOSPC where the export is written (sync, beside Orbax's background write): one sentence
    naming the directory, the free space and what one checkpoint needs; the unfinished step and
    every temporary directory are gone; step 2 stays complete and tracked."""
    root = copy_run(saved, tmp_path)
    ckpt = make_ckpt(root, base=base_model, save_contents=("model", "optimizer", "extra", "hf_model"))
    state = make_state()

    def full(tensors, out_dir, **kw):
        Path(out_dir).mkdir()
        (Path(out_dir) / "model.safetensors").write_bytes(b"\0" * 10)  # what got written before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device", str(out_dir))

    monkeypatch.setattr(checkpoint.hf, "write_hf_directory", full)
    with pytest.raises(CheckpointError) as e:
        ckpt.save(3, state, export=lambda: iter(()))
    need = ckpt.checkpoint_bytes(state)
    expected_mib = f"{need / 2**20:.1f} MiB"
    message = str(e.value)
    assert message.startswith(f"no space left on the disk of {root} while saving global_step_3: ")
    assert f"one checkpoint needs about {expected_mib}" in message and "global_step_2 is intact" in message
    assert "\n" not in message
    assert sorted(p.name for p in root.iterdir()) == ["global_step_1", "global_step_2", TRACKER]
    assert (root / TRACKER).read_text() == "2" and checkpoint.is_complete(root / "global_step_2")


def test_checkpoint_size_estimate_and_the_warning_at_start(tmp_path, monkeypatch):
    state = make_state()
    ckpt = make_ckpt(tmp_path)
    arrays = sum(x.nbytes for x in jax.tree.leaves(state))
    assert ckpt.checkpoint_bytes(state) == arrays
    model_only = make_ckpt(tmp_path, save_contents=("model",))
    assert model_only.checkpoint_bytes(state) == sum(x.nbytes for x in jax.tree.leaves(state["params"]))
    said = []
    ckpt.warn_if_short_of_space(state, say=said.append)
    assert said == []
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=arrays // 2))
    ckpt.warn_if_short_of_space(state, say=said.append)
    assert len(said) == 1 and said[0].startswith(f"[jaxsft] warning: {tmp_path} has ") and "one checkpoint needs" in said[0]


SMALL_DISK = textwrap.dedent("""
    import os, sys, json
    sys.path.insert(0, {tests!r})
    from test_checkpoint import make_ckpt, make_state
    from pathlib import Path
    from jaxsft import checkpoint
    root = Path({root!r})
    ckpt = make_ckpt(root, async_save={async_save!r}, max_ckpt_to_keep=None)
    ckpt.save(1, make_state(scale=1), data_state={{"next_step": 1}})
    ckpt.wait()
    try:
        ckpt.save(2, make_state(scale=16_000), data_state={{"next_step": 2}})  # ~49 MB: more than the disk
        ckpt.wait()
        print(json.dumps({{"error": None}}))
    except checkpoint.CheckpointError as e:
        print(json.dumps({{"error": str(e), "left": sorted(p.name for p in root.iterdir()),
                           "tracker": (root / checkpoint.TRACKER).read_text(),
                           "step1_complete": checkpoint.is_complete(root / "global_step_1")}}))
    sys.stdout.flush()
    os._exit(0)
""")


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
@pytest.mark.slow
def test_a_real_full_disk(tmp_path, async_save):
    """A 20 MiB tmpfs: step 1 (small) fits, step 2 (~49 MB of arrays) does not. Orbax's
    RESOURCE_EXHAUSTED (in its background thread, or at once) becomes one line; Orbax's
    temporary directory is removed; step 1 stays complete and tracked."""
    why = small_disk.unavailable(tmp_path)
    if why is not None:
        pytest.skip(f"no private tmpfs can be mounted here ({why}); the ENOSPC path is covered by the fake above")
    root = tmp_path / "run"
    root.mkdir()
    script = SMALL_DISK.format(tests=str(Path(__file__).parent), root=str(root), async_save=async_save)
    shell = f"mount -t tmpfs -o size=20m tmpfs {shlex.quote(str(root))} && exec {sys.executable} -c {shlex.quote(script)}"
    proc = subprocess.run(small_disk.command(shell), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["error"] is not None, proc.stderr[-3000:]
    assert result["error"].startswith(f"no space left on the disk of {root} while saving global_step_2: ")
    assert "one checkpoint needs about 46.9 MiB" in result["error"] and "global_step_1 is intact" in result["error"]
    assert result["left"] == ["global_step_1", TRACKER] and result["tracker"] == "1" and result["step1_complete"]
    assert "Traceback" not in proc.stderr and "RESOURCE_EXHAUSTED" not in proc.stderr, proc.stderr[-3000:]
