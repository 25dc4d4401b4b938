"""Step times of the training modes: full fine-tuning, LoRA, new-token rows, and optimizer-state
offload, each mode's real jitted train step on random weights.

    python -m bench.modes time --shape tiny --seq-len 512 --global-batch 8 --steps 10 \\
        --mode full --mode offload --mode lora:8 [--json FILE]

1 + warmup untimed steps, then `--steps` timed ones, each ended by reading its loss, on every
device (or the first `--dp`). On a GPU each row also carries the device's peak bytes in use so
far (`memory_stats`; the counter only grows, and each mode's state is freed before the next is
built, so list the mode expected to need the least memory first). On the CPU memory is not
measured: GPU memory comes from the XLA:GPU plan of the run's own command (`python -m
jaxsft.train ... --dry_run=h100:N`, jaxsft.plan), never from XLA:CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import types

import numpy as np

from bench.throughput import SHAPES, jaxsft_batches, random_model, sample_lengths

PROGRESS = None  # fn(key, value), set by a caller in this process (bench.gpu_check)

def parse_mode(text: str) -> dict:
    """full | offload | lora:RANK | new_tokens:N (N rows appended and trained) | lora:RANK+offload, ..."""
    mode = {"lora": 0, "new_tokens": 0, "offload": False, "name": text}
    for part in text.split("+"):
        kind, _, n = part.partition(":")
        if kind == "full":
            continue
        if kind == "offload":
            mode["offload"] = True
        elif kind in ("lora", "new_tokens") and n.isdigit() and int(n) > 0:
            mode[kind] = int(n)
        else:
            raise argparse.ArgumentTypeError(f"--mode {text!r}: use full, offload, lora:RANK, new_tokens:N, joined by +")
    return mode


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.modes", description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("time",))
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--global-batch", type=int, default=1, help="samples per step (over the --dp devices)")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--dp", type=int, default=None, help="devices to use (default: all)")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--remat", default="full")
    p.add_argument("--attn", default="xla")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mode", type=parse_mode, action="append", required=True)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def _build(args, mode, mesh):
    """(graphdef, rest, state, shardings, partition, tx, schedule, config) for one mode."""
    import dataclasses

    import ml_collections
    from flax import nnx

    from jaxsft import config as jconfig, optim, step, trainable
    from jaxsft.model.config import ModelConfig
    from jaxsft.model.lora import MODULES
    from jaxsft.settings import LoRASettings, ModelSettings

    config = ModelConfig.from_hf_dict(SHAPES[args.shape])
    base_vocab = config.vocab_size
    config = dataclasses.replace(config, vocab_size=base_vocab + mode["new_tokens"])
    lora = LoRASettings(rank=mode["lora"], alpha=2.0 * mode["lora"], targets=MODULES) if mode["lora"] else None
    settings = ModelSettings(param_dtype=args.param_dtype, compute_dtype=args.compute_dtype, remat_policy=args.remat,
                             attn_implementation=args.attn, lora=lora)
    spec = types.SimpleNamespace(lora=lora, trainable=("new_token_embeddings",) if mode["new_tokens"] else ("all",))
    trained_dtype = "float32" if lora else args.param_dtype
    tx, schedule = optim.make_optimizer(ml_collections.ConfigDict(jconfig.default_config().optim.to_dict()),
                                        total_steps=1000, param_dtype=trained_dtype)
    model = random_model(config, settings, mesh, seed=0)
    graphdef, params, _ = nnx.split(model, nnx.Param, ...)
    part = trainable.partition(params, spec, config, tuple(range(base_vocab, config.vocab_size)))
    graphdef, rest, state, shardings = step.init_train_state(model, tx, mesh, part, optimizer_offload=mode["offload"],
                                                             say=print)
    return graphdef, rest, state, shardings, part, tx, schedule, config


def timing(args) -> list[dict]:
    import jax

    from jaxsft import parallel, step

    mesh = parallel.make_mesh(args.dp or jax.device_count(), 1)
    out = []
    for mode in args.mode:
        with jax.set_mesh(mesh):
            graphdef, rest, state, shardings, part, tx, schedule, config = _build(args, mode, mesh)
            n = 1 + args.warmup + args.steps
            lengths = sample_lengths("fixed", args.seq_len, n, args.global_batch, 0)
            batches = [{k: jax.device_put(v, parallel.batch_sharding(mesh)) for k, v in b.items()}
                       for b in jaxsft_batches(lengths, args.seq_len, mesh.shape["dp"], args.micro_batch, "none",
                                               config.vocab_size, 0)]
            fn = jax.jit(step.make_train_step(graphdef, rest, tx, schedule, step.StepConfig(
                "global_tokens", False, mesh.shape["dp"], 512), part, shardings["opt_state"]),
                donate_argnums=0, out_shardings=(shardings, parallel.replicated(mesh)))
            times = []
            for b in batches:
                t0 = time.perf_counter()
                state, m = fn(state, b)
                float(m["loss"])
                times.append(time.perf_counter() - t0)
        del state, batches, fn  # freed before the next mode is built (its peak must not include this one)
        stats = jax.local_devices()[0].memory_stats() or {}
        timed = np.asarray(times[1 + args.warmup:])
        row = {"mode": mode["name"], "step_s_mean": float(timed.mean()), "step_s_min": float(timed.min()),
               "step_s_max": float(timed.max()), "load_1min": os.getloadavg()[0], "devices": mesh.size,
               "peak_bytes_in_use_so_far": stats.get("peak_bytes_in_use")}
        out.append(row)
        if PROGRESS is not None:  # bench.gpu_check keeps each mode's row as soon as it is measured
            PROGRESS("measured", {r["mode"]: r for r in out})
        print(f"[bench.modes] {args.shape} {mode['name']}: step {row['step_s_mean']:.4f} s mean, {row['step_s_min']:.4f} "
              f"min, {row['step_s_max']:.4f} max over {len(timed)} steps ({row['devices']} devices; load "
              f"{row['load_1min']:.1f})", flush=True)
    return out


def main(argv=None):
    args = parse_args(argv)
    import jax

    rows = timing(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "platform": jax.devices()[0].platform,
                       "jax_version": jax.__version__, "rows": rows}, f, indent=2, default=str)
    return rows


if __name__ == "__main__":
    main()
