"""The command line: verl's launch line runs on verl's defaults, every mistake is one line (exit 2,
nothing run), the resolved configuration is shown and recorded, one run per directory.

The mistakes go through the command's own `jaxsft.train.main` in this process (tests/runs.py),
which prints the line and returns the exit status; a real process shows the status (and that no
traceback reaches stderr) for a run directory it may not write, and for a second run refused while
another process holds the directory."""

import json
import os
import signal
import subprocess
import sys

import pytest
import runs
import yaml
from e2e import ROOT, env_for, metrics, start_train, train_args
from unprivileged import bound

from jaxsft import bundled
from jaxsft.checkpoint import read_meta

TRAIN, VAL = bundled.path("humaneval_chat", "train.parquet"), bundled.path("humaneval_chat", "val.parquet")


def jaxsft(*args, cwd=ROOT, devices=1, **env):
    return subprocess.run([sys.executable, "-m", "jaxsft.train", *args], cwd=cwd, env=env_for(devices, **env),
                          capture_output=True, text=True, timeout=600)


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("jaxsft: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def in_process(*args, cwd):
    return runs.main(args, cwd=cwd)


@pytest.mark.parametrize("override, expect", [
    ("--config.data.truncation=middle", "data.truncation='middle' (command line) is not one of error, left, right"),
    ("--config.data.train_batch_size=12", "data.train_batch_size=12 is not divisible by the data-parallel size 8"),
    ("--config.data.train_files=/nonexistent/train.parquet", "/nonexistent/train.parquet: file not found"),
    ("--config.model.remat_policy=sometimes", "model.remat_policy"),
    ("--config.optim.lr=abc", "optim.lr='abc' (command line) is not a number"),
    ("stray", "unexpected argument 'stray'"),
    ("data.train_batchsize=4", "unknown setting 'data.train_batchsize'; did you mean data.train_batch_size"),
    ("--config.optim.lrr=1", "unknown setting 'optim.lrr'; did you mean optim.lr"),
    ("--bogus", "unknown flag '--bogus'"),
    ("model.build_tiny_from=/tmp/x", "model.build_tiny_from is set by the smoke recipe only"),
    ("--config.model.attn_implementation=flash", "model.attn_implementation=flash needs a CUDA GPU of compute "
     "capability 8.0 (sm80) or newer; this machine's devices are cpu (cpu): use model.attn_implementation=auto"),
])
def test_bad_input_is_one_line_and_exit_2(base_model, tmp_path, override, expect):
    """In this process (its 8 devices: the batch of 12 meets a data-parallel size of 8)."""
    proc = runs.train(tmp_path / "run", base_model, override, check=False)
    assert expect in one_error_line(proc)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_model_directory_the_user_gave_is_never_created(tmp_path):
    """With the smoke recipe, or with no recipe (verl's defaults): a missing model directory is an
    error naming the key; no tiny model appears at the user's path."""
    missing = tmp_path / "Qwen" / "Qwen2.5-Coder-7B-Instruct"
    for args in (["--config=smoke", *runs.EIGHT_DEVICES, f"model.partial_pretrain={missing}"],
                 [f"model.partial_pretrain={missing}", f"data.train_files={TRAIN}", "trainer.device=cpu",
                  "trainer.logger=[console]", f"trainer.default_local_dir={tmp_path / 'run'}"]):
        line = one_error_line(in_process(*args, cwd=tmp_path))
        assert f"model.partial_pretrain='{missing}' is not a Hugging Face model directory" in line
        assert not missing.exists()


@pytest.mark.slow
def test_seed_launch_line_runs_on_verls_defaults(base_model, tmp_path):
    """shared/seeds/001 §6's verl launch line, pasted as it is, with local paths, the sizes shrunk
    (max_length, batch, steps) and trainer.device=cpu: it trains on verl's defaults underneath,
    records them in RUN/config.yaml, says which settings change nothing, logs to (a stand-in) wandb."""
    run = tmp_path / "run"
    seed_line = [
        f"data.train_files={TRAIN}", f"data.val_files={VAL}", "data.multiturn.enable=true",
        "data.multiturn.messages_key=messages", "data.max_length=1280", "data.truncation=right",
        "data.train_batch_size=8", "data.micro_batch_size_per_gpu=2", "data.balance_dp_token=True",
        f"model.partial_pretrain={base_model}", "model.trust_remote_code=true", "model.enable_gradient_checkpointing=true",
        "model.strategy=fsdp2", "model.fsdp_config.model_dtype=bf16", "optim.lr=2e-5", "optim.betas=[0.9,0.95]",
        "optim.weight_decay=0.01", "optim.lr_warmup_steps_ratio=0.05", "optim.clip_grad=1.0", "optim.lr_scheduler=cosine",
        f"trainer.default_local_dir={run}", "trainer.project_name=rlvr_coding_model",
        "trainer.experiment_name=phase1_sft_qwen7b_coder", "trainer.total_epochs=2", "trainer.save_freq=500",
        "trainer.test_freq=500", "trainer.max_ckpt_to_keep=5", 'trainer.logger=["console","wandb"]', "trainer.seed=42",
        "trainer.resume_mode=auto", 'trainer.checkpoint.save_contents=["model","optimizer","extra","hf_model"]']
    log = tmp_path / "wandb.jsonl"
    proc = jaxsft(*seed_line, "trainer.device=cpu", "trainer.total_training_steps=2", devices=2,
                  PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'fake_wandb'}", FAKE_WANDB_LOG=log)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "note: data.balance_dp_token=true has no effect under trainer.loss_normalization=global_tokens" in proc.stdout
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["optim"]["lr"] == 2e-5 and resolved["model"]["param_dtype"] == "bfloat16"
    # verl's defaults for what the line does not say
    assert resolved["model"]["compute_dtype"] == "bfloat16" and resolved["data"]["packing"] == "none"
    assert resolved["use_remove_padding"] is False and resolved["model"]["remat_policy"] == "minimal"
    assert resolved["trainer"]["loss_normalization"] == "global_tokens" and resolved["trainer"]["nnodes"] == 1
    assert resolved["data"]["micro_batch_size"] is None and resolved["trainer"]["total_training_steps"] == 2
    assert read_meta(run / "global_step_2")["config"] == resolved
    assert (run / "global_step_2" / "huggingface" / "model.safetensors").is_file()
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[0]["call"] == "init" and calls[0]["project"] == "rlvr_coding_model"
    assert calls[0]["name"] == "phase1_sft_qwen7b_coder" and calls[0]["config"]["optim"]["lr"] == 2e-5
    logged = {c["step"]: c["row"] for c in calls if c["call"] == "log" and "train/loss" in c["row"]}
    assert sorted(logged) == [1, 2] and logged[1]["train/lr"] == 0.0  # int(36 × 0.05) = 1 warmup step
    assert [c["call"] for c in calls][-1] == "finish"


def test_print_config_and_a_recipe_by_name_from_any_directory(tmp_path):
    proc = in_process("--config", "qwen7b", "--print_config", "data.train_files=/d.parquet", "model.partial_pretrain=/m",
                  "trainer.default_local_dir=${oc.env:HOME}/ckpt", "data.val_files=null", "trainer.max_ckpt_to_keep=null",
                  "use_remove_padding=true", "model.enable_gradient_checkpointing=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = yaml.safe_load(proc.stdout)
    assert printed["model"]["param_dtype"] == "bfloat16" and printed["data"]["max_length"] == 4096  # the recipe
    assert printed["trainer"]["default_local_dir"] == f"{os.environ['HOME']}/ckpt"
    assert printed["data"]["val_files"] is None and printed["trainer"]["max_ckpt_to_keep"] is None
    assert printed["data"]["packing"] == "first_fit" and printed["model"]["remat_policy"] == "none"
    assert not list(tmp_path.iterdir())  # nothing run, nothing written
    help_text = in_process("--help", cwd=tmp_path)
    assert help_text.returncode == 0 and "    optim.min_lr_ratio = 0.0\n" in help_text.stdout


@pytest.mark.slow
def test_one_run_per_directory_and_the_lock_does_not_outlive_its_run(base_model, tmp_path):
    """A second run on a directory in use (by another process) is refused (naming the holder) before
    it loads anything; after the first is killed with SIGKILL the directory is free again. The
    second launch is a process too: the exit status of a refused launch, seen from outside. (The
    third, in this process on its 8 devices, left Orbax restore coroutines that Python reports as
    "Exception ignored" when they are collected: kept a process of one device until that is understood.)"""
    first = start_train(tmp_path, base_model, "trainer.save_freq=1", "data.train_max_samples=32",
                        devices=1, hook="pause:1")
    for line in first.stdout:
        if "test hook: paused after step 1" in line:
            break
    second = subprocess.run(train_args(tmp_path, base_model), cwd=ROOT, env=env_for(1), capture_output=True,
                            text=True, timeout=300)
    line = one_error_line(second)
    assert f"trainer.default_local_dir='{tmp_path}' is in use by another run (pid {first.pid} on " in line
    first.send_signal(signal.SIGKILL)
    first.wait()
    again = subprocess.run(train_args(tmp_path, base_model, "trainer.total_training_steps=2",
                                      "data.train_max_samples=32"), cwd=ROOT, env=env_for(1), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-3000:]
    steps = [m["step"] for m in metrics(tmp_path) if "train/loss" in m["data"]]
    assert steps == [1, 2]  # no step logged twice


def test_recipe_file_missing_or_broken(tmp_path):
    broken = tmp_path / "recipe.py"
    broken.write_text("def get_config(:\n")
    line = one_error_line(in_process(f"--config={tmp_path / 'nope.py'}", cwd=tmp_path))
    assert line == (f"jaxsft: error: --config '{tmp_path / 'nope.py'}': no such recipe file; give a path or one of: "
                    "qwen05b, qwen3_8b, qwen7b, smoke")
    line = one_error_line(in_process(f"--config={broken}", cwd=tmp_path))
    assert line == f"jaxsft: error: --config {broken}: the recipe failed to load (SyntaxError: invalid syntax (recipe.py, line 1))"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.py"]


def test_read_only_run_directory_before_any_heavy_work(base_model, tmp_path):
    """Run as a user whom permissions bind (tests/unprivileged.py: root with its file overrides
    dropped): one line, exit 2, and neither the model nor the data was touched."""
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        proc = subprocess.run(bound(train_args(run, base_model)), cwd=ROOT, env=env_for(1), capture_output=True,
                              text=True, timeout=300)
    finally:
        run.chmod(0o755)
    assert one_error_line(proc) == f"jaxsft: error: trainer.default_local_dir='{run}' is not writable (Permission denied)"
    assert "train data:" not in proc.stdout and not list(run.iterdir())
