"""Flash attention for GPUs with packed rows: jax's Pallas (Triton) kernel with segment ids.

Why this kernel: `jax.experimental.pallas.ops.gpu.attention.mha` ships with jax 0.10.2, masks
causally *and* by segment id inside its forward and backward kernels (so packed rows never
materialise a [T, T] mask), has a fused Pallas backward, and runs on CPU in interpret mode, so the
exact code that runs on a GPU is tested in CI. `jax.nn.dot_product_attention(implementation=
'cudnn')` takes no segment ids (only a dense mask or per-row lengths), so it cannot pack.

Constraints of the library kernel, handled here:
- equal query and KV head counts: GQA K/V heads are repeated (head h uses KV head h // group);
- sequence length a multiple of the block sizes: rows are padded at the end with segment 0;
- head_dim is padded to a power of two inside the kernel by masked loads (Triton wants >= 16).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxsft.model.dense import reference_attention


@functools.cache
def _pallas():
    """jax's Pallas (Triton) GPU attention, imported on first use: an experimental module (deprecated
    in jax 0.11) whose absence must cost this backend only, not the model's import."""
    try:
        from jax.experimental.pallas.ops.gpu import attention as pallas_attention
    except Exception as e:  # noqa: BLE001 - any failure to import it means: no flash here
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return pallas_attention, ""


def available() -> bool:
    """True when the default device can run the Triton kernel (a CUDA GPU, sm_80 or newer) and this
    jax still has it."""
    if jax.default_backend() != "gpu" or _pallas()[0] is None:
        return False
    capability = getattr(jax.devices()[0], "compute_capability", None)
    return capability is None or float(capability) >= 8.0


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.partial(jax.jit, static_argnames=("interpret", "block_q", "block_k", "block_bwd"))
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                    interpret: bool = False, block_q: int = 128, block_k: int = 128,
                    block_bwd: int = 32) -> jax.Array:
    """Causal attention that never crosses segments. q [B,T,Hq,D], k/v [B,T,Hkv,D] -> [B,T,Hq,D].

    segment_ids [B,T]: 0 = padding. Padding query rows return zeros (inside the kernel they attend
    to earlier padding, so no row is ever fully masked and nothing becomes NaN). `interpret=True`
    runs the same kernel on any backend (slow; for tests). Block sizes are powers of two; the
    backward uses one square block (the fused kernel needs equal q and kv block counts).
    """
    batch, seq_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}.")
    if num_kv_heads != num_heads:  # the kernel indexes K/V with the query head
        k = jnp.repeat(k, num_heads // num_kv_heads, axis=2)
        v = jnp.repeat(v, num_heads // num_kv_heads, axis=2)

    # Short rows get smaller blocks; otherwise pad the row to a multiple of every block.
    cap = _next_pow2(seq_len)
    bq, bk, bb = (min(b, cap) for b in (block_q, block_k, block_bwd))
    padded_len = -(-seq_len // max(bq, bk, bb)) * max(bq, bk, bb)
    segment_ids = segment_ids.astype(jnp.int32)
    if padded_len != seq_len:
        pad = padded_len - seq_len
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))  # segment 0: never seen by real rows

    pallas_attention, why = _pallas()
    if pallas_attention is None:
        raise RuntimeError(f"model.attn_implementation=flash: this jax has no Pallas GPU attention ({why})")
    sizes = pallas_attention.BlockSizes(block_q=bq, block_k=bk, block_q_dkv=bb, block_kv_dkv=bb,
                                        block_q_dq=bb, block_kv_dq=bb)
    out = _mha(q, k, v, segment_ids, head_dim ** -0.5, sizes, interpret)[:, :seq_len]
    # Zero padding rows: a fixed, finite value, and no gradient flows from them.
    return jnp.where(segment_ids[:, :seq_len, None, None] > 0, out, 0).astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _mha(q, k, v, segment_ids, sm_scale, sizes, interpret):
    """The library kernel, causal, with its forward residuals named: the output and the row
    log-sum-exp are `attention_out` / `attention_lse` (as blockwise attention's), so a remat policy
    that saves them (`minimal`, jaxsft.model.remat) keeps the backward from running the forward
    kernel again; the library's own custom_vjp hides them from the policy. The backward is the
    library's (`mha.bwd`, the rule its custom_vjp registers)."""
    return _pallas()[0].mha(q, k, v, segment_ids, sm_scale=sm_scale, causal=True, block_sizes=sizes,
                            interpret=interpret)


def _mha_fwd(q, k, v, segment_ids, sm_scale, sizes, interpret):
    out, lse = _pallas()[0].mha(q, k, v, segment_ids, sm_scale=sm_scale, causal=True, block_sizes=sizes,
                                interpret=interpret, return_residuals=True)
    out = checkpoint_name(out, "attention_out")
    return out, (q, k, v, segment_ids, out, checkpoint_name(lse, "attention_lse"))


def _mha_bwd(sm_scale, sizes, interpret, residuals, dout):
    # the library's backward rule, with the static arguments mha passes it by default (by name: a
    # renamed one fails loudly rather than shifting the others)
    dq, dk, dv, _ = _pallas()[0].mha.bwd(
        sm_scale=sm_scale, causal=True, block_sizes=sizes, backward_pass_impl="triton", num_warps=None, num_stages=2,
        grid=None, interpret=interpret, debug=False, return_residuals=False, res=residuals, do=dout)
    return dq, dk, dv, None


_mha.defvjp(_mha_fwd, _mha_bwd)


def self_check(dtype=jnp.bfloat16) -> tuple[bool, str]:
    """Run the kernel on this device against the dense reference on a packed row with GQA and
    padding — forward and gradients — before `auto` trusts it. Returns (ok, reason)."""
    try:
        keys = jax.random.split(jax.random.key(0), 4)
        b, t, hq, hkv, d = 2, 256, 4, 2, 64
        q = jax.random.normal(keys[0], (b, t, hq, d), dtype)
        k = jax.random.normal(keys[1], (b, t, hkv, d), dtype)
        v = jax.random.normal(keys[2], (b, t, hkv, d), dtype)
        seg = jnp.concatenate([jnp.full((b, 100), 1), jnp.full((b, 120), 2), jnp.zeros((b, 36), int)], axis=1)
        cot = jax.random.normal(keys[3], (b, t, hq, d), jnp.float32)

        def loss(fn, q, k, v):
            return jnp.sum(fn(q, k, v, seg).astype(jnp.float32) * cot)

        got = jax.value_and_grad(functools.partial(loss, flash_attention), argnums=(0, 1, 2))(q, k, v)
        ref = jax.value_and_grad(functools.partial(loss, reference_attention), argnums=(0, 1, 2))(q, k, v)
        for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            a, r = a.astype(jnp.float32), r.astype(jnp.float32)
            err = float(jnp.max(jnp.abs(a - r)) / jnp.maximum(jnp.max(jnp.abs(r)), 1e-6))
            if not err <= 2e-2:  # bf16 inputs: a few bf16 ulps; NaN fails too
                return False, f"relative error {err:.2e} against the dense reference"
        return True, "ok"
    except Exception as e:  # a kernel that cannot compile here must not stop training
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
