"""The command line: bad input stops with one line naming the key or file (exit 2, nothing run);
verl's Hydra spelling of settings is understood."""

import subprocess

import pytest

from e2e import ROOT, env_for, metrics, train_args
from jaxsft.checkpoint import read_meta


@pytest.mark.parametrize("devices, override, expect", [
    (1, "--config.data.truncation=middle", "data.truncation='middle' is not one of error, left, right"),
    (8, "--config.data.train_batch_size=12", "data.train_batch_size=12 is not divisible by the data-parallel size 8"),
    (1, "--config.data.train_files=/nonexistent/train.parquet", "/nonexistent/train.parquet: file not found"),
    (1, "--config.model.remat_policy=sometimes", "model.remat_policy"),
    (1, "--config.model.build_tiny_from=", "is not a Hugging Face model directory (no config.json there)"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, devices, override, expect):
    proc = subprocess.run(train_args(tmp_path / "run", tmp_path / "base", override), cwd=ROOT, env=env_for(devices),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("jaxsft: error:")]
    assert len(errors) == 1 and expect in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _run(tmp_path, *args, devices=1):
    return subprocess.run(train_args(tmp_path / "run", tmp_path / "base", *args), cwd=ROOT, env=env_for(devices),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("arg, expect", [
    ("stray", "unexpected argument 'stray'"),
    ("data.train_batchsize=4", "unknown setting 'data.train_batchsize'; did you mean data.train_batch_size"),
    ("--config.optim.lrr=1", "unknown setting 'optim.lrr'; did you mean optim.lr"),
])
def test_stray_arguments_and_unknown_keys_are_refused(tmp_path, arg, expect):
    proc = _run(tmp_path, arg)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(f"jaxsft: error: {expect}"), \
        proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_verl_launch_line_is_understood(tmp_path):
    """verl's Hydra spelling (as in the seed's run_sft.sh) trains: KEY=VALUE, +KEY=VALUE, lists."""
    proc = _run(tmp_path, "data.max_length=256", "data.truncation=right", "+data.ignore_input_ids_mismatch=true",
                "data.balance_dp_token=True", "optim.betas=[0.9,0.95]", "model.trust_remote_code=true",
                "optim.lr=2e-5", 'trainer.logger=["console","file"]', "trainer.total_training_steps=1",
                "trainer.save_freq=-1", "trainer.checkpoint.save_contents=[model,optimizer,extra]",
                "+data.apply_chat_template_kwargs.enable_thinking=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "over data.max_length=256 (truncation=right)" in proc.stdout
    rows = metrics(tmp_path / "run")
    assert [r["data"]["train/lr"] for r in rows if "train/lr" in r["data"]] == [pytest.approx(2e-5)]
    saved = read_meta(tmp_path / "run" / "global_step_1")["config"]
    assert saved["data"]["apply_chat_template_kwargs"] == {"enable_thinking": False}
    assert saved["optim"]["betas"] == [0.9, 0.95] and saved["data"]["balance_dp_token"] is True
    assert saved["trainer"]["checkpoint"]["save_contents"] == ["model", "optimizer", "extra"]
