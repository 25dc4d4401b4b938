"""Ulysses attention: sp > 1 must reproduce sp = 1 (values and gradients) on the CPU mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from naive_attention import naive_attention
from jaxsft.model.ulysses import check_ulysses, ulysses_attention, valid_sp

# Not the same program (per device fewer rows/heads: XLA orders the dots and sums otherwise; replicated KV heads'
# gradients summed across devices): γ_N of max|ref| in float32, N = 48 ≥ T = 32 keys + D = 8 + softmax roundings
REL_TOL = 48 * float(np.finfo(np.float32).eps)  # measured ≤ 1.8 eps


def make_segments(rng, rows, t, packed):
    """Rows of consecutive segments 1..n with random lengths, then padding (0) to the end."""
    seg = np.zeros((rows, t), np.int32)
    for r in range(rows):
        used = rng.integers(t // 2, t + 1)  # some rows fully used, most padded at the end
        pos, sid = 0, 1
        while pos < used:
            n = int(rng.integers(1, used - pos + 1)) if packed else used
            seg[r, pos:pos + n] = sid
            pos, sid = pos + n, sid + 1
    return seg


def make_inputs(seed, rows, t, hq, hkv, d, packed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((rows, t, h, d)).astype(np.float32) for h in (hq, hkv, hkv))
    return q, k, v, make_segments(rng, rows, t, packed)


def mesh_of(dp, sp):
    return Mesh(np.array(jax.devices()[:dp * sp]).reshape(dp, sp), ("dp", "sp"))


def rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def value_and_grads(attn, q, k, v, seg, cot):
    f = lambda q, k, v: jnp.sum(attn(q, k, v, seg) * cot)
    return jax.jit(attn)(q, k, v, seg), jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)


def sharded_ulysses(mesh, q, k, v, seg, cot):
    act = NamedSharding(mesh, P("dp", "sp", None, None))
    q, k, v, cot = (jax.device_put(x, act) for x in (q, k, v, cot))
    seg = jax.device_put(seg, NamedSharding(mesh, P("dp", "sp")))
    attn = lambda q, k, v, s: ulysses_attention(q, k, v, s, mesh=mesh, inner=naive_attention)
    return value_and_grads(attn, q, k, v, seg, cot)


# (hq, hkv): Qwen-like GQA with kv % sp == 0 for sp <= 2, and kv < sp (replication) for sp >= 4.
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("hq,hkv", [(8, 2), pytest.param(8, 8, marks=pytest.mark.slow)])  # 8-8: over ~5 s, CI only
def test_ulysses_equals_sp1(packed, hq, hkv):
    rows, t, d = 4, 32, 8
    q, k, v, seg = make_inputs(0 if packed else 1, rows, t, hq, hkv, d, packed)
    cot = np.random.default_rng(2).standard_normal((rows, t, hq, d)).astype(np.float32)
    want, want_g = value_and_grads(naive_attention, q, k, v, seg, cot)  # unsharded reference
    for dp, sp in [(4, 1), (4, 2), (2, 4), (1, 8)]:
        out, grads = sharded_ulysses(mesh_of(dp, sp), q, k, v, seg, cot)
        errs = [rel_err(out, want)] + [rel_err(g, w) for g, w in zip(grads, want_g)]
        print(f"hq={hq} hkv={hkv} packed={packed} dp={dp} sp={sp} rel err out,dq,dk,dv = "
              + " ".join(f"{e:.1e}" for e in errs))
        assert max(errs) <= REL_TOL, (dp, sp, errs)
        assert out.sharding.spec == P("dp", "sp", None, None)


@pytest.mark.slow  # over ~3 s on 2 cores: CI's full run, not the ≤ 3-minute inner loop
def test_kv_replication_keeps_gqa_grouping():
    # Hq=8, Hkv=2, sp=4: each KV head is copied twice; swapping the two KV heads must change the
    # answer (so grouping matters here) and the sharded result must still equal the reference.
    q, k, v, seg = make_inputs(3, 2, 16, 8, 2, 8, packed=True)
    cot = np.ones((2, 16, 8, 8), np.float32)
    want, _ = value_and_grads(naive_attention, q, k, v, seg, cot)
    swapped = naive_attention(q, k[:, :, ::-1], v[:, :, ::-1], seg)
    assert rel_err(swapped, want) > 0.1
    out, _ = sharded_ulysses(mesh_of(2, 4), q, k, v, seg, cot)
    assert rel_err(out, want) <= REL_TOL


def test_check_ulysses_qwen25_7b():
    for sp in (1, 2, 4):
        check_ulysses(28, 4, sp)
    with pytest.raises(ValueError, match="ulysses_sequence_parallel_size=8"):
        check_ulysses(28, 4, 8)
    with pytest.raises(ValueError, match="ulysses_sequence_parallel_size=3 must divide num_attention_heads"):
        check_ulysses(28, 4, 3)
    check_ulysses(8, 2, 8)  # kv < sp with sp % kv == 0: replication
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        check_ulysses(12, 3, 2)  # 2 neither divides 3 nor is a multiple of it


def test_valid_sp_lists_what_check_ulysses_accepts():
    # Qwen2.5-7B (28 q / 4 KV heads): 28 replicates each KV head 7 times; Qwen3-8B / Llama-3.1-8B (32 / 8)
    assert valid_sp(28, 4) == [1, 2, 4, 28]
    assert valid_sp(32, 8) == [1, 2, 4, 8, 16, 32]
    for hq, hkv in ((28, 4), (32, 8), (16, 16), (14, 2), (12, 3)):
        for sp in range(1, hq + 1):
            try:
                check_ulysses(hq, hkv, sp)
                ok = True
            except ValueError:
                ok = False
            assert ok == (sp in valid_sp(hq, hkv)), (hq, hkv, sp)


def test_ulysses_rejects_bad_shapes():
    mesh = mesh_of(1, 8)
    q, k, v, seg = make_inputs(4, 1, 16, 4, 2, 8, packed=False)
    with pytest.raises(ValueError, match="ulysses_sequence_parallel_size=8"):
        ulysses_attention(q, k, v, seg, mesh=mesh, inner=naive_attention)  # 4 heads over 8
    q, k, v, seg = make_inputs(4, 1, 12, 8, 8, 8, packed=False)
    with pytest.raises(ValueError, match="multiple of ulysses_sequence_parallel_size=8"):
        ulysses_attention(q, k, v, seg, mesh=mesh, inner=naive_attention)
