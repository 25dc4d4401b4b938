"""`python -m jaxsft.train` with the smoke recipe, as the README runs it: one CPU device, the
bundled tokenizer and chats, a tiny random Qwen2 written as an HF directory first (at the recipe's
own relative path, under the working directory); run again, it resumes from its last step. With
XLA's full CPU optimisation, as users run it (the other tests compile with most of it off)."""

import math
import subprocess
import sys
import time

import pytest

from e2e import CPU_TEST_FLAGS, env_for, metrics

pytestmark = pytest.mark.slow  # two launches of the smoke recipe

KEYS = ("train/loss", "train/lr", "train/grad_norm", "train/time(s)", "train/tokens_per_sec",
        "train/loss_tokens_per_sec", "train/loss_tokens", "train/mfu", "train/epoch")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    t0 = time.perf_counter()
    # peak_flops_per_device: CPUs have no known peak, so give one to have train/mfu logged.
    proc = smoke(root, "trainer.peak_flops_per_device=1e11")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root / "runs" / "smoke", proc, time.perf_counter() - t0


def smoke(cwd, *settings):
    # As users run it: XLA's full CPU optimisation and its default emitters (tests/conftest.py and
    # e2e.CPU_TEST_FLAGS change both elsewhere).
    env = {k: v for k, v in env_for(1).items() if k != "JAX_DISABLE_MOST_OPTIMIZATIONS"}
    env["XLA_FLAGS"] = env["XLA_FLAGS"].replace(CPU_TEST_FLAGS, "").strip()
    return subprocess.run([sys.executable, "-m", "jaxsft.train", "--config", "smoke", *settings], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


def test_smoke_loss_falls_and_every_metric_is_logged(smoke_run):
    run_dir, proc, seconds = smoke_run
    rows = metrics(run_dir)
    train = [r for r in rows if "train/loss" in r["data"]]
    assert [r["step"] for r in train] == list(range(1, 10)), "one line per step, steps 1..9"
    for r in train:
        missing = [k for k in KEYS if k not in r["data"]]
        assert not missing, (r["step"], missing)
        assert all(math.isfinite(r["data"][k]) for k in KEYS)
    losses = [r["data"]["train/loss"] for r in train]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2, losses
    val = [r for r in rows if "val/loss" in r["data"]]
    assert [r["step"] for r in val] == [9] and val[0]["data"]["val/loss"] < losses[0]
    assert any("perf/compile_and_first_step(s)" in r["data"] for r in rows)
    assert "step:1 - " in proc.stdout and "train/loss:" in proc.stdout
    print(f"smoke run: {seconds:.1f} s wall for 9 steps; losses {losses[0]:.3f} -> {losses[-1]:.3f}")


def test_smoke_saves_and_exports(smoke_run):
    run_dir, _, _ = smoke_run
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "9"
    export = run_dir / "global_step_9" / "huggingface"
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (export / name).exists(), name


def test_smoke_run_again_resumes_and_logs_nothing_twice(smoke_run):
    """The same command in the same directory (relative paths): resumes from step 9, the last."""
    run_dir, _, _ = smoke_run
    again = smoke(run_dir.parent.parent)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"resumed from {run_dir.resolve()}/global_step_9 at step 9" in again.stdout
    steps = [r["step"] for r in metrics(run_dir) if "train/loss" in r["data"]]
    assert steps == list(range(1, 10))
