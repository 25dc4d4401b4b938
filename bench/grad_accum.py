"""How exact is a bfloat16 gradient accumulator with bfloat16 parameters? (optim.grad_accum_dtype)

    python -m bench.grad_accum [--shape tiny] [--micro-batches 8 32 128] [--seq-len 256]

For K micro-batches of one random row each, the step's summed gradient is computed three ways
with jaxsft's own `step.accumulate_gradients`:
  ref   float32 parameters (the bf16 values, upcast), float32 compute, float32 accumulator;
  fp32  bfloat16 parameters and compute, float32 accumulator (jaxsft's default);
  bf16  bfloat16 parameters and compute, bfloat16 accumulator (verl with model_dtype=bf16).
Printed: relative L2 errors |fp32 - ref| / |ref| (the bf16 compute alone), |bf16 - ref| / |ref|,
and |bf16 - fp32| / |fp32| (the accumulation rounding alone), over all parameters together.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def gradients(shape: str, k: int, seq_len: int, seed: int = 0) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from bench.throughput import SHAPES, jaxsft_batches, sample_lengths
    from jaxsft import parallel, step
    from jaxsft.model.config import ModelConfig
    from jaxsft.model.decoder import CausalLM
    from jaxsft.settings import ModelSettings

    config = ModelConfig.from_hf_dict(SHAPES[shape])
    mesh = parallel.make_mesh(1, 1, jax.devices()[:1])
    lengths = sample_lengths("seed", seq_len, 1, k, seed)
    batch = {n: jnp.asarray(v) for n, v in
             jaxsft_batches(lengths, seq_len, 1, 1, "none", config.vocab_size, seed)[0].items()}

    def grads(param_dtype, compute_dtype, acc_dtype, params16):
        settings = ModelSettings(param_dtype=param_dtype, compute_dtype=compute_dtype, remat_policy="none",
                                 attn_implementation="xla")
        with jax.set_mesh(mesh):
            model = nnx.eval_shape(lambda: CausalLM(config, settings, rngs=nnx.Rngs(seed)))
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            params = jax.tree.map(lambda p: p.astype(param_dtype), params16)
            cfg = step.StepConfig("global_tokens", False, 1, 512, grad_accum_dtype=acc_dtype)
            fn = jax.jit(lambda p, b: step.accumulate_gradients(graphdef, rest, p, b, cfg)[1])
            return [np.asarray(x, np.float64) for x in jax.tree.leaves(fn(params, batch))]

    with jax.set_mesh(mesh):
        bf16 = ModelSettings(param_dtype="bfloat16", compute_dtype="bfloat16", remat_policy="none",
                             attn_implementation="xla")
        params16 = nnx.state(CausalLM(config, bf16, rngs=nnx.Rngs(seed)), nnx.Param)
    ref = grads("float32", "float32", "float32", params16)
    acc32 = grads("bfloat16", "bfloat16", "float32", params16)
    acc16 = grads("bfloat16", "bfloat16", "bfloat16", params16)

    def rel(a, b):
        return float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(a, b)) / sum(np.sum(y ** 2) for y in b)))

    return {"micro_batches": k, "fp32_vs_ref": rel(acc32, ref), "bf16_vs_ref": rel(acc16, ref),
            "bf16_vs_fp32": rel(acc16, acc32)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.grad_accum", description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="tiny")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = [gradients(args.shape, k, args.seq_len) for k in args.micro_batches]
    for r in rows:
        print(f"[bench] K={r['micro_batches']}: |fp32 acc - ref| = {r['fp32_vs_ref']:.2e}, "
              f"|bf16 acc - ref| = {r['bf16_vs_ref']:.2e}, |bf16 acc - fp32 acc| = {r['bf16_vs_fp32']:.2e} "
              f"(relative L2 over all gradients)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "seq_len": args.seq_len, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
