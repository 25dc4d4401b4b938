"""Per-step metrics: read one step late, the time of a step excludes validation and saving,
trainer.log_every thins the rows (the last step always logged), non-finite norms are said."""

import jax.numpy as jnp
import numpy as np

from jaxsft import reporting


class FakeLogger:
    def __init__(self):
        self.rows, self.lines = [], []

    def log(self, step, row):
        self.rows.append((step, row))

    def say(self, line):
        self.lines.append(line)


class FakeFlops:
    def step_flops(self, lengths):
        return 1000.0 * float(np.sum(lengths))


def metrics(loss, grad_norm=1.0):
    return {"loss": jnp.float32(loss), "grad_norm": jnp.float32(grad_norm), "lr": jnp.float32(0.1),
            "loss_tokens": jnp.float32(10)}


def test_step_times_exclude_validation_and_saves(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(reporting.time, "perf_counter", lambda: clock[0])
    logger = FakeLogger()
    r = reporting.StepReporter(logger, FakeFlops(), 1e6, log_every=1, last_step=3)
    lengths = np.array([5, 5])
    clock[0] = 101.0
    r.dispatched(1, metrics(3.0), 0, lengths, t_dispatch=100.0)  # first step: waits, includes compilation
    clock[0] = 103.0
    r.dispatched(2, metrics(2.0), 0, lengths, t_dispatch=101.0)
    r.flush()  # validation or a save follows: step 2 ends at 103
    clock[0] = 150.0  # 47 s of validation + save
    r.restart_clock()
    clock[0] = 152.5
    r.dispatched(3, metrics(1.0), 0, lengths, t_dispatch=150.0)
    r.flush()
    train = {step: row for step, row in logger.rows if "train/loss" in row}
    assert [row["train/time(s)"] for row in train.values()] == [1.0, 2.0, 2.5]
    assert train[3]["train/tokens_per_sec"] == 10 / 2.5 and train[3]["train/mfu"] == 10_000 / 2.5 / 1e6
    assert logger.rows[0] == (1, {"perf/compile_and_first_step(s)": 1.0})


def test_log_every_keeps_the_last_step_and_says_non_finite_norms():
    logger = FakeLogger()
    r = reporting.StepReporter(logger, FakeFlops(), None, log_every=2, last_step=5)
    for step in range(1, 6):
        r.dispatched(step, metrics(1.0, grad_norm=float("nan") if step == 3 else 1.0), 0, np.array([4]), 0.0)
    r.flush()
    assert [step for step, row in logger.rows if "train/loss" in row] == [2, 4, 5]
    assert "train/mfu" not in logger.rows[-1][1]  # no peak FLOP/s known: no MFU
    assert logger.lines == ["[jaxsft] step 3: non-finite gradient norm; update skipped (lr schedule advanced)"]


def test_per_source_rows_of_a_mixed_step():
    """train/loss/SOURCE = the source's loss sum ÷ its loss tokens; a source absent from the step
    has its token count (0) and no loss row."""
    logger = FakeLogger()
    r = reporting.StepReporter(logger, FakeFlops(), None, log_every=1, last_step=1, sources=("math", "code", "chat"))
    m = {**metrics(2.0), "source_loss_sums": jnp.array([6.0, 14.0, 0.0]), "source_loss_tokens": jnp.array([4.0, 6.0, 0.0])}
    r.dispatched(1, m, 0, np.array([5, 5]), t_dispatch=0.0)
    row = logger.rows[-1][1]
    assert row["train/loss/math"] == 1.5 and row["train/loss/code"] == 14 / 6 and "train/loss/chat" not in row
    assert (row["train/loss_tokens/math"], row["train/loss_tokens/code"], row["train/loss_tokens/chat"]) == (4, 6, 0)
