"""The preemption flag: SIGTERM / SIGINT (or JAX's preemption service) asks the train loop to save and stop."""

from __future__ import annotations

import signal

import jax


class PreemptionFlag:
    """Set by SIGTERM or SIGINT so the train loop can finish its step, save and exit 0.

    With several processes JAX's preemption service owns SIGTERM and agrees on a step at which
    every process stops; `check(step)` asks it (call it once per step on every process).
    A second SIGINT interrupts at once. `restore()` puts the previous handlers back.
    """

    def __init__(self):
        self._set = False
        self._multi = jax.process_count() > 1
        self._previous = {} if self._multi else {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum, frame) -> None:
        if self._set and signum == signal.SIGINT:
            raise KeyboardInterrupt("interrupted again: not saving")
        self._set = True

    def check(self, step: int) -> bool:
        if self._multi and not self._set:
            from jax.experimental import multihost_utils

            self._set = multihost_utils.reached_preemption_sync_point(step)
        return self._set

    def is_set(self) -> bool:
        return self._set

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
