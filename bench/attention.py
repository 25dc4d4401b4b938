"""Time the attention backends alone: forward, and forward + backward, on one shape.

    python -m bench.attention --rows 2 --seq-len 512 --heads 4 --kv-heads 2 --head-dim 16 \
        [--lengths fixed|packed] [--attn xla,reference] [--blocks 32,64,128]

Random q, k, v (float32); `fixed`: every row one sample of seq_len tokens; `packed`: rows of
samples with lengths drawn like the seed data's (scaled to seq_len, as bench.throughput does) and
padding at the end. For each backend (and each block size of `xla`) prints the median wall time
and the smallest process CPU time per call (CPU time is the steadier figure on a shared machine:
run it under `taskset -c 0` to keep it to one core), and the largest relative error of the
output and gradients against `reference`.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--lengths", choices=("fixed", "packed"), default="fixed")
    p.add_argument("--attn", default="xla,reference", help="comma-separated backends")
    p.add_argument("--blocks", default=None, help="comma-separated block sizes for xla (default: the platform's)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def segments(kind: str, rows: int, seq_len: int, seed: int) -> np.ndarray:
    from bench.throughput import SEED_MAX_LENGTH, seed_lognormal

    seg = np.zeros((rows, seq_len), np.int32)
    if kind == "fixed":
        seg[:] = 1
        return seg
    mu, sigma = seed_lognormal(seq_len / SEED_MAX_LENGTH)
    rng = np.random.default_rng([seed, 3])
    for r in range(rows):
        pos, sid = 0, 1
        while True:
            n = int(np.clip(np.rint(np.exp(mu + sigma * rng.standard_normal())), 8, seq_len))
            if pos + n > seq_len:
                break
            seg[r, pos:pos + n] = sid
            pos, sid = pos + n, sid + 1
    return seg


def timed(fn, args, reps: int) -> tuple[float, float]:
    """(median wall ms, min CPU ms) per call, after one warm-up call."""
    import jax

    jax.block_until_ready(fn(*args))
    walls, cpus = [], []
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return float(np.median(walls)) * 1e3, min(cpus) * 1e3


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    from jaxsft import plan

    plan.prepare_environment(None)  # no NVIDIA driver: CPU, without the CUDA plugin's failed check
    import jax
    import jax.numpy as jnp

    from jaxsft.model import attention, blockwise

    rng = np.random.default_rng(args.seed)
    b, t, d = args.rows, args.seq_len, args.head_dim
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
               for h in (args.heads, args.kv_heads, args.kv_heads))
    cot = jnp.asarray(rng.standard_normal((b, t, args.heads, d)), jnp.float32)
    seg = jnp.asarray(segments(args.lengths, b, t, args.seed))

    variants = []
    for name in args.attn.split(","):
        if name == "xla":
            for block in (args.blocks.split(",") if args.blocks else [blockwise.default_block(args.seq_len)]):
                variants.append((f"xla block {int(block)}",
                                 functools.partial(blockwise.blockwise_attention, block=int(block))))
        else:
            variants.append((name, attention.BACKENDS[attention.resolve(name)].fn))

    def grads_of(fn):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v, seg) * cot), argnums=(0, 1, 2)))

    want = grads_of(attention.reference_attention)(q, k, v)
    print(f"[bench.attention] rows {b}, T {t}, heads {args.heads}/{args.kv_heads}, head_dim {d}, {args.lengths}; "
          f"{jax.devices()[0].device_kind}, load {os.getloadavg()[0]:.1f}")
    results = []
    for label, fn in variants:
        fwd = timed(jax.jit(lambda q, k, v, fn=fn: fn(q, k, v, seg)), (q, k, v), args.reps)
        step = grads_of(fn)
        both = timed(step, (q, k, v), args.reps)
        got = step(q, k, v)
        err = max(float(jnp.max(jnp.abs(a - w)) / jnp.max(jnp.abs(w))) for a, w in zip(got[1], want[1]))
        results.append({"backend": label, "forward_ms": fwd, "forward_backward_ms": both, "grad_rel_err": err})
        print(f"{label:>16}: forward {fwd[0]:8.2f} ms wall / {fwd[1]:8.2f} ms CPU; forward+backward "
              f"{both[0]:8.2f} ms wall / {both[1]:8.2f} ms CPU; gradients vs reference {err:.1e}")
    return results


if __name__ == "__main__":
    main()
