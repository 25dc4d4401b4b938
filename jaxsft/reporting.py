"""Per-step train metrics: read one step late, timed without validation and saves.

The train step returns device scalars; reading them right away would make the host wait for the
device every step. So step g's metrics are read after step g+1 has been dispatched, and its time
is the interval between the two reads. Step 1's time includes compilation (also logged alone as
`perf/compile_and_first_step(s)`). Before validation or a save the pending step is read (`flush`),
and after them the clock restarts (`restart_clock`), so neither is counted as training time.

A step that mixes several training files also reports, per source, `train/loss/SOURCE` (Σ token
losses of its samples ÷ its loss tokens) and `train/loss_tokens/SOURCE` (jaxsft.data.mixture.
source_names: SOURCE is the file's stem); a source without loss tokens in the step has no loss row.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np

from jaxsft import metrics


class StepReporter:
    def __init__(self, logger, flop_counter, peak_flops_total: float | None, *, log_every: int, last_step: int,
                 sources: tuple[str, ...] = ()):
        self.logger, self.flops, self.peak, self.sources = logger, flop_counter, peak_flops_total, tuple(sources)
        self.log_every, self.last_step = log_every, last_step
        self._pending = None  # (step, device metrics, epoch, sample lengths)
        self._first = True
        self._clock = time.perf_counter()

    @classmethod
    def for_run(cls, logger, settings, model_config, *, last_step: int, sources: tuple[str, ...] = ()) -> "StepReporter":
        """`sources`: the metric names of the sources a mixed run's step reports the loss of."""
        t = settings.trainer
        peak = t.peak_flops_per_device or metrics.peak_flops_per_device(jax.devices()[0])
        return cls(logger, metrics.FlopCounter(model_config), peak and peak * jax.device_count(), log_every=t.log_every,
                   last_step=last_step, sources=sources)

    def dispatched(self, step: int, metrics, epoch: int, lengths: np.ndarray, t_dispatch: float) -> None:
        """Step `step` was dispatched at `t_dispatch`; report the one before it (or, for the first
        step of this launch, wait for it and report it with its compile time)."""
        if self._first:
            jax.block_until_ready(metrics)
            self.logger.log(step, {"perf/compile_and_first_step(s)": time.perf_counter() - t_dispatch})
            self._first, self._clock = False, t_dispatch
            self._report((step, metrics, epoch, lengths))
            return
        self.flush()
        self._pending = (step, metrics, epoch, lengths)

    def flush(self) -> None:
        """Read and log the pending step now (before validation, a save, or the end)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._report(pending)

    def restart_clock(self) -> None:
        self._clock = time.perf_counter()

    def validated(self, step: int, total: float, count: float) -> None:
        """The token-weighted validation loss (Σ CE, Σ loss tokens); nothing is logged when nothing
        was scored."""
        if count:
            self.logger.log(step, {"val/loss": total / count})
        else:
            self.logger.say_once("[jaxsft] validation: no loss tokens in data.val_files (every row's targets are cut "
                                 "or absent); val/loss is not logged")

    def _report(self, pending) -> None:
        step, metrics, epoch, lengths = pending
        m = jax.device_get(metrics)
        now = time.perf_counter()
        dt, self._clock = now - self._clock, now
        grad_norm = float(m["grad_norm"])
        if not math.isfinite(grad_norm):
            self.logger.say(f"[jaxsft] step {step}: non-finite gradient norm; update skipped (lr schedule advanced)")
        if step % self.log_every and step != self.last_step:
            return
        row = {"train/loss": float(m["loss"]), "train/lr": float(m["lr"]), "train/grad_norm": grad_norm,
               "train/loss_tokens": float(m["loss_tokens"]), "train/time(s)": dt,
               "train/tokens_per_sec": float(np.sum(lengths)) / dt,
               "train/loss_tokens_per_sec": float(m["loss_tokens"]) / dt, "train/epoch": epoch}
        row.update({f"train/{k}": float(m[k]) for k in ("router_aux_loss", "expert_load_max_mean", "expert_dropped")
                    if k in m})
        if "source_loss_sums" in m:
            row.update(source_rows(self.sources, m["source_loss_sums"], m["source_loss_tokens"]))
        if self.peak:
            row["train/mfu"] = self.flops.step_flops(lengths) / dt / self.peak
        self.logger.log(step, row)


def source_rows(names, loss_sums, loss_tokens) -> dict[str, float]:
    """`train/loss/NAME` (where the source has loss tokens) and `train/loss_tokens/NAME` per source."""
    row = {}
    for name, total, count in zip(names, np.asarray(loss_sums, np.float64), np.asarray(loss_tokens, np.float64)):
        if count > 0:
            row[f"train/loss/{name}"] = float(total / count)
        row[f"train/loss_tokens/{name}"] = float(count)
    return row
