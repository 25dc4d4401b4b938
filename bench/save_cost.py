"""What a checkpoint save costs the train loop, async vs sync (trainer.checkpoint.async_save).

    python -m bench.save_cost [--model_dir DIR] [--steps 9] [--every 3] [--rounds 2] [--json PATH]

The smoke recipe's tiny model (or DIR) on all devices (dp = device count), jaxsft's own train step
and Checkpointer: `steps` steps after a warm-up step, saving every `every` steps, once without
saves, once with async saves, once with sync saves; `rounds` interleaved rounds, the fastest of
each (other jobs share a CPU). Printed per save: how long the loop was blocked in `save`, and how
much the run took longer than the loop without saves (the background write included).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

MODES = ("none", "async", "sync")


def measure(model_dir: Path, work: Path, steps: int, every: int, rounds: int) -> dict:
    import jax

    from jaxsft import checkpoint, config, hf, optim, parallel, step
    from jaxsft.settings import ModelSettings

    def run_settings(keys: dict):
        return config.settings_from({"data.train_files": "/unused/train.parquet", "model.partial_pretrain": str(model_dir),
                                     "trainer.logger": ["console"], **keys})

    cfg = run_settings({})
    model = ModelSettings(param_dtype="float32", compute_dtype="float32", remat_policy="none", attn_implementation="xla")
    mesh = parallel.make_mesh(jax.device_count(), 1)
    tx, schedule = optim.make_optimizer(cfg.optim, 100, "float32")
    rng = np.random.default_rng(0)
    shape = (1, jax.device_count(), 256)
    batch = {"input_ids": rng.integers(0, 1500, shape), "positions": np.broadcast_to(np.arange(256), shape),
             "segment_ids": np.ones(shape), "loss_mask": np.ones(shape)}
    with jax.set_mesh(mesh):
        graphdef, rest, state, _ = step.init_train_state(hf.load_model(model_dir, mesh, model), tx, mesh)
        batch = jax.device_put({k: v.astype(np.int32) for k, v in batch.items()}, parallel.batch_sharding(mesh))
        train_step = jax.jit(step.make_train_step(graphdef, rest, tx, schedule,
                                                  step.StepConfig("global_tokens", False, shape[1], 512)),
                             donate_argnums=0)
        state_mb = sum(x.nbytes for x in jax.tree.leaves(state)) / 1e6

        def loop(mode: str, round_: int) -> tuple[float, float]:
            """(loop seconds, seconds blocked in save) for `steps` steps after a warm-up step and save."""
            nonlocal state
            ckpt, run_dir = None, work / f"{mode}{round_}"
            if mode != "none":
                s = run_settings({"trainer.default_local_dir": str(run_dir),
                                  "trainer.checkpoint.async_save": mode == "async"})
                ckpt = checkpoint.Checkpointer(s.checkpoint, base_model_dir=model_dir, max_length=s.data.max_length)
            t0, blocked = time.perf_counter(), 0.0
            for s in range(steps + 1):
                if s == 1:  # the first step and save are warm-up (compilation, directory layout)
                    t0, blocked = time.perf_counter(), 0.0
                state, m = train_step(state, batch)
                if ckpt is not None and s % every == 0:
                    jax.block_until_ready(state)  # time the save, not the step it waits for
                    t = time.perf_counter()
                    ckpt.save(s + 1, state, data_state={"next_step": s + 1})
                    blocked += time.perf_counter() - t
                if ckpt is not None:
                    ckpt.poll()
                jax.block_until_ready(m)
            if ckpt is not None:
                ckpt.close()  # the last background write counts too
                last = run_dir / f"global_step_{steps + 1}"
                if not checkpoint.is_complete(last):
                    raise RuntimeError(f"{last} is not a complete checkpoint after the {mode} saves")
            return time.perf_counter() - t0, blocked

        timings = [(mode, loop(mode, r)) for r in range(rounds) for mode in MODES]
    best = {mode: [min(t[i] for m, t in timings if m == mode) for i in (0, 1)] for mode in MODES}
    saves, alone = steps // every, best["none"][0]
    return {"state_mb": state_mb, "steps": steps, "saves": saves, "step_ms": alone / steps * 1e3,
            **{f"{mode}_blocked_ms_per_save": best[mode][1] / saves * 1e3 for mode in MODES[1:]},
            **{f"{mode}_added_ms_per_save": (best[mode][0] - alone) / saves * 1e3 for mode in MODES[1:]}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", type=Path, help="an HF model directory (default: the smoke recipe's tiny model)")
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.steps < args.every or args.every < 1 or args.rounds < 1:
        p.error("--steps must be at least --every, and --every and --rounds at least 1")
    with tempfile.TemporaryDirectory(prefix="save_cost.") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from jaxsft import bundled, tiny

            model_dir = tiny.ensure_tiny_model(Path(tmp) / "model", bundled.path("tokenizer"))
        r = measure(model_dir, Path(tmp), args.steps, args.every, args.rounds)
    print(f"[bench] train state {r['state_mb']:.1f} MB, a step takes {r['step_ms']:.0f} ms; per save: "
          + "; ".join(f"{m} blocks the loop {r[f'{m}_blocked_ms_per_save']:.0f} ms and adds "
                      f"{r[f'{m}_added_ms_per_save']:.0f} ms to the run" for m in MODES[1:]))
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
