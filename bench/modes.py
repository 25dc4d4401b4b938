"""Memory plans and step times of the training modes: full fine-tuning, LoRA, new-token rows, and
optimizer-state offload.

    python -m bench.modes plan --shape qwen2.5-7b --seq-len 4096 --param-dtype bfloat16 --remat full \\
        --mode full --mode lora:32 --mode offload --mode new_tokens:64 [--json FILE]
    python -m bench.modes time --shape tiny --seq-len 512 --global-batch 8 --steps 10 \\
        --mode full --mode offload --mode lora:8 [--json FILE]

`plan` lowers and compiles the real train step for abstract (never allocated) state on one device
and reports XLA's memory plan (`compiled.memory_analysis()`: arguments = parameters + optimizer
state, temp, and the host_* figures for pinned_host buffers). On a CPU the compiler is XLA:CPU,
whose plan counts pinned_host buffers as device memory: it sizes the optimizer state per mode but
says nothing of what offload saves on a GPU (that needs an XLA:GPU plan or a GPU).

`time` runs each mode's jitted step on random weights and fixed-length batches (1 + warmup untimed
steps, then `--steps` timed ones, each ended by reading its loss), on every device.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import types

import numpy as np

from bench.throughput import SHAPES, jaxsft_batches, random_model, sample_lengths

_GIB = 2 ** 30


def _size(n: int) -> str:
    return f"{n / _GIB:.2f} GiB" if n >= 2 ** 28 else f"{n / 2 ** 20:.2f} MiB"


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
    p.add_argument("what", choices=("plan", "time"))
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--global-batch", type=int, default=1, help="samples per step (time: over every device)")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--remat", default="full")
    p.add_argument("--attn", default="xla")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mode", type=parse_mode, action="append", required=True)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def _build(args, mode, mesh, abstract: bool):
    """(graphdef, rest, state, shardings, partition, tx, schedule, config) for one mode."""
    import dataclasses

    import jax
    import ml_collections
    from flax import nnx

    from jaxsft import config as jconfig, offload, optim, step, trainable
    from jaxsft.model.config import Qwen2Config
    from jaxsft.model.lora import MODULES, LoRASettings
    from jaxsft.model.qwen2 import ModelSettings, Qwen2ForCausalLM

    config = Qwen2Config.from_hf_dict(SHAPES[args.shape])
    base_vocab = config.vocab_size
    config = dataclasses.replace(config, vocab_size=base_vocab + mode["new_tokens"])
    lora = LoRASettings(rank=mode["lora"], alpha=2.0 * mode["lora"], targets=MODULES) if mode["lora"] else None
    settings = ModelSettings(param_dtype=args.param_dtype, compute_dtype=args.compute_dtype, remat_policy=args.remat,
                             attn_implementation=args.attn, lora=lora)
    spec = types.SimpleNamespace(lora=lora, trainable=("new_token_embeddings",) if mode["new_tokens"] else ("all",))
    trained_dtype = "float32" if lora else args.param_dtype
    tx, schedule = optim.make_optimizer(ml_collections.ConfigDict(jconfig.default_config().optim.to_dict()),
                                        total_steps=1000, param_dtype=trained_dtype)
    if not abstract:
        model = random_model(config, settings, mesh, seed=0)
        graphdef, params, _ = nnx.split(model, nnx.Param, ...)
        part = trainable.partition(params, spec, config, tuple(range(base_vocab, config.vocab_size)))
        graphdef, rest, state, shardings = step.init_train_state(model, tx, mesh, part, optimizer_offload=mode["offload"],
                                                                 say=print)
        return graphdef, rest, state, shardings, part, tx, schedule, config
    model = nnx.eval_shape(lambda: Qwen2ForCausalLM(config, settings, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    part = trainable.partition(params, spec, config, tuple(range(base_vocab, config.vocab_size)))
    one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_state = jax.eval_shape(tx.init, jax.eval_shape(part.select, params))
    opt_shardings = jax.tree.map(lambda _: one, opt_state)
    if mode["offload"]:
        opt_shardings = offload.to_host_shardings(opt_state, opt_shardings, mesh, say=print)
    place = lambda tree, sh: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)  # noqa: E731
    state = {"params": place(params, jax.tree.map(lambda _: one, params)), "opt_state": place(opt_state, opt_shardings),
             "step": jax.ShapeDtypeStruct((), np.int32, sharding=one)}
    shardings = {"params": jax.tree.map(lambda _: one, params), "opt_state": opt_shardings, "step": one}
    return graphdef, rest, state, shardings, part, tx, schedule, config


def _sizes(tree) -> int:
    import jax

    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def plan(args) -> list[dict]:
    import jax

    from jaxsft import parallel, step

    mesh = parallel.make_mesh(1, 1)
    out = []
    for mode in args.mode:
        with jax.set_mesh(mesh):
            graphdef, rest, state, shardings, part, tx, schedule, config = _build(args, mode, mesh, abstract=True)
            lengths = sample_lengths("fixed", args.seq_len, 1, args.global_batch, 0)
            shape = jaxsft_batches(lengths, args.seq_len, 1, args.micro_batch, "none", config.vocab_size, 0)[0][
                "input_ids"].shape
            one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            batch = {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=one)
                     for k in ("input_ids", "positions", "segment_ids", "loss_mask")}
            cfg = step.StepConfig("global_tokens", False, 1, 512)
            fn = jax.jit(step.make_train_step(graphdef, rest, tx, schedule, cfg, part, shardings["opt_state"]),
                         donate_argnums=0, out_shardings=(shardings, one))
            t0 = time.perf_counter()
            compiled = fn.lower(state, batch).compile()
            ma = compiled.memory_analysis()
        fields = {f: int(getattr(ma, f)) for f in dir(ma) if f.endswith("_in_bytes")}
        row = {"mode": mode["name"], "batch_shape": list(shape), "compile_s": time.perf_counter() - t0,
               "params_bytes": _sizes(state["params"]), "opt_state_bytes": _sizes(state["opt_state"]),
               "trainable_values": part.count(state["params"])[0], **fields}
        out.append(row)
        print(f"[bench.modes] {args.shape} {mode['name']}: params {_size(row['params_bytes'])}, optimizer state "
              f"{_size(row['opt_state_bytes'])}; plan: arguments {_size(fields['argument_size_in_bytes'])}, temp "
              f"{_size(fields['temp_size_in_bytes'])}, host arguments {_size(fields['host_argument_size_in_bytes'])}; "
              f"compile {row['compile_s']:.1f} s", flush=True)
    return out


def timing(args) -> list[dict]:
    import jax

    from jaxsft import parallel, step

    mesh = parallel.make_mesh(jax.device_count(), 1)
    out = []
    for mode in args.mode:
        with jax.set_mesh(mesh):
            graphdef, rest, state, shardings, part, tx, schedule, config = _build(args, mode, mesh, abstract=False)
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
        timed = np.asarray(times[1 + args.warmup:])
        row = {"mode": mode["name"], "step_s_mean": float(timed.mean()), "step_s_min": float(timed.min()),
               "step_s_max": float(timed.max()), "load_1min": os.getloadavg()[0], "devices": jax.device_count()}
        out.append(row)
        print(f"[bench.modes] {args.shape} {mode['name']}: step {row['step_s_mean']:.4f} s mean, {row['step_s_min']:.4f} "
              f"min, {row['step_s_max']:.4f} max over {len(timed)} steps ({row['devices']} devices; load "
              f"{row['load_1min']:.1f})", flush=True)
    return out


def main(argv=None):
    args = parse_args(argv)
    import jax

    rows = plan(args) if args.what == "plan" else timing(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "platform": jax.devices()[0].platform,
                       "jax_version": jax.__version__, "rows": rows}, f, indent=2, default=str)
    return rows


if __name__ == "__main__":
    main()
