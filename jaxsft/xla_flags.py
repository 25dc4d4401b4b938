"""XLA flags jaxsft sets for itself, in XLA_FLAGS before a JAX backend starts (`apply`, called by
the command line; the test suite's processes get the same through `with_jaxsft_flags`).

- `--xla_cpu_enable_concurrency_optimized_scheduler=false`: with XLA:CPU's concurrency-optimized
  scheduler (jax 0.10.2), a multi-device train step read back from the persistent compilation
  cache can reach its collectives in different orders on different devices (seen: two devices in
  the layers' backward all-gather, six in the LM head's gradient all-reduce) and deadlock; XLA
  aborts the process after 40 s. The freshly compiled step runs; the cached one hung on every
  relaunch of a tiny Qwen3 (untied LM head) — found by the fault soak (docs/HOSTILE.md). With the
  scheduler off the cached step runs. CPU only: it changes nothing on a GPU. A value the user set
  in XLA_FLAGS wins. A workaround for that program, not a fix: the same race (devices reaching two
  collectives in different orders) also hit a freshly compiled tiny Llama LoRA step, with the flag
  and without it (docs/HOSTILE.md); it is XLA:CPU's, and GPUs do not run its collectives.
"""

from __future__ import annotations

import os

CPU_SCHEDULER_OFF = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def with_jaxsft_flags(flags: str) -> str:
    """`flags` (an XLA_FLAGS value) with jaxsft's flags added where the user did not set them."""
    if "--xla_cpu_enable_concurrency_optimized_scheduler" in flags:
        return flags
    return f"{flags} {CPU_SCHEDULER_OFF}".strip()


def apply() -> None:
    """Add jaxsft's flags to this process's XLA_FLAGS (read when the first JAX backend starts)."""
    os.environ["XLA_FLAGS"] = with_jaxsft_flags(os.environ.get("XLA_FLAGS", ""))
