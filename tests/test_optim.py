import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxsft import optim
from jaxsft.config import default_config

EPS = float(np.finfo(np.float32).eps)  # 2^-23: one float32 ulp at 1; rounding is ½ of it


# verl's schedules, written from the spec (semantics doc §4.4, §4.5) in plain python
def verl_cosine(s, total, warmup):
    if s < warmup:
        return s / max(1, warmup)
    p = (s - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * p)))


def verl_wsd(s, total, warmup):
    return verl_wsd_general(s, total, warmup, 0.0, 0.5)  # no floor, half a cycle: verl's defaults


# verl 0.7.0's get_cosine_schedule_with_warmup / get_wsd_schedule_with_warmup with a floor m and
# c cosine cycles (verl/utils/torch_functional.py), in plain python
def verl_cosine_general(s, total, warmup, m, c):
    if s < warmup:
        return s / max(1, warmup)
    p = (s - warmup) / max(1, total - warmup)
    return max(m, math.cos(math.pi * c * 2.0 * p) * (1 - m) * 0.5 + (1 + m) * 0.5)


def verl_wsd_general(s, total, warmup, m, c):
    remaining = max(0, total - warmup)
    stable = int(remaining * 0.9)
    decay = remaining - stable
    if s < warmup:
        return s / max(1, warmup)
    if s < warmup + stable:
        return 1.0
    if s < total:
        value = max(0.0, 0.5 * (1.0 + math.cos(math.pi * c * 2.0 * (s - warmup - stable) / max(1, decay))))
        return (1.0 - m) * value + m
    return m


@pytest.mark.parametrize("kind, reference", [("cosine", verl_cosine_general), ("wsd", verl_wsd_general)])
@pytest.mark.parametrize("m, c", [(0.1, 0.5), (0.0, 1.0), (0.25, 0.3), (1.0, 0.5)])
def test_min_lr_ratio_and_num_cycles_follow_verl(kind, reference, m, c):
    total, w = 50, 5
    steps = list(range(total + 2))
    want = np.array([reference(s, total, w, m, c) for s in steps])
    got = np.array([float(optim.lr_multiplier(s, total, w, kind, m, c)) for s in steps])
    # float32 vs float64: cos(2π·c·p) with |arg| ≤ 2π carries 3 roundings of arg (≤ 1.5·eps·2π·½ after ½(1+cos)) plus
    # ≤ 4 roundings of values ≤ 1 (cos, 1+, ½, m + (1-m)·): ≤ 8 eps absolute for multipliers in [0, 1]
    np.testing.assert_allclose(got, want, rtol=0, atol=8 * EPS)
    if m > 0:
        assert got[w:total].min() >= m * (1 - EPS)  # the floor holds: m + (1-m)·h ≥ float32(m), within ½ ulp of m


def test_lr_warmup_steps_overrides_the_ratio():
    assert optim.warmup_steps(100, 0.1) == 10 and optim.warmup_steps(100, 0.1, 3) == 3
    _, lr_schedule = optim.make_optimizer(optim_cfg(lr=1.0, lr_warmup_steps=4, lr_warmup_steps_ratio=0.5), 100, "float32")
    assert [float(lr_schedule(s)) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]


def optim_cfg(**overrides):
    cfg = default_config().optim
    cfg.update(overrides)
    return cfg


@pytest.mark.parametrize("kind, reference", [("cosine", verl_cosine), ("wsd", verl_wsd)])
@pytest.mark.parametrize("total, ratio", [(186, 0.05), (186, 0.0), (10, 0.1), (7, 1.0), (1, 0.1), (23, 0.3)])
def test_schedule_matches_verl(kind, reference, total, ratio):
    w = optim.warmup_steps(total, ratio)
    assert w == int(total * ratio)
    steps = list(range(total + 3))
    want = np.array([reference(s, total, w) for s in steps])
    eager = np.array([float(optim.lr_multiplier(s, total, w, kind)) for s in steps])
    traced = np.asarray(jax.jit(jax.vmap(lambda s: optim.lr_multiplier(s, total, w, kind)))(jnp.array(steps)))
    # float32 sin²(π/2·(1-p)): arg 3 roundings, sin ≤ 1 ulp, square: ≤ 11 half-ulps relative; s/W: 1 → rtol 8 eps;
    # atol: past the end λ = 0 = sin²(kπ) comes out as sin²(Δ), Δ ≤ 1.5 eps·kπ ≤ 1e-6 for k ≤ 2: ≤ 1e-12
    np.testing.assert_allclose(eager, want, rtol=8 * EPS, atol=1e-12)
    np.testing.assert_allclose(traced, want, rtol=8 * EPS, atol=1e-12)  # jit may round differently by an ulp


def test_seed_example_schedule():
    # N = 12000, 8 GPUs, train_batch_size 128, 2 epochs, warmup ratio 0.05, lr 2e-5
    steps_per_epoch = 12000 // 128
    total = steps_per_epoch * 2
    assert (steps_per_epoch, total, optim.warmup_steps(total, 0.05)) == (93, 186, 9)
    _, lr_schedule = optim.make_optimizer(optim_cfg(lr=2e-5, lr_warmup_steps_ratio=0.05), total, "float32")

    def lr_of_step(g):  # optimizer step g (1-based) uses lr_schedule(g - 1)
        return float(lr_schedule(g - 1))

    assert lr_of_step(1) == 0.0
    # lr·λ in float32 vs float64: λ's ≤ 11 half-ulps (sin² form, full relative precision near 0) + lr and product: 8 eps
    assert lr_of_step(2) == pytest.approx(2e-5 / 9, rel=8 * EPS)
    assert lr_of_step(10) == pytest.approx(2e-5, rel=8 * EPS)
    assert lr_of_step(186) == pytest.approx(2e-5 * verl_cosine(185, 186, 9), rel=8 * EPS)
    assert lr_of_step(186) == pytest.approx(1.575e-9, rel=1e-3)  # a 4-digit literal: ≤ 0.5e-3/1.575 = 3.2e-4
    assert float(lr_schedule(186)) == 0.0  # what verl logs at step 186 (the next step's lr)


def test_first_step_lr_zero_with_warmup_updates_adam_state():
    tx, lr_schedule = optim.make_optimizer(optim_cfg(lr_warmup_steps_ratio=0.1), 100, "float32")
    params = {"w": jnp.ones((3,))}
    new_params, state, _, _ = jax.jit(optim.apply_update, static_argnums=0)(
        tx, params, tx.init(params), {"w": jnp.full((3,), 0.5)}, lr_schedule(0))
    assert float(lr_schedule(0)) == 0.0
    np.testing.assert_array_equal(new_params["w"], params["w"])
    assert int(state[1].inner_state[0].count) == 1
    assert float(jnp.abs(state[1].inner_state[0].mu["w"]).sum()) > 0


SHAPES = {"a": (3, 4), "b": (5,), "c": (2, 3, 4)}


def random_tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def test_two_adamw_steps_with_clipping_match_torch():
    cfg = optim_cfg(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, clip_grad=1.0)
    tx, _ = optim.make_optimizer(cfg, 100, "float32")
    params0 = random_tree(0)
    grads = [random_tree(1, scale=3.0), random_tree(2, scale=0.05)]  # norm ≈ 14 (clipped), ≈ 0.23 (not)
    lrs = [1e-2, 5e-3]

    keys = sorted(SHAPES)
    t_params = [torch.tensor(params0[k], requires_grad=True) for k in keys]
    t_opt = torch.optim.AdamW(t_params, lr=lrs[0], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    step = jax.jit(optim.apply_update, static_argnums=0)
    params = jax.tree.map(jnp.asarray, params0)
    state = tx.init(params)
    errs = {}
    for i, (g, lr) in enumerate(zip(grads, lrs)):
        for p, k in zip(t_params, keys):
            p.grad = torch.tensor(g[k])
        t_norm = torch.nn.utils.clip_grad_norm_(t_params, 1.0)
        assert (float(t_norm) > 1.0) == (i == 0)  # first step clipped, second not
        t_opt.param_groups[0]["lr"] = lr
        t_opt.step()
        params, state, norm, finite = step(tx, params, state, g, jnp.float32(lr))
        assert bool(finite)
        errs[f"grad_norm{i}"] = abs(float(norm) - float(t_norm)) / float(t_norm)
        adam = state[1].inner_state[0]
        for p, k in zip(t_params, keys):
            st = t_opt.state[p]
            for name, got, want in [("param", params[k], p.detach()), ("mu", adam.mu[k], st["exp_avg"]),
                                    ("nu", adam.nu[k], st["exp_avg_sq"])]:
                rel = np.max(np.abs(np.asarray(got) - want.numpy()) / np.maximum(np.abs(want.numpy()), 1e-30))
                errs[f"{name}{i}"] = max(errs.get(f"{name}{i}", 0.0), float(rel))
    print("max relative errors vs torch:", {k: f"{v:.1e}" for k, v in errs.items()})
    assert int(state[1].inner_state[0].count) == 2
    # different order (torch: per-tensor norms, then theirs; optax: one tree sum): the norm differs by ≤ ½·2·γ_N, N = 41
    # squares, = N·eps/2; the clip scale carries it into mu once and nu twice (N·eps), plus ≤ 8 roundings over the two
    # Adam steps. Per entry relative: these seeds have no moment or parameter near 0. Measured ≤ 2.1e-7 (≈ 2 eps).
    assert max(errs.values()) <= (sum(math.prod(s) for s in SHAPES.values()) + 8) * EPS


def test_bf16_params_path_runs():
    tx, lr_schedule = optim.make_optimizer(optim_cfg(lr_warmup_steps_ratio=0.0, lr=1e-2), 10, "bfloat16")
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), random_tree(0))
    state = tx.init(params)
    adam = state[1].inner_state[0]
    assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
    assert state[1].hyperparams["learning_rate"].dtype == jnp.float32
    grads = jax.tree.map(jnp.asarray, random_tree(1))  # float32, as the train step accumulates them
    new_params, state, norm, finite = jax.jit(optim.apply_update, static_argnums=0)(
        tx, params, state, grads, lr_schedule(0))
    assert bool(finite)
    for k in SHAPES:
        assert new_params[k].dtype == jnp.bfloat16
        assert bool(jnp.all(jnp.isfinite(new_params[k].astype(jnp.float32))))
        assert bool(jnp.any(new_params[k] != params[k]))


def test_nonfinite_gradient_skips_update():
    tx, _ = optim.make_optimizer(optim_cfg(), 10, "float32")
    step = jax.jit(optim.apply_update, static_argnums=0)
    params = jax.tree.map(jnp.asarray, random_tree(0))
    params, state, _, _ = step(tx, params, tx.init(params), random_tree(1), jnp.float32(1e-3))
    bad = random_tree(2)
    bad["b"][2] = np.nan
    new_params, new_state, norm, finite = step(tx, params, state, bad, jnp.float32(1e-3))
    assert not bool(finite) and np.isnan(float(norm))
    for got, want in zip(jax.tree.leaves((new_params, new_state)), jax.tree.leaves((params, state))):
        np.testing.assert_array_equal(got, want)
    assert int(new_state[1].inner_state[0].count) == 1
    # the next finite step goes on from the kept state
    _, later, _, finite = step(tx, new_params, new_state, random_tree(3), jnp.float32(1e-3))
    assert bool(finite) and int(later[1].inner_state[0].count) == 2
