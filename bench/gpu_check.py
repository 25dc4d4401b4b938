"""One-shot GPU check: everything the next step needs to know from ten minutes on one H100/H200.

    bash bench/gpu_check.sh [OUT_DIR]          # on the GPU machine (installs .whl/, then this)
    python -m bench.gpu_check --out DIR [--dry] # this alone; --dry: CPU, tiny shapes, no GPU parts

Sections, each in its own process with its own time limit (a hang or a crash costs that section
only), in this order, under one overall deadline (--budget-s, default 525 s = 8 min 45 s):

  env        versions, devices, memory of the device
  flash      the Pallas flash kernel's self-check, and forward/backward parity against the xla
             backend on the device (7B head geometry, packed rows, bf16)
  target     the device's own GpuTargetConfig, captured from an XLA dump, written to
             gpu_target_config.pbtxt (to replace the hand-written jaxsft/targets/*.txtpb)
  attention  the attention kernel alone, 7B heads, T = 4096, forward and forward+backward TFLOP/s:
             Pallas flash (jaxsft) vs cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`
             on unpacked rows) vs the xla backend
  step05b    Qwen2.5-0.5B shape, T = 4096: step time, tokens/s, MFU, measured peak memory, and the
             deviceless plan of the same step (hand-written proto and captured one) beside it
  step7b     Qwen2.5-7B shape, T = 4096, bf16 state, full remat, flash: step time and MFU
  torch      seed-like lengths, packed jaxsft vs the padded torch baseline (0.5B): loss-tokens/s ratio
  offload    optimizer offload (0.5B, T = 4096, K = 8, bf16, full remat): measured step time and peak
             memory with the moments streamed from pinned_host, then without offload, beside the
             XLA:GPU plans of both (the plan's offload route, jaxsft.plan.compile_train_step)

Writes DIR/gpu_check.json (every figure, every section's status and error) and DIR/gpu_check.md
(one table). --dry runs the same code paths on the CPU with tiny shapes and skips only what needs a
GPU (cuDNN, the device's memory counters, the Pallas kernel compiled for real: it runs in
interpret mode instead), so the script is known to work before a GPU is spent on it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("env", "flash", "target", "attention", "step05b", "step7b", "torch", "offload")
LIMIT_S = {"env": 60, "flash": 90, "target": 60, "attention": 90, "step05b": 150, "step7b": 180, "torch": 150,
           "offload": 150}
DRY_LIMIT_S = {"env": 60, "flash": 240, "target": 120, "attention": 240, "step05b": 300, "step7b": 300, "torch": 300,
               "offload": 300}


# ---- the sections (each runs in a child process) ------------------------------------------------------


def section_env(args) -> dict:
    import importlib.metadata as md
    import platform

    import jax

    versions = {}
    for name in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint",
                 "grain", "ml_collections", "tensorboardX", "transformers", "torch", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    d = jax.devices()[0]
    stats = d.memory_stats() or {}
    return {"python": platform.python_version(), "versions": versions, "backend": jax.default_backend(),
            "devices": [str(x) for x in jax.devices()], "device_kind": d.device_kind,
            "compute_capability": getattr(d, "compute_capability", None),
            "bytes_limit": stats.get("bytes_limit"), "memory_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")}


def _rel(a, b) -> float:
    import jax.numpy as jnp

    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-6))


def section_flash(args) -> dict:
    """flash.self_check, then flash vs xla on a packed row with 7B heads (28 q / 4 kv, D 128)."""
    import functools

    import jax
    import jax.numpy as jnp

    from jaxsft.model import attention, flash

    out = {}
    if not args.dry:
        ok, why = flash.self_check()
        out["self_check"] = {"ok": ok, "why": why}
    t, hq, hkv, d = (256, 4, 2, 64) if args.dry else (2048, 28, 4, 128)
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (2, t, hq, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (2, t, hkv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (2, t, hkv, d), jnp.bfloat16)
    cut = [t // 3, t // 3 + t // 2]
    seg = jnp.concatenate([jnp.full((2, cut[0]), 1), jnp.full((2, cut[1] - cut[0]), 2),
                           jnp.zeros((2, t - cut[1]), int)], axis=1)
    cot = jax.random.normal(keys[3], (2, t, hq, d), jnp.float32)
    kernel = functools.partial(flash.flash_attention, interpret=args.dry)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, seg).astype(jnp.float32) * cot)

    got = jax.jit(jax.value_and_grad(functools.partial(loss, kernel), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.jit(jax.value_and_grad(functools.partial(loss, attention.xla_attention), argnums=(0, 1, 2)))(q, k, v)
    errs = {name: _rel(a, r) for name, a, r in zip(("loss", "dq", "dk", "dv"), jax.tree.leaves(got),
                                                   jax.tree.leaves(ref))}
    out.update(shape={"B": 2, "T": t, "Hq": hq, "Hkv": hkv, "D": d, "segments": [cut[0], cut[1] - cut[0]]},
               rel_err_vs_xla=errs, parity_ok=all(e <= 2e-2 for e in errs.values()), interpret=args.dry)
    return out


def section_target(args) -> dict:
    """Compile one small function with --xla_dump_to (set by the parent for this child only) and
    keep the gpu_target_config.pbtxt XLA writes; --dry: the same for a deviceless h100."""
    import jax
    import jax.numpy as jnp

    dump = Path(args.out) / "xla_dump_target"
    if args.dry:
        from jaxsft import plan

        t = plan.get_target("h100:1")
        s = jax.sharding.SingleDeviceSharding(t.devices[0])
        x = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=s)
        jax.jit(lambda a: jnp.tanh(a @ a)).lower(x).compile()
    else:
        jax.block_until_ready(jax.jit(lambda a: jnp.tanh(a @ a))(jnp.ones((256, 256))))
    found = sorted(dump.glob("*gpu_target_config.pbtxt"))
    if not found:
        raise RuntimeError(f"XLA wrote no *gpu_target_config.pbtxt under {dump}")
    text = found[0].read_text()
    dest = Path(args.out) / "gpu_target_config.pbtxt"
    dest.write_text(text)
    import re

    fields = {k: re.search(rf"{k}:\s*\"?([^\"\n]+)", text) for k in ("device_memory_size", "core_count",
                                                                    "memory_bandwidth", "clock_rate_ghz", "name")}
    return {"file": str(dest), **{k: m.group(1) if m else None for k, m in fields.items()}}


def _time(fn, *a, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*a))  # compile + warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        r = fn(*a)
    jax.block_until_ready(r)
    return (time.perf_counter() - t0) / repeats


def section_attention(args) -> dict:
    """fwd and fwd+bwd time of one attention call, B=1, 7B heads, T=4096 (dry: tiny, CPU).
    FLOPs (causal, FlashAttention's convention): forward 2·B·Hq·T²·D, backward 2.5× that."""
    import functools

    import jax
    import jax.numpy as jnp

    from jaxsft.model import attention, flash

    b, t, hq, hkv, d = (1, 256, 4, 2, 64) if args.dry else (1, 4096, 28, 4, 128)
    keys = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(keys[0], (b, t, hq, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, t, hkv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, hkv, d), jnp.bfloat16)
    seg = jnp.ones((b, t), jnp.int32)
    fwd_flops = 2.0 * b * hq * t * t * d
    impls = {"xla": lambda q, k, v: attention.xla_attention(q, k, v, seg),
             "flash": lambda q, k, v: flash.flash_attention(q, k, v, seg, interpret=args.dry)}
    if not args.dry:
        impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    out = {"shape": {"B": b, "T": t, "Hq": hq, "Hkv": hkv, "D": d}, "forward_flops": fwd_flops,
           "backward_flops": 2.5 * fwd_flops}
    ref = None
    for name, fn in impls.items():
        try:
            f = jax.jit(fn)
            g = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
            o = f(q, k, v)
            ref = o if ref is None else ref
            reps = 2 if args.dry else 20
            tf, tb = _time(f, q, k, v, repeats=reps), _time(g, q, k, v, repeats=reps)
            out[name] = {"forward_s": tf, "forward_backward_s": tb, "forward_tflops": fwd_flops / tf / 1e12,
                         "forward_backward_tflops": 3.5 * fwd_flops / tb / 1e12, "rel_err_vs_xla": _rel(o, ref)}
        except Exception as e:  # one backend failing must not hide the others
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    return out


def _throughput(argv: list[str]) -> dict:
    from bench import throughput

    return throughput.main(argv)


def section_step05b(args) -> dict:
    """Measured step of the 0.5B shape (bench.throughput, jaxsft only) and its deviceless plans."""
    shape, t, batch = ("tiny", 256, 4) if args.dry else ("qwen2.5-0.5b", 4096, 8)
    argv = ["--shape", shape, "--seq-len", str(t), "--global-batch", str(batch), "--micro-batch", "1",
            "--steps", "3", "--warmup", "1", "--no-torch", "--remat", "minimal",
            "--attn", "xla" if args.dry else "flash", "--json", str(Path(args.out) / "step05b_throughput.json")]
    r = _throughput(argv)
    j = r["jaxsft"]
    out = {"command": r["command"], "batch_shape": j["batch_shape"], "step_s": j["step_s"],
           "tokens_per_s_per_device": j["tokens_per_s_per_device"], "mfu_maxtext": j["mfu_maxtext"],
           "compile_s": j["compile_s"], "measured_peak_bytes": j["peak_memory_bytes"],
           "measured_peak_kind": j["peak_memory_kind"], "compiled_on_device": j["compiled_memory"]}
    out["plans"] = _deviceless_plans(args, shape, t, j["batch_shape"], j["settings"])
    return out


def _deviceless_plans(args, shape, t, batch_shape, settings, offload: bool = False) -> dict:
    """The same step planned with jaxsft.plan for the matching deviceless target: once with the
    hand-written proto, once with the config captured by the `target` section (if any)."""
    import ml_collections

    from bench.throughput import SHAPES
    from jaxsft import config as jconfig, optim, plan, step
    from jaxsft.model.config import Qwen2Config
    from jaxsft.model.qwen2 import ModelSettings

    kind = os.environ.get("GPU_CHECK_KIND", "h100")
    configs = {"proto": None}
    captured = Path(args.out) / "gpu_target_config.pbtxt"
    if captured.is_file() and not args.dry:
        configs["captured"] = captured
    out = {}
    for label, path in configs.items():
        try:
            target = plan.get_target(f"{kind}:1", config_path=path)
            tx, sched = optim.make_optimizer(ml_collections.ConfigDict(jconfig.default_config().optim.to_dict()), 1000,
                                             settings["param_dtype"])
            p = plan.make_plan(Qwen2Config.from_hf_dict(SHAPES[shape]), ModelSettings(**settings), target, dp=1, sp=1,
                               batch_shape=batch_shape, tx=tx, lr_schedule=sched,
                               step_cfg=step.StepConfig("global_tokens", False, 1, 512),
                               mode=plan.Mode(optimizer_offload=offload))
            out[label] = {"per_device_peak_bytes": p.per_device_peak_bytes, "temp_bytes": p.temp_bytes,
                          "argument_bytes": p.argument_bytes, "target_config": p.target_config,
                          "step_flops": p.step_flops, "host_peak_bytes": p.host_peak_bytes}
        except Exception as e:
            out[label] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    return out


def section_step7b(args) -> dict:
    shape, t = ("tiny", 256) if args.dry else ("qwen2.5-7b", 4096)
    argv = ["--shape", shape, "--seq-len", str(t), "--global-batch", "1", "--micro-batch", "1", "--steps", "3",
            "--warmup", "1", "--no-torch", "--remat", "full", "--param-dtype", "bfloat16",
            "--attn", "xla" if args.dry else "flash", "--json", str(Path(args.out) / "step7b_throughput.json")]
    r = _throughput(argv)
    j = r["jaxsft"]
    return {"command": r["command"], "batch_shape": j["batch_shape"], "step_s": j["step_s"],
            "tokens_per_s_per_device": j["tokens_per_s_per_device"], "mfu_maxtext": j["mfu_maxtext"],
            "tflops_per_device_maxtext": j["tflops_per_device_maxtext"], "compile_s": j["compile_s"],
            "measured_peak_bytes": j["peak_memory_bytes"], "measured_peak_kind": j["peak_memory_kind"],
            "compiled_on_device": j["compiled_memory"]}


def section_torch(args) -> dict:
    shape, t, batch = ("tiny", 256, 8) if args.dry else ("qwen2.5-0.5b", 4096, 16)
    argv = ["--shape", shape, "--seq-len", str(t), "--global-batch", str(batch), "--micro-batch", "1",
            "--steps", "2", "--warmup", "1", "--lengths", "seed", "--packing", "first_fit", "--remat", "minimal",
            "--attn", "xla" if args.dry else "flash", "--json", str(Path(args.out) / "torch_throughput.json")]
    r = _throughput(argv)
    return {"command": r["command"], "ratios": r["ratios"], "lengths": r["lengths"],
            "jaxsft_batch_shape": r["jaxsft"]["batch_shape"], "torch_batch_shape": r["torch"]["batch_shape"],
            "jaxsft_loss_tokens_per_s": r["jaxsft"]["loss_tokens_per_s_per_device"],
            "torch_loss_tokens_per_s": r["torch"]["loss_tokens_per_s_per_device"]}


def section_offload(args) -> dict:
    """bench.modes on the device (offload first: the peak counter only grows), then both modes
    planned deviceless for the same step."""
    from bench import modes

    shape, t, batch = ("tiny", 256, 4) if args.dry else ("qwen2.5-0.5b", 4096, 8)
    argv = ["time", "--shape", shape, "--seq-len", str(t), "--global-batch", str(batch), "--micro-batch", "1",
            "--steps", "3", "--warmup", "1", "--remat", "full", "--param-dtype", "bfloat16",
            "--mode", "offload", "--mode", "full", "--json", str(Path(args.out) / "offload_modes.json")]
    rows = {r["mode"]: r for r in modes.main(argv)}
    out = {"command": "python -m bench.modes " + shlex.join(argv), "measured": rows}
    settings = dict(param_dtype="bfloat16", compute_dtype="bfloat16", scan_layers=True, remat_policy="full",
                    attn_implementation="xla")
    out["plans"] = {name: _deviceless_plans(args, shape, t, [batch, 1, t], settings, offload=name == "offload")
                    for name in ("offload", "full")}
    return out


# ---- the parent: run every section, collect, write -------------------------------------------------------


def run_section(name: str, args, limit: float) -> dict:
    """`python -m bench.gpu_check --section NAME` in a child with a time limit."""
    result = Path(args.out) / f"section_{name}.json"
    result.unlink(missing_ok=True)
    env = dict(os.environ)
    if args.dry:
        env.setdefault("JAX_PLATFORMS", "cpu")
    if name == "target":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={Path(args.out) / 'xla_dump_target'}").strip()
    cmd = [sys.executable, "-m", "bench.gpu_check", "--section", name, "--out", args.out] + (["--dry"] if args.dry else [])
    t0 = time.perf_counter()
    log = Path(args.out) / f"section_{name}.log"
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=limit)
            status = "ok" if proc.returncode == 0 and result.is_file() else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
    out = json.loads(result.read_text()) if result.is_file() else {}
    out.setdefault("status", status)
    out["wall_s"] = time.perf_counter() - t0
    if status != "ok" and "error" not in out:
        out["error"] = _log_tail(log)
    return out


def _log_tail(log: Path) -> str:
    lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip() and "cudart_stub" not in l]
    return "\n".join(lines[-6:])[-1500:]


def _child(args) -> None:
    fn = globals()[f"section_{args.section}"]
    path = Path(args.out) / f"section_{args.section}.json"
    try:
        out = {"status": "ok", **fn(args)}
    except Exception as e:
        traceback.print_exc()
        out = {"status": "failed", "error": f"{type(e).__name__}: {str(e)[:1000]}"}
    path.write_text(json.dumps(out, indent=1, default=str) + "\n")


def _fmt(x, f="{:.3g}") -> str:
    return "—" if x is None else f.format(x)


def markdown(report: dict) -> str:
    s, G = report["sections"], 2**30
    rows = [("section", "status", "figures")]

    def get(name, *path):
        node = s.get(name, {})
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
        return node

    env = s.get("env", {})
    rows.append(("env", env.get("status"), f"{env.get('device_kind')}, jax {get('env', 'versions', 'jax')}, "
                 f"bytes_limit {_fmt((env.get('bytes_limit') or 0) / G, '{:.1f}')} GiB"))
    fl = s.get("flash", {})
    rows.append(("flash", fl.get("status"), f"self-check {get('flash', 'self_check', 'ok')}; max rel. err vs xla "
                 + ", ".join(f"{k} {_fmt(v, '{:.1e}')}" for k, v in (fl.get("rel_err_vs_xla") or {}).items())))
    tg = s.get("target", {})
    rows.append(("target", tg.get("status"), f"{tg.get('name')}: memory {tg.get('device_memory_size')} B, "
                 f"{tg.get('core_count')} SMs, bandwidth {tg.get('memory_bandwidth')} B/s -> {tg.get('file')}"))
    at = s.get("attention", {})
    rows.append(("attention", at.get("status"), "; ".join(
        f"{k}: fwd {_fmt(v.get('forward_tflops'))}, fwd+bwd {_fmt(v.get('forward_backward_tflops'))} TFLOP/s"
        if "error" not in v else f"{k}: {v['error'][:80]}"
        for k, v in at.items() if isinstance(v, dict) and k not in ("shape",))))
    for name in ("step05b", "step7b"):
        st = s.get(name, {})
        plans = st.get("plans") or {}
        planned = ", ".join(f"plan ({k}) {_fmt((v.get('per_device_peak_bytes') or 0) / G, '{:.2f}')} GiB"
                            for k, v in plans.items() if "error" not in v)
        rows.append((name, st.get("status"), f"batch {st.get('batch_shape')}, step {_fmt(st.get('step_s'))} s, "
                     f"{_fmt(st.get('tokens_per_s_per_device'), '{:.0f}')} tok/s/device, MFU "
                     f"{_fmt(st.get('mfu_maxtext'), '{:.1%}')}, measured peak "
                     f"{_fmt((st.get('measured_peak_bytes') or 0) / G, '{:.2f}')} GiB ({st.get('measured_peak_kind')})"
                     + (f"; {planned}" if planned else "")))
    tr = s.get("torch", {})
    rows.append(("torch", tr.get("status"), f"seed-like, packed jaxsft / padded torch: loss-tokens/s "
                 f"{_fmt(get('torch', 'ratios', 'loss_tokens_per_s'), '{:.2f}')}×"))
    of = s.get("offload", {})
    measured = of.get("measured") or {}
    rows.append(("offload", of.get("status"), "; ".join(
        f"{m}: step {_fmt(r.get('step_s_mean'))} s, peak so far "
        f"{_fmt((r.get('peak_bytes_in_use_so_far') or 0) / G, '{:.2f}')} GiB, plan "
        f"{_fmt((get('offload', 'plans', m, 'proto', 'per_device_peak_bytes') or 0) / G, '{:.2f}')} GiB"
        for m, r in measured.items())))
    lines = [f"# GPU check {report['date']} ({'dry, CPU' if report['dry'] else report.get('device')})", "",
             f"`{report['command']}`, {report['wall_s']:.0f} s wall", ""]
    lines += ["| " + " | ".join(rows[0]) + " |", "|---|---|---|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in r) + " |" for r in rows[1:]]
    for name in SECTIONS:
        err = s.get(name, {}).get("error")
        if err:
            lines += ["", f"**{name}**: `{err.splitlines()[-1][:300]}`"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="result folder (default $OUT)")
    p.add_argument("--dry", action="store_true", help="CPU only, tiny shapes; skips what needs a GPU")
    p.add_argument("--budget-s", type=float, default=525.0, help="overall deadline for all sections")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)  # internal: run one section here
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.section:
        return _child(args)
    import datetime as dt

    t0 = time.perf_counter()
    limits = DRY_LIMIT_S if args.dry else LIMIT_S
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "dry": args.dry,
              "command": "python -m bench.gpu_check " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "sections": {}}
    for name in args.sections:
        left = args.budget_s - (time.perf_counter() - t0)
        if left < 15:
            report["sections"][name] = {"status": "skipped: overall budget spent"}
            continue
        if name in ("step05b", "step7b", "offload") and report["sections"].get("env", {}).get("device_kind"):
            kind = report["sections"]["env"]["device_kind"].lower()
            os.environ["GPU_CHECK_KIND"] = "h200" if "h200" in kind else "h100"
        print(f"[gpu_check] {name} (limit {min(limits[name], left):.0f} s)", flush=True)
        report["sections"][name] = r = run_section(name, args, min(limits[name], left))
        print(f"[gpu_check] {name}: {r['status']} in {r['wall_s']:.0f} s", flush=True)
    report["device"] = report["sections"].get("env", {}).get("device_kind")
    report["wall_s"] = time.perf_counter() - t0
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (Path(args.out) / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
