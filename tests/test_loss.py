import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.model.loss import masked_ce_per_row, masked_loss_sums

EPS = float(np.finfo(np.float32).eps)  # 2^-23: one float32 ulp at 1
BF16_EPS = 2.0 ** -7  # one bfloat16 ulp at 1 (8 significand bits with the implicit one; rounding: ½ of it)


def naive_ce_per_row(hidden, kernel, targets, weights):
    logits = jnp.einsum("bth,hv->btv", hidden.astype(jnp.float32), kernel.astype(jnp.float32))
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    w = weights.astype(jnp.float32)
    return (ce * w).sum(-1), w.sum(-1)


def make_inputs(b, t, h, v, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(k[0], (b, t, h), jnp.float32)
    kernel = jax.random.normal(k[1], (h, v), jnp.float32) / np.sqrt(h)
    targets = jax.random.randint(k[2], (b, t), 0, v)
    weights = (jax.random.uniform(k[3], (b, t)) < 0.7).astype(jnp.float32)
    return hidden, kernel, targets, weights


def objective(fn, row_scale):
    # distinct per-row cotangents, so each row's backward scale is exercised
    def f(hidden, kernel, weights, targets):
        loss_sum, weight_sum = fn(hidden, kernel, targets, weights)
        return jnp.sum(row_scale * loss_sum / weight_sum)
    return f


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 64])
def test_chunked_matches_naive_values_and_grads(chunk_size):
    hidden, kernel, targets, weights = make_inputs(2, 13, 16, 50)
    row_scale = jnp.array([0.7, 1.3])
    ref_sum, ref_w = naive_ce_per_row(hidden, kernel, targets, weights)
    got_sum, got_w = masked_ce_per_row(hidden, kernel, targets, weights, chunk_size)
    assert got_sum.dtype == jnp.float32 and got_sum.shape == (2,)
    # different arithmetic (chunked scan + logsumexp vs one log_softmax): γ_N of the chain logits (H = 16 products),
    # log-sum-exp (V = 50 terms), row sum (T = 13 terms, all ≥ 0, so relative to the result): N·eps, N = 79
    np.testing.assert_allclose(got_sum, ref_sum, rtol=(16 + 50 + 13) * EPS)
    np.testing.assert_array_equal(got_w, ref_w)

    chunked = objective(lambda *a: masked_ce_per_row(*a, chunk_size), row_scale)
    ref_grads = jax.grad(objective(naive_ce_per_row, row_scale), argnums=(0, 1, 2))(hidden, kernel, weights, targets)
    got_grads = jax.jit(jax.grad(chunked, argnums=(0, 1, 2)))(hidden, kernel, weights, targets)
    for got, ref in zip(got_grads, ref_grads):
        # γ_N, N = H + V + B·T = 92 accumulations (d_h sums V, d_kernel B·T tokens); atol: the same of max|ref| where terms cancel
        np.testing.assert_allclose(got, ref, rtol=92 * EPS, atol=92 * EPS * float(np.max(np.abs(ref))))


def naive_dft_sums(hidden, kernel, targets, weights, groups, num_groups):
    """TRL's DFT token loss, -p.detach()·log p, summed per row and per group."""
    logits = jnp.einsum("bth,hv->btv", hidden.astype(jnp.float32), kernel.astype(jnp.float32))
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    loss = -jax.lax.stop_gradient(jnp.exp(logp)) * logp * weights
    return loss.sum(-1), weights.sum(-1), jax.ops.segment_sum(loss.reshape(-1), groups.reshape(-1), num_groups)


def test_dft_by_group_matches_naive(chunk_size=5):
    """trainer.loss_type=dft and the per-source sums: values and gradients (through the row sums and
    the group sums, with distinct cotangents) equal the naive formula's, over 3 chunks (13 tokens
    padded to 15)."""
    hidden, kernel, targets, weights = make_inputs(2, 13, 16, 50, seed=2)
    groups = jax.random.randint(jax.random.key(9), (2, 13), 0, 3)
    row_scale, group_scale = jnp.array([0.7, 1.3]), jnp.array([0.5, 2.0, -1.0])

    def f(fn):
        def g(hidden, kernel, weights):
            rows, _, by_group = fn(hidden, kernel, targets, weights)
            return jnp.sum(row_scale * rows) + jnp.sum(group_scale * by_group)
        return g

    ours = lambda *a: masked_loss_sums(*a, chunk_size, 1, "dft", groups, 3)  # noqa: E731
    ref = lambda *a: naive_dft_sums(*a, groups, 3)  # noqa: E731
    for got, want in zip(ours(hidden, kernel, targets, weights), ref(hidden, kernel, targets, weights)):
        # as test_chunked_matches_naive_values_and_grads (N = 79), + 2 for exp(-ce) and its product
        np.testing.assert_allclose(got, want, rtol=81 * EPS, atol=81 * EPS)
    ref_grads = jax.grad(f(ref), argnums=(0, 1, 2))(hidden, kernel, weights)
    got_grads = jax.jit(jax.grad(f(ours), argnums=(0, 1, 2)))(hidden, kernel, weights)
    for got, want in zip(got_grads, ref_grads):
        # as test_chunked_matches_naive_values_and_grads (N = 92), + 2 for the probability factor
        np.testing.assert_allclose(got, want, rtol=94 * EPS, atol=94 * EPS * float(np.max(np.abs(want))))


def test_bf16_hidden_keeps_dtypes_and_stays_close():
    hidden, kernel, targets, weights = make_inputs(2, 24, 32, 64, seed=1)
    hidden_bf16 = hidden.astype(jnp.bfloat16)
    f = objective(lambda *a: masked_ce_per_row(*a, 8), jnp.ones(2))
    ref = objective(naive_ce_per_row, jnp.ones(2))
    d_h, d_k = jax.grad(f, argnums=(0, 1))(hidden_bf16, kernel, weights, targets)
    r_h, r_k = jax.grad(ref, argnums=(0, 1))(hidden_bf16, kernel.astype(jnp.bfloat16), weights, targets)
    assert d_h.dtype == jnp.bfloat16 and d_k.dtype == jnp.float32
    # same bf16 operands; ours rounds d_logits to bf16 (½ ulp of each term, Σ|terms| ≤ 2·max|ref|: ≤ 1 ulp) and both
    # round their results to bf16 (½ ulp each): ≤ 2 bf16 ulps of max|ref|, held to 4 (measured 0.85 d_h, 0.4 d_k)
    np.testing.assert_allclose(d_h.astype(jnp.float32), r_h, rtol=0, atol=4 * BF16_EPS * float(jnp.max(jnp.abs(r_h))))
    np.testing.assert_allclose(d_k, r_k, rtol=0, atol=4 * BF16_EPS * float(jnp.max(jnp.abs(r_k))))


def test_chunked_grad_never_holds_full_f32_logits():
    # B*T*V*4 = 16 MiB of float32 logits in the naive version; one chunk of 32 tokens is 2 MiB,
    # and the backward holds a chunk's float32 logits plus its d_logits at once
    b, t, h, v, chunk = 2, 256, 32, 8192, 32
    args = make_inputs(b, t, h, v)
    hidden, kernel, targets, weights = args
    logits_bytes = b * t * v * 4
    chunk_bytes = b * chunk * v * 4

    def temp_bytes(fn):
        grad = jax.jit(jax.grad(objective(fn, jnp.ones(b)), argnums=(0, 1)))
        return grad.lower(hidden, kernel, weights, targets).compile().memory_analysis().temp_size_in_bytes

    naive = temp_bytes(naive_ce_per_row)
    chunked = temp_bytes(lambda *a: masked_ce_per_row(*a, chunk))
    print(f"temp bytes: naive {naive}, chunked {chunked}, full f32 logits {logits_bytes}")
    assert naive >= logits_bytes
    assert chunked < 3 * chunk_bytes < logits_bytes / 2
