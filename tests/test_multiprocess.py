"""Multi-process training on jax.distributed (issue 7), end to end on localhost: two processes ×
4 emulated CPU devices (gloo collectives).

In one two-process job process 1 is SIGKILLed once the step-3 checkpoint is complete: process 0
must stop within a minute, saying why; then both are relaunched with the same commands. Against an unbroken two-process job (same processes, same
collectives, same order) it must be bit-identical: every step's loss and grad norm, and the
exported weights. Against one process × 8 devices it can only agree to float32 rounding: the
cross-process all-reduce (gloo) sums in another order than the in-process one, and Adam turns the
rounding noise of a gradient that is zero in exact arithmetic (the k_proj bias: softmax ignores a
shift shared by every key) into steps of up to the learning rate — the bounds below are derived
from that arithmetic, not measured. Other jobs lose process 1 mid-run (killed, or frozen): process
0 must exit non-zero within a minute, saying why (killed: the job above; frozen: a job of its own).
"""

from __future__ import annotations

import math
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from e2e import ROOT, env_for, free_port, losses, metrics, run_train, train_args

from jaxsft.checkpoint import TRACKER

pytestmark = pytest.mark.slow

# 48 samples, 8 per step → 6 steps; saves at 3 and 6 (the last); validation at the end.
FAST = ("--config.data.max_length=256", "--config.data.train_batch_size=8", "--config.data.micro_batch_size_per_gpu=1",
        "--config.data.packing=none", "--config.data.train_max_samples=48", "--config.trainer.test_freq=-1",
        "--config.trainer.save_freq=3")
LAST_STEP = 6
# Losses, one process vs two: each step's loss is a float32 sum whose order differs (a few ulps of
# the sum, all terms positive); the parameters it is computed from differ by rounding carried
# through the steps, except where Adam amplifies it, in directions the loss does not depend on.
# So at most 4 ulps per step run so far: 4 · LAST_STEP · eps.
REL = 4 * LAST_STEP * float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def reference(base_model, tmp_path_factory):
    """One process × 8 devices, unbroken: its run directory."""
    run_dir = tmp_path_factory.mktemp("one_process")
    run_train(run_dir, base_model, *FAST)
    return run_dir


def launch(run_dir: Path, base_model: Path, **env) -> list[tuple[subprocess.Popen, Path]]:
    """Both processes of a two-process job (4 devices each), output to run_dir/../NAME.pI.log."""
    port = free_port()
    procs = []
    for i in range(2):
        log = run_dir.parent / f"{run_dir.name}.p{i}.{time.monotonic_ns()}.log"
        e = env_for(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i, **env)
        with open(log, "w") as f:  # a file, not a pipe: nobody reads while we poll
            procs.append((subprocess.Popen(train_args(run_dir, base_model, *FAST), cwd=ROOT, env=e, stdout=f,
                                           stderr=subprocess.STDOUT, text=True), log))
    return procs


def finish(procs, timeout: float = 300) -> list[str]:
    """Wait for every process; their outputs. Fails with the logs if one exits non-zero."""
    for p, _ in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(procs)
    outs = [log.read_text() for _, log in procs]
    for (p, _), out in zip(procs, outs):
        assert p.returncode == 0, f"a process exited {p.returncode}:\n{out[-6000:]}"
    return outs


def kill(procs) -> None:
    for p, _ in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    for p, _ in procs:
        p.wait()


def wait_until(cond, procs, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        exited = [p.returncode for p, _ in procs if p.poll() is not None]
        if exited or time.monotonic() > deadline:
            kill(procs)
            raise AssertionError(f"{what}: not seen (exit codes {exited}):\n{procs[0][1].read_text()[-6000:]}")
        time.sleep(0.05)


def assert_close(got: dict[int, float], want: dict[int, float], steps) -> None:
    for s in steps:
        assert math.isclose(got[s], want[s], rel_tol=REL, abs_tol=0), f"step {s}: {got[s]!r} vs {want[s]!r}"


def rows(run_dir, key: str) -> dict[int, float]:
    return {m["step"]: m["data"][key] for m in metrics(run_dir) if key in m["data"]}


@pytest.fixture(scope="module")
def two_process_reference(base_model, tmp_path_factory):
    """An unbroken two-process job: its run directory."""
    run_dir = tmp_path_factory.mktemp("two_processes_unbroken")
    finish(launch(run_dir, base_model))
    return run_dir


@pytest.fixture(scope="module")
def killed_and_resumed(base_model, tmp_path_factory):
    """A two-process job whose process 1 is SIGKILLed once step 3's checkpoint is complete; process
    0 is given a minute to stop by itself; then both are relaunched with the same commands.
    Returns (run_dir, losses before the kill, outputs after, (process 0's exit status or None if
    it was still running after 60 s, seconds it took, its output))."""
    run_dir = tmp_path_factory.mktemp("two_processes")
    procs = launch(run_dir, base_model, JAXSFT_HEARTBEAT_TIMEOUT_S=10)
    tracker = run_dir / TRACKER
    wait_until(lambda: tracker.is_file() and tracker.read_text().strip() == "3", procs, "checkpoint of step 3")
    procs[1][0].send_signal(signal.SIGKILL)
    start = time.monotonic()
    try:
        rc = procs[0][0].wait(timeout=60)
    except subprocess.TimeoutExpired:
        rc = None
    took = time.monotonic() - start
    kill(procs)
    stopped = (rc, took, procs[0][1].read_text())
    before = losses(run_dir)
    outs = finish(launch(run_dir, base_model))
    return run_dir, before, outs, stopped


def test_two_processes_log_the_losses_of_one(reference, killed_and_resumed):
    run_dir, before, _, _ = killed_and_resumed
    want = losses(reference)
    assert sorted(want) == list(range(1, LAST_STEP + 1))
    assert set(before) >= {1, 2, 3}
    assert_close(before, want, [1, 2, 3])
    # Token counts, hence throughput and MFU, cover both processes' rows.
    got_tokens, want_tokens = rows(run_dir, "train/loss_tokens"), rows(reference, "train/loss_tokens")
    assert all(got_tokens[s] == want_tokens[s] for s in want_tokens)
    assert_close(rows(run_dir, "val/loss"), rows(reference, "val/loss"), [LAST_STEP])


def test_killed_job_resumes_with_the_same_losses(reference, killed_and_resumed):
    run_dir, _, outs, _ = killed_and_resumed
    assert f"resumed from {run_dir / 'global_step_3'} at step 3" in outs[0]
    got = losses(run_dir)
    assert sorted(got) == list(range(1, LAST_STEP + 1))
    assert_close(got, losses(reference), range(1, LAST_STEP + 1))
    # Every process's data-iterator state is saved; the tracker and the HF export are process 0's.
    step_dir = run_dir / f"global_step_{LAST_STEP}"
    assert (step_dir / "data_process_0").is_dir() and (step_dir / "data_process_1").is_dir()
    assert (run_dir / TRACKER).read_text().strip() == str(LAST_STEP)
    got_hf, want_hf = export(run_dir), export(reference)
    assert sorted(got_hf) == sorted(want_hf)
    # Adam's step per element is at most lr · max|m̂/√v̂| (Cauchy-Schwarz over the gradients so far:
    # (1-β1)/(1-β1^t) · √(Σ_k<t (β1²/β2)^k) · √((1-β2)/(1-β2^t))), plus weight decay; two runs that
    # start equal differ by at most twice the sum of those steps, whatever rounding did.
    lrs = rows(reference, "train/lr")
    b1, b2, wd = 0.9, 0.95, 0.01  # verl's AdamW defaults (optim.betas, optim.weight_decay)
    bound = 0.0
    for t in range(1, LAST_STEP + 1):
        ratio = (1 - b1) / (1 - b1 ** t) * math.sqrt(sum((b1 * b1 / b2) ** k for k in range(t))) \
            * math.sqrt((1 - b2) / (1 - b2 ** t))
        bound = bound * (1 + lrs[t] * wd) + 2 * lrs[t] * ratio
    for name in want_hf:
        err = float(np.max(np.abs(got_hf[name].astype(np.float64) - want_hf[name])))
        assert err <= bound, f"{name}: {err:.3g} > {bound:.3g}"


def test_killed_two_process_job_equals_an_unbroken_one_bit_for_bit(two_process_reference, killed_and_resumed):
    """Same processes, same collectives in the same order: nothing may differ, not by one ulp."""
    run_dir, _, _, _ = killed_and_resumed
    for key in ("train/loss", "train/grad_norm", "train/lr", "train/loss_tokens"):
        got, want = rows(run_dir, key), rows(two_process_reference, key)
        assert sorted(want) == list(range(1, LAST_STEP + 1)), key
        assert got == want, f"{key}: " + ", ".join(f"step {s}: {got.get(s)!r} vs {want[s]!r}"
                                                   for s in want if got.get(s) != want[s])
    assert rows(run_dir, "val/loss") == rows(two_process_reference, "val/loss")
    got_hf, want_hf = export(run_dir), export(two_process_reference)
    assert sorted(got_hf) == sorted(want_hf)
    for name in want_hf:
        assert np.array_equal(got_hf[name], want_hf[name]), name


def export(run_dir) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(run_dir / f"global_step_{LAST_STEP}" / "huggingface" / "model.safetensors")


def test_only_process_0_reports(killed_and_resumed):
    _, _, outs, _ = killed_and_resumed
    assert f"step:{LAST_STEP} - train/loss:" in outs[0] and f"[jaxsft] done at step {LAST_STEP}" in outs[0]
    assert "train/loss" not in outs[1] and "[jaxsft]" not in outs[1]


def test_a_killed_process_stops_the_other(killed_and_resumed):
    """Process 1 killed (its sockets close: the next collective fails) after step 3's checkpoint:
    process 0, also the coordinator, exits non-zero within a minute with a message, instead of
    waiting forever in a collective; and the relaunch resumes (the tests above)."""
    rc, took, out = killed_and_resumed[3]
    assert rc is not None, f"process 0 still running 60 s after process 1 was killed:\n{out[-4000:]}"
    _assert_stopped(rc, out)
    print(f"SIGKILL: process 0 exited {rc} {took:.1f} s after process 1 was hit")


def test_a_frozen_process_stops_the_other(base_model, tmp_path):
    """Process 1 frozen (SIGSTOP: its sockets stay open, only its missing heartbeats tell) after
    step 1: process 0 exits non-zero within a minute with a message."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    procs = launch(run_dir, base_model, JAXSFT_HEARTBEAT_TIMEOUT_S=10)
    log = run_dir / "metrics.jsonl"
    wait_until(lambda: log.is_file() and '"train/loss"' in log.read_text(), procs, "step 1")
    procs[1][0].send_signal(signal.SIGSTOP)
    start = time.monotonic()
    try:
        rc = procs[0][0].wait(timeout=60)
    except subprocess.TimeoutExpired:
        kill(procs)
        raise AssertionError(f"process 0 still running 60 s after process 1 was frozen:\n{procs[0][1].read_text()[-4000:]}")
    took = time.monotonic() - start
    kill(procs)
    _assert_stopped(rc, procs[0][1].read_text())
    print(f"SIGSTOP: process 0 exited {rc} {took:.1f} s after process 1 was hit")


def _assert_stopped(rc: int, out: str) -> None:
    assert rc != 0, out[-4000:]
    assert "[jaxsft] process 0 of 2 stopped" in out or "another task died" in out, out[-4000:]


def test_mesh_must_give_each_process_its_dp_block(monkeypatch):
    """The loader fills process p's rows for dp block p; a mesh that interleaves processes
    (as a topology-aware order could) is refused instead of silently mixing dp ranks' rows."""
    from types import SimpleNamespace

    import jax

    from jaxsft import distributed

    def mesh(owners):  # dp = len(owners), sp = 2
        devices = np.array([[SimpleNamespace(process_index=p)] * 2 for p in owners], dtype=object)
        return SimpleNamespace(shape={"dp": len(owners), "sp": 2}, devices=devices)

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    distributed.check_process_rows(mesh([0, 0, 1, 1]))
    with pytest.raises(RuntimeError, match="puts dp rank 1 on the devices of process"):
        distributed.check_process_rows(mesh([0, 1, 0, 1]))


def test_one_task_per_node_keeps_every_gpu(monkeypatch):
    """JAX would give a SLURM / Open MPI task only the GPU of its local rank."""
    from jaxsft.distributed import one_process_per_host_devices

    for k in ("JAX_LOCAL_DEVICE_IDS", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_STEP_NUM_NODES",
              "OMPI_COMM_WORLD_LOCAL_SIZE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(k, raising=False)
    assert one_process_per_host_devices() is None  # no launcher: JAX's default
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[01-02]")
    monkeypatch.setenv("SLURM_STEP_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert one_process_per_host_devices() is None  # a task per GPU: JAX's default is right
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert one_process_per_host_devices() == [0, 1, 2, 3]
    monkeypatch.setenv("JAX_LOCAL_DEVICE_IDS", "0")
    assert one_process_per_host_devices() is None  # the user's choice, read by JAX
