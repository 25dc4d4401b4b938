"""Attention backends behind one function.

Every backend has the signature `fn(q [B,T,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,D], segment_ids [B,T])
-> [B,T,Hq,D]` and must build its own mask from `segment_ids`: token t attends to token s iff
s <= t, both are in the same segment and the segment is not 0 (padding). Queries of padding
tokens get zeros.

`xla` is the blockwise attention of `jaxsft.model.blockwise` (memory linear in T, skips masked
blocks); `reference` is the dense float32 [B, H, T, T] attention every other backend is tested
against. GPU kernels are listed in `BACKENDS` and `AUTO_ORDER`; each must pass the comparison
with `reference` on packed rows.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Callable

import jax

from jaxsft import parallel
from jaxsft.model import blockwise, flash
from jaxsft.model.dense import reference_attention, segment_mask  # noqa: F401  (segment_mask: part of this API)
from jaxsft.model.ulysses import check_ulysses, ulysses_attention

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Backend:
    fn: AttentionFn
    # On a mesh, run inside the Ulysses shard_map even at sp = 1 (there just a per-device call), so
    # each device works on its own rows: a Pallas kernel XLA cannot partition, or a loop whose
    # work list depends on the local rows' segments.
    per_device: bool = False
    # A custom kernel XLA cannot partition at all (odd shapes are refused instead of gathered), and
    # `auto` takes it only after `self_check` passes.
    kernel: bool = False
    available: Callable[[], bool] = lambda: True
    self_check: Callable[[], tuple[bool, str]] | None = None


BACKENDS: dict[str, Backend] = {
    "xla": Backend(blockwise.blockwise_attention, per_device=True),
    "reference": Backend(reference_attention),
    "flash": Backend(flash.flash_attention, per_device=True, kernel=True, available=flash.available,
                     self_check=flash.self_check),
}
# `auto` takes the first backend listed for the running platform that is available and verified.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("xla",), "gpu": ("flash", "xla"), "tpu": ("xla",)}


@functools.cache
def _verified_on_device(name: str) -> bool:
    """A kernel must equal the dense reference on a packed row on this device (once per process);
    a failure falls back to xla with a warning instead of a bad run."""
    backend = BACKENDS[name]
    if backend.self_check is None:
        return True
    ok, why = backend.self_check()
    if not ok:
        warnings.warn(f"attention backend {name!r} failed its self-check on {jax.devices()[0].device_kind} "
                      f"({why}); using xla")
    return ok


def resolve(implementation: str) -> str:
    """The backend name `implementation` stands for (`auto` picks by platform)."""
    if implementation == "auto":
        for name in AUTO_ORDER.get(jax.default_backend(), ()):
            if BACKENDS[name].available() and _verified_on_device(name):
                return name
        return "xla"
    check_backend(implementation)
    return implementation


def check_backend(implementation: str) -> None:
    """ValueError naming the key unless `implementation` is a backend here (or auto)."""
    if implementation != "auto" and implementation not in BACKENDS:
        raise ValueError(f"model.attn_implementation={implementation!r} is not available; choose auto or one of: "
                         f"{', '.join(BACKENDS)}")


def attention(q, k, v, segment_ids, *, implementation: str = "xla"):
    """q [B,T,Hq,D], k/v [B,T,Hkv,D], segment_ids [B,T] (0 = padding) -> [B,T,Hq,D] in q's dtype.

    On a (dp, sp) mesh with sp > 1 — or for a per-device backend on any mesh — attention runs as
    Ulysses: all-to-all from token-sharded to head-sharded, local attention on whole rows, back.
    """
    name = resolve(implementation)
    backend = BACKENDS[name]
    mesh = parallel.active_mesh()
    if mesh is not None and (mesh.shape["sp"] > 1 or backend.per_device):
        (b, t), dp, sp = segment_ids.shape, mesh.shape["dp"], mesh.shape["sp"]
        try:
            check_ulysses(q.shape[2], k.shape[2], sp)
            splits = b % dp == 0 and t % sp == 0
        except ValueError:
            splits = False
        if splits:
            return ulysses_attention(q, k, v, segment_ids, mesh=mesh, inner=backend.fn).astype(q.dtype)
        if backend.kernel:
            raise ValueError(f"model.attn_implementation={name} on a (dp={dp}, sp={sp}) mesh needs rows divisible by "
                             f"dp, tokens by sp and heads ({q.shape[2]} q / {k.shape[2]} kv) split over sp")
        # An XLA backend is partitioned by XLA itself (sequence gathered): correct, not Ulysses.
        # Training checks the Ulysses constraints at start-up, so this serves odd shapes in tests.
    return backend.fn(q, k, v, segment_ids).astype(q.dtype)
