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
import jax.numpy as jnp

from jaxsft.model import blockwise, flash

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, T, T] boolean: causal, same segment, query not padding."""
    t = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids != 0)[:, :, None]
    return (causal & same & real)[:, None]


def reference_attention(q, k, v, segment_ids):
    """Dense reference: float32 [B, H, T, T] scores and softmax, GQA by grouping query heads per KV
    head. Simple enough to read as the definition; O(T^2) memory."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, t, hkv, hq // hkv, d)  # query head h uses KV head h // (hq/hkv), as HF's repeat_kv
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * d**-0.5
    mask = segment_mask(segment_ids)[:, :, None]  # [B,1,1,T,T]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    # Softmax by hand so a row with no allowed key (a padding query) gives 0, not NaN or uniform.
    p = jnp.where(mask, jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v)
    return out.reshape(b, t, hq, d)


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
    if implementation not in BACKENDS:
        raise ValueError(f"model.attn_implementation={implementation!r} is not available; choose auto or one of: "
                         f"{', '.join(BACKENDS)}")
    return implementation


def attention(q, k, v, segment_ids, *, implementation: str = "xla"):
    """q [B,T,Hq,D], k/v [B,T,Hkv,D], segment_ids [B,T] (0 = padding) -> [B,T,Hq,D] in q's dtype.

    On a (dp, sp) mesh with sp > 1 — or for a per-device backend on any mesh — attention runs as
    Ulysses: all-to-all from token-sharded to head-sharded, local attention on whole rows, back.
    """
    from jaxsft import parallel
    from jaxsft.model.ulysses import check_ulysses, ulysses_attention

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
