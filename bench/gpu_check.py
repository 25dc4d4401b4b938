"""One-shot GPU check: what ten minutes on one H100/H200 must tell, kept even if the run is cut short.

    bash bench/gpu_check.sh OUT                   # on the GPU machine: install .whl/, then this
    bash bench/gpu_check.sh OUT --dry             # rehearsal on a CPU: every section, tiny shapes
    python -m bench.gpu_check --out OUT [--dry]   # this alone

Sections run in this order (most valuable first), each in its own process group with its own time
limit (a hang, a crash or a failed import costs that section only, and the whole group — a torch
child included — is killed on timeout); the limits add up to less than the overall budget:

  preflight  versions, jax backend and device, which modules import (stops the run at once if jax
             has no GPU, except --dry)
  flash      the Pallas flash kernel's self-check, then its forward and gradients against the dense
             reference on a packed row with the 7B head geometry
  attention  the attention kernel alone, 7B heads, T = 4096: Pallas flash, cuDNN and the blockwise
             (xla) backend, forward and forward+backward TFLOP/s
  target     the device's GpuTargetConfig from an XLA dump (OUT/gpu_target_config.pbtxt), for
             deviceless plans made afterwards on any machine
  step7b     Qwen2.5-7B shape, T = 4096, bf16 state: step time, MFU, XLA's on-device memory plan vs
             the measured peak, and the roofline estimate of the compiled step beside the measurement
  step05b    the same for the 0.5B shape
  torch      seed-like lengths: packed jaxsft vs the padded torch baseline, loss-tokens/s ratio
  offload    optimizer offload vs none (0.5B): step time and peak memory of each

Each section records every figure as soon as it has it; the parent rewrites OUT/gpu_check.json
and OUT/gpu_check.md after every section (and while one runs), prints the summary, and keeps
OUT to four files: those two, gpu_target_config.pbtxt and logs.tar.gz (section logs, bench
JSONs, compiled HLO). Scratch lives under /tmp. --dry: JAX on the CPU, tiny shapes, the Pallas
kernel in interpret mode, cuDNN replaced by jax's xla attention, the target captured from a
deviceless H100 compile. GPU_CHECK_FAULTS=SECTION:hang|import|crash[,...] (only with --dry) makes
sections hang, fail at import or crash, to rehearse what a bad run leaves.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# modules the model sections need (flax may not import on a jax newer than it: google/flax#5596)
_MODEL = ("flax.nnx", "optax", "ml_collections", "jaxsft.model.decoder", "jaxsft.step", "bench.throughput")


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    limit_s: float  # on the GPU
    dry_limit_s: float  # rehearsal on a CPU
    needs: tuple[str, ...]  # modules that must import (checked by preflight) for this section to run


SECTIONS = (
    Section("preflight", 20, 40, ("jax",)),
    Section("flash", 45, 60, ("jax", "jax.experimental.pallas.ops.gpu.attention", "jaxsft.model.flash",
                              "jaxsft.model.attention")),
    # runs without the Pallas ops too (jaxsft.model.attention imports them): cuDNN and blockwise still measure
    Section("attention", 50, 60, ("jax", "jaxsft.model.blockwise")),
    Section("target", 15, 30, ("jax",)),
    Section("step7b", 125, 90, _MODEL),
    Section("step05b", 55, 60, _MODEL),
    Section("torch", 60, 90, _MODEL + ("torch", "transformers")),
    Section("offload", 50, 180, _MODEL + ("jaxsft.offload", "bench.modes")),
)
BY_NAME = {s.name: s for s in SECTIONS}
BUDGET_S = 430.0  # GPU: the sections' limits (420 s) + the parent's own start and writes
DRY_BUDGET_S = 620.0  # ceilings for a loaded 2-core CI machine; an idle one needs far less
MAX_TAR_BYTES = 15 * 2**20  # what comes back is at most 16 MiB a file
FAULTS = ("hang", "import", "crash")


# ---- the child side: one section, figures recorded as they come ---------------------------------------


class Recorder:
    """A section's figures, rewritten to its JSON file (atomically) on every put."""

    def __init__(self, path: Path, fault: str | None = None):
        self.path, self.figures, self.fault = path, {}, fault

    def put(self, key: str, value) -> None:
        self.figures[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.figures, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)
        if self.fault == "crash":  # rehearsal: die by a signal once a figure is safe
            os.kill(os.getpid(), signal.SIGSEGV)
        if self.fault == "hang":  # rehearsal: hang with a child of our own, as a stuck torch child would
            child = subprocess.Popen(["sleep", "600"])
            self.fault = None
            self.put("fault_grandchild_pid", child.pid)
            time.sleep(3600)


class SectionImportError(ImportError):
    pass


@contextlib.contextmanager
def guard(what: str, importing: bool = False):
    """Turn a failure of a private / experimental jax API into one sentence naming it."""
    try:
        yield
    except Exception as e:
        import importlib.metadata as md

        try:
            version = md.version("jax")
        except md.PackageNotFoundError:
            version = "?"
        first = (str(e).strip().splitlines() or [""])[0][:300]
        msg = f"{what} failed on jax {version}: {type(e).__name__}: {first}"
        raise (SectionImportError(msg) if importing or isinstance(e, ImportError) else RuntimeError(msg)) from e


def _rel(a, b) -> float:
    import jax.numpy as jnp

    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-6))


def section_preflight(args, rec: Recorder) -> None:
    import importlib
    import importlib.metadata as md
    import importlib.util
    import platform

    versions = {}
    for name in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint",
                 "transformers", "torch", "grain", "ml_collections", "tensorboardX", "omegaconf", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    rec.put("python", platform.python_version())
    rec.put("versions", versions)
    rec.put("nvidia_driver", Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists())
    import jax

    rec.put("backend", jax.default_backend())
    d = jax.devices()[0]
    stats = d.memory_stats() or {}
    rec.put("device_kind", d.device_kind)
    rec.put("device_count", jax.device_count())
    rec.put("compute_capability", getattr(d, "compute_capability", None))
    rec.put("bytes_limit", stats.get("bytes_limit"))
    rec.put("memory_kinds", sorted(m.kind for m in d.addressable_memories()))
    rec.put("env", {k: os.environ.get(k) for k in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_FLAGS", "JAX_PLATFORMS")})
    if jax.default_backend() != "gpu" and not args.dry:
        rec.put("stop", f"jax's backend is {jax.default_backend()!r} ({d.device_kind}), not a GPU: nothing here would "
                        f"measure a GPU (nvidia driver files present: {rec.figures['nvidia_driver']})")
        return
    imports = {}
    for mod in sorted({m for s in SECTIONS for m in s.needs}):
        if mod in ("torch", "transformers"):  # seconds to import, and only the torch section needs them
            imports[mod] = "ok (found, not imported)" if importlib.util.find_spec(mod) else "not installed"
            continue
        try:
            importlib.import_module(mod)
            imports[mod] = "ok"
        except Exception as e:  # noqa: BLE001 - any failure is what this reports
            imports[mod] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    rec.put("imports", imports)


def section_flash(args, rec: Recorder) -> None:
    """flash.self_check, then flash vs the dense reference on packed rows with 7B heads (28 q / 4 kv, D 128)."""
    import functools

    with guard("jax.experimental.pallas.ops.gpu.attention (Pallas Triton ops, deprecated in jax 0.11)",
               importing=True):
        from jaxsft.model import flash
    from jaxsft.model.attention import reference_attention
    import jax
    import jax.numpy as jnp

    if args.dry:
        rec.put("self_check", {"ok": None, "why": "skipped: needs a GPU (the parity below runs the kernel interpreted)"})
    else:
        with guard("flash.self_check (Pallas Triton kernel)"):
            ok, why = flash.self_check()
        rec.put("self_check", {"ok": ok, "why": why})
    b, t, hq, hkv, d = (1, 128, 2, 1, 32) if args.dry else (1, 2048, 28, 4, 128)
    cut = [t // 3, t // 3 + t // 2]
    rec.put("shape", {"B": b, "T": t, "Hq": hq, "Hkv": hkv, "D": d, "segments": [cut[0], cut[1] - cut[0]],
                      "padding": t - cut[1]})
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (b, t, hq, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, t, hkv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, hkv, d), jnp.bfloat16)
    seg = jnp.concatenate([jnp.full((b, cut[0]), 1), jnp.full((b, cut[1] - cut[0]), 2),
                           jnp.zeros((b, t - cut[1]), int)], axis=1)
    cot = jax.random.normal(keys[3], (b, t, hq, d), jnp.float32)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, seg).astype(jnp.float32) * cot)

    kernel = functools.partial(flash.flash_attention, interpret=args.dry)
    ref = jax.jit(jax.value_and_grad(functools.partial(loss, reference_attention), argnums=(0, 1, 2)))(q, k, v)
    with guard("the Pallas flash kernel (forward + backward)"):
        got = jax.jit(jax.value_and_grad(functools.partial(loss, kernel), argnums=(0, 1, 2)))(q, k, v)
    errs = {name: _rel(a, r) for name, a, r in zip(("loss", "dq", "dk", "dv"), jax.tree.leaves(got),
                                                   jax.tree.leaves(ref))}
    rec.put("rel_err_vs_reference", errs)
    rec.put("parity_ok", all(e <= 2e-2 for e in errs.values()))
    rec.put("interpret", args.dry)


def _time(fn, *a, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*a))  # compile + warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        r = fn(*a)
    jax.block_until_ready(r)
    return (time.perf_counter() - t0) / repeats


def section_attention(args, rec: Recorder) -> None:
    """One attention call, B=1, 7B heads, T=4096: forward and forward+backward time per backend.
    FLOPs (causal, FlashAttention's convention): forward 2·B·Hq·T²·D, backward 2.5× that."""
    import jax
    import jax.numpy as jnp

    from jaxsft.model import blockwise

    b, t, hq, hkv, d = (1, 128, 2, 1, 32) if args.dry else (1, 4096, 28, 4, 128)
    keys = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(keys[0], (b, t, hq, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, t, hkv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, hkv, d), jnp.bfloat16)
    seg = jnp.ones((b, t), jnp.int32)
    fwd_flops = 2.0 * b * hq * t * t * d
    rec.put("shape", {"B": b, "T": t, "Hq": hq, "Hkv": hkv, "D": d})
    rec.put("forward_flops", fwd_flops)
    rec.put("backward_flops", 2.5 * fwd_flops)
    try:  # the error reference; its failure must not make any backend its own reference
        from jaxsft.model.attention import reference_attention  # imports the Pallas ops: may fail on a new jax

        ref = jax.jit(reference_attention)(q, k, v, seg)
    except Exception as e:  # noqa: BLE001
        ref = None
        rec.put("reference_error", f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")

    def flash_fn(q, k, v):
        with guard("jax.experimental.pallas.ops.gpu.attention (Pallas Triton ops, deprecated in jax 0.11)",
                   importing=True):
            from jaxsft.model import flash
        return flash.flash_attention(q, k, v, seg, interpret=args.dry)

    def cudnn_fn(q, k, v):  # dry: the same call with jax's xla implementation (cuDNN needs a GPU)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=None if args.dry else "cudnn")

    impls = {"flash": flash_fn, "cudnn": cudnn_fn,
             "blockwise": lambda q, k, v: blockwise.blockwise_attention(q, k, v, seg)}
    reps = 1 if args.dry else 10
    for name, fn in impls.items():
        try:
            f = jax.jit(fn)
            g = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
            tf = _time(f, q, k, v, repeats=reps)
            row = {"forward_s": tf, "forward_tflops": fwd_flops / tf / 1e12}
            rec.put(name, row)
            tb = _time(g, q, k, v, repeats=reps)
            row.update(forward_backward_s=tb, forward_backward_tflops=3.5 * fwd_flops / tb / 1e12,
                       rel_err_vs_reference=None if ref is None else _rel(f(q, k, v), ref))
            if args.dry and name == "cudnn":
                row["note"] = "dry: jax.nn.dot_product_attention(implementation=None), not cuDNN"
            rec.put(name, row)
        except Exception as e:  # one backend failing must not hide the others
            rec.put(name, {**rec.figures.get(name, {}),
                           "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"})


def section_target(args, rec: Recorder) -> None:
    """Compile one small function with --xla_dump_to (set by the parent for this child only) and keep
    the gpu_target_config.pbtxt XLA writes. --dry: the same for a deviceless H100 made from
    jaxsft/targets/h100.txtpb through jax.experimental.topologies (so no flax is needed)."""
    import re

    import jax
    import jax.numpy as jnp

    dump = Path(args.scratch) / "xla_dump_target"
    if args.dry:
        with guard("jax.experimental.topologies.get_topology_desc (deviceless CUDA devices)"):
            from jax.experimental import topologies

            text = (ROOT / "jaxsft" / "targets" / "h100.txtpb").read_text()
            topo = topologies.get_topology_desc(platform="cuda", target_config=text, topology="1x1x1")
            s = jax.sharding.SingleDeviceSharding(topo.devices[0])
            x = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=s)
            jax.jit(lambda a: jnp.tanh(a @ a)).lower(x).compile()
    else:
        jax.block_until_ready(jax.jit(lambda a: jnp.tanh(a @ a))(jnp.ones((256, 256))))
    found = sorted(dump.glob("*gpu_target_config.pbtxt"))
    if not found:
        raise RuntimeError(f"XLA wrote no *gpu_target_config.pbtxt under {dump} (its dump names may have changed)")
    text = found[0].read_text()
    dest = Path(args.out) / "gpu_target_config.pbtxt"
    dest.write_text(text)
    for key in ("name", "device_description_str", "device_memory_size", "core_count", "memory_bandwidth",
                "clock_rate_ghz", "l2_cache_size"):
        m = re.search(rf"\b{key}:\s*\"?([^\"\n]+)", text)
        if m:
            rec.put(key, m.group(1))
    rec.put("file", dest.name)


# --dry: step7b, step05b and torch's jaxsft side run one and the same tiny program (compiled once, cached)
_DRY_STEP = ["--shape", "tiny", "--seq-len", "128", "--global-batch", "1", "--micro-batch", "1", "--remat", "minimal",
             "--attn", "xla"]


def _steps(args, steps: int, warmup: int) -> list[str]:
    """Timed and warm-up steps; --dry: one timed step, none to warm up (the same code path, less CPU)."""
    return ["--steps", "1", "--warmup", "0"] if args.dry else ["--steps", str(steps), "--warmup", str(warmup)]


def _throughput(args, rec: Recorder, argv: list[str]) -> dict:
    """bench.throughput in this process, its progress (compile, memory plan, step times) recorded."""
    from bench import throughput

    throughput.PROGRESS = lambda key, value: rec.put(f"progress_{key}", value)
    argv = argv + ["--dp", "1"]  # one device
    rec.put("command", "python -m bench.throughput " + shlex.join(argv))
    return throughput.main(argv)


def _step(args, rec: Recorder, name: str, argv: list[str]) -> None:
    """A measured jaxsft step, its memory plan beside its measured peak, and its roofline estimate."""
    hlo = Path(args.scratch) / f"{name}.hlo.txt"
    r = _throughput(args, rec, argv + ["--no-torch", "--hlo-out", str(hlo)])
    j = r["jaxsft"]
    for key in ("device", "attention", "batch_shape", "settings", "step_s", "step_s_min", "tokens_per_s_per_device",
                "flops_per_step_maxtext", "tflops_per_device_maxtext", "mfu_maxtext", "compile_s", "losses"):
        rec.put(key, j.get(key))
    mem = j["compiled_memory"]
    planned = (mem.get("argument_size_in_bytes", 0) + mem.get("output_size_in_bytes", 0)
               - mem.get("alias_size_in_bytes", 0) + mem.get("temp_size_in_bytes", 0))
    rec.put("planned_peak_bytes", planned)
    rec.put("measured_peak_bytes", j["peak_memory_bytes"])
    rec.put("measured_peak_kind", j["peak_memory_kind"])
    if "device peak" in j["peak_memory_kind"] and planned:
        rec.put("measured_over_planned_peak", j["peak_memory_bytes"] / planned)
    with guard("jaxsft.roofline on the compiled step's HLO"):
        from jaxsft import roofline

        kind = "h200" if "h200" in str(j.get("device", "")).lower() else "h100"
        est = roofline.estimate(hlo.read_text(), kind, model_flops=j["flops_per_step_maxtext"])
        rec.put("roofline", {"target": kind, "step_s": est.step_s, "mfu": est.mfu, "shares": est.shares,
                             "flags": est.flags[:10], "top": est.top[:5], "summary": est.summary()})
        rec.put("measured_over_roofline", j["step_s"] / est.step_s if est.step_s else None)


def section_step7b(args, rec: Recorder) -> None:
    """Qwen2.5-7B at T = 4096 with the seed recipe's bf16 state and flash attention. Its per-device
    micro-batch 2 with remat `minimal` fits an H200; on an 80 GiB H100 one row with remat `full`
    (the plan: 59.6 GiB), the largest step of this shape that device holds."""
    if args.dry:
        argv = _DRY_STEP
    else:
        import jax

        limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0)
        big = limit >= 110 * 2**30
        rec.put("recipe", "seed: micro-batch 2, remat minimal" if big else "H100: micro-batch 1, remat full")
        argv = ["--shape", "qwen2.5-7b", "--seq-len", "4096", "--global-batch", "2" if big else "1", "--micro-batch",
                "2" if big else "1", "--remat", "minimal" if big else "full", "--attn", "flash"]
    _step(args, rec, "step7b", argv + [*_steps(args, 3, 1), "--param-dtype", "float32" if args.dry else "bfloat16",
                                       "--json", str(Path(args.scratch) / "step7b_throughput.json")])


def section_step05b(args, rec: Recorder) -> None:
    argv = _DRY_STEP if args.dry else ["--shape", "qwen2.5-0.5b", "--seq-len", "4096", "--global-batch", "8",
                                       "--micro-batch", "1", "--remat", "minimal", "--attn", "flash"]
    _step(args, rec, "step05b", argv + [*_steps(args, 3, 1), "--json", str(Path(args.scratch) / "step05b_throughput.json")])


def section_torch(args, rec: Recorder) -> None:
    shape, t, batch = ("tiny", 128, 2) if args.dry else ("qwen2.5-0.5b", 4096, 8)
    argv = ["--shape", shape, "--seq-len", str(t), "--global-batch", str(batch), "--micro-batch", "1",
            *_steps(args, 2, 1), "--lengths", "seed", "--packing", "first_fit", "--remat", "minimal",
            "--attn", "xla" if args.dry else "flash", "--json", str(Path(args.scratch) / "torch_throughput.json")]
    argv += ["--torch-inprocess"] if args.dry else []  # on the CPU one interpreter start less
    r = _throughput(args, rec, argv)
    rec.put("lengths", r["lengths"])
    rec.put("jaxsft_batch_shape", r["jaxsft"]["batch_shape"])
    rec.put("torch_batch_shape", r["torch"]["batch_shape"])
    rec.put("torch_device", r["torch"].get("device"))
    rec.put("jaxsft_loss_tokens_per_s", r["jaxsft"]["loss_tokens_per_s_per_device"])
    rec.put("torch_loss_tokens_per_s", r["torch"]["loss_tokens_per_s_per_device"])
    rec.put("ratios", r["ratios"])


def section_offload(args, rec: Recorder) -> None:
    """bench.modes: optimizer offload first (the peak counter only grows), then no offload."""
    import jax

    kinds = sorted(m.kind for m in jax.devices()[0].addressable_memories())
    rec.put("memory_kinds", kinds)
    if "pinned_host" not in kinds:
        raise RuntimeError(f"the device has no pinned_host memory (memory kinds {kinds}); offload cannot run here")
    from bench import modes

    shape, t, batch = ("tiny", 128, 2) if args.dry else ("qwen2.5-0.5b", 4096, 4)
    argv = ["time", "--shape", shape, "--seq-len", str(t), "--global-batch", str(batch), "--micro-batch", "1",
            *_steps(args, 2, 1), "--remat", "full", "--param-dtype", "bfloat16",
            "--mode", "offload", "--mode", "full", "--json", str(Path(args.scratch) / "offload_modes.json")]
    rec.put("command", "python -m bench.modes " + shlex.join(argv))
    modes.PROGRESS = rec.put
    rows = {r["mode"]: r for r in modes.main(argv)}
    rec.put("measured", rows)
    if rows.get("full") and rows.get("offload"):
        rec.put("offload_over_full_step", rows["offload"]["step_s_mean"] / rows["full"]["step_s_mean"])


def _child(args) -> None:
    """Run one section; its JSON holds {"figures", "status", "error"} whatever happens short of a kill."""
    path = Path(args.scratch) / f"{args.section}.json"
    faults = dict(f.split(":", 1) for f in os.environ.get("GPU_CHECK_FAULTS", "").split(",") if ":" in f)
    fault = faults.get(args.section) if args.dry else None
    rec = Recorder(Path(args.scratch) / f"{args.section}.figures.json", fault if fault in ("hang", "crash") else None)
    status, error = "ok", None
    try:
        if fault == "import":
            raise SectionImportError("No module named 'gpu_check_injected_fault' (GPU_CHECK_FAULTS)")
        globals()[f"section_{args.section}"](args, rec)
    except ImportError as e:
        traceback.print_exc()
        status, error = "import failed", f"{type(e).__name__}: {str(e)[:1000]}"
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the section's failure is its result (bench's SystemExits too)
        traceback.print_exc()
        status, error = "failed", f"{type(e).__name__}: {str(e)[:1000]}"
    path.write_text(json.dumps({"status": status, "error": error}) + "\n")


# ---- the parent: run every section, collect, write ----------------------------------------------------------


class Interrupted(Exception):
    pass


def _on_term(signum, frame):
    raise Interrupted(f"signal {signum}")


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _log_tail(log: Path, n: int = 6) -> str:
    try:
        lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip() and "cudart_stub" not in l
                 and "absl::InitializeLog" not in l]
    except OSError:
        return ""
    return "\n".join(lines[-n:])[-1500:]


def run_section(name: str, args, limit: float, on_progress) -> dict:
    """`python -m bench.gpu_check --section NAME` in a new session (its own process group), killed
    whole at `limit` seconds; its figures are read back while it runs and whatever it left after."""
    scratch = Path(args.scratch)
    for suffix in (".json", ".figures.json"):
        (scratch / f"{name}{suffix}").unlink(missing_ok=True)
    env = dict(os.environ)
    # no silent CPU fallback: on the GPU machine jax must find CUDA or fail
    env["JAX_PLATFORMS"] = "cpu" if args.dry else env.get("JAX_PLATFORMS", "cuda")
    if args.dry:  # one device, as the GPU machine (a test runner may force several CPU devices)
        env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                    if not f.startswith("--xla_force_host_platform_device_count"))
    if args.dry:  # the rehearsal's sections share tiny programs (model init, the step): compile each once
        env.update(JAX_COMPILATION_CACHE_DIR=str(scratch / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    if name == "target":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={scratch / 'xla_dump_target'}").strip()
    cmd = [sys.executable, "-m", "bench.gpu_check", "--section", name, "--out", args.out, "--scratch", args.scratch]
    cmd += ["--dry"] if args.dry else []
    log = scratch / "logs" / f"{name}.log"
    result = {"status": "running", "limit_s": round(limit, 1), "figures": {}}
    t0, cpu0 = time.monotonic(), _children_cpu()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=min(2.0, max(limit - (time.monotonic() - t0), 0.01)))
                    break
                except subprocess.TimeoutExpired:
                    result["figures"] = _read(scratch / f"{name}.figures.json")
                    result["wall_s"] = round(time.monotonic() - t0, 1)
                    on_progress()
                    if time.monotonic() - t0 >= limit:
                        rc = None
                        break
        except Interrupted:
            rc = "interrupted"
        finally:
            _kill_group(proc)
    end = _read(scratch / f"{name}.json")
    result["cpu_s"] = round(_children_cpu() - cpu0, 1)  # CPU seconds of the section's processes (waited for)
    result["figures"] = _read(scratch / f"{name}.figures.json")
    result["wall_s"] = round(time.monotonic() - t0, 1)
    if rc is None:
        result["status"] = f"timed out after {limit:.0f} s"
    elif rc == "interrupted":
        result["status"] = "interrupted (the whole run was stopped)"
    elif end.get("status"):
        result["status"] = end["status"]
        result["error"] = end.get("error")
    elif rc < 0:
        result["status"] = f"crashed (signal {-rc}: {signal.Signals(-rc).name})"
    else:
        result["status"] = f"failed (exit {rc})"
    if result["status"] != "ok" and not result.get("error"):
        result["error"] = _log_tail(log) or result["status"]
    if result.get("error") is None:
        result.pop("error", None)
    if rc == "interrupted":
        raise Interrupted(result)
    return result


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the section's whole process group (a torch child included)."""
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    try:  # the leader gone, a member may live on: KILL the group once more
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---- the summary --------------------------------------------------------------------------------------------


def _f(x, fmt="{:.3g}") -> str:
    return "—" if not isinstance(x, (int, float)) or isinstance(x, bool) else fmt.format(x)


def _gib(x) -> str:
    return _f(x / 2**30 if isinstance(x, (int, float)) else None, "{:.2f}") + " GiB"


def figures_line(name: str, fig: dict) -> str:
    """One line of the most telling figures of a section (the JSON has them all)."""
    if name == "preflight":
        bad = [m for m, v in (fig.get("imports") or {}).items() if not str(v).startswith("ok")]
        v = fig.get("versions") or {}
        return (f"{fig.get('device_kind')} ({fig.get('backend')}), jax {v.get('jax')}, flax {v.get('flax')}, "
                f"torch {v.get('torch')}, memory {_gib(fig.get('bytes_limit'))}; "
                + (f"imports failing: {', '.join(bad)}" if bad else "all imports ok" if fig.get("imports") else "")
                + (f"; STOP: {fig['stop']}" if fig.get("stop") else ""))
    if name == "flash":
        errs = fig.get("rel_err_vs_reference") or {}
        return (f"self-check {(fig.get('self_check') or {}).get('ok')}; parity {fig.get('parity_ok')} (max rel. err "
                + ", ".join(f"{k} {_f(e, '{:.1e}')}" for k, e in errs.items()) + ")")
    if name == "attention":
        parts = []
        for impl in ("flash", "cudnn", "blockwise"):
            r = fig.get(impl)
            if isinstance(r, dict):
                parts.append(f"{impl} fwd {_f(r.get('forward_tflops'))} / fwd+bwd "
                             f"{_f(r.get('forward_backward_tflops'))} TFLOP/s" + (" (error)" if "error" in r else ""))
        return "; ".join(parts)
    if name == "target":
        return (f"{fig.get('device_description_str') or fig.get('name')}: {fig.get('core_count')} SMs, memory "
                f"{fig.get('device_memory_size')} B, bandwidth {fig.get('memory_bandwidth')} B/s")
    if name in ("step7b", "step05b"):
        roof = fig.get("roofline") or {}
        steps = fig.get("progress_step_times_s")
        return (f"batch {fig.get('batch_shape')}, step {_f(fig.get('step_s'))} s, MFU {_f(fig.get('mfu_maxtext'), '{:.1%}')}"
                f" (roofline {_f(roof.get('step_s'))} s, MFU {_f(roof.get('mfu'), '{:.1%}')}); peak measured "
                f"{_gib(fig.get('measured_peak_bytes'))} vs planned {_gib(fig.get('planned_peak_bytes'))}"
                + ("" if fig.get("step_s") is not None or not steps else f"; step times so far {steps}"))
    if name == "torch":
        return (f"packed jaxsft / padded torch loss-tokens/s {_f((fig.get('ratios') or {}).get('loss_tokens_per_s'))}×"
                f" (torch on {fig.get('torch_device')})")
    if name == "offload":
        rows = fig.get("measured") or {}
        return "; ".join(f"{m}: step {_f(r.get('step_s_mean'))} s, peak so far {_gib(r.get('peak_bytes_in_use_so_far'))}"
                         for m, r in rows.items())
    return ""


def markdown(report: dict) -> str:
    lines = [f"# GPU check {report['date']} ({'dry run on the CPU' if report['dry'] else report.get('device')})", "",
             f"`{report['command']}`: {report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget"
             f"{'' if report['finished'] else ' (still running or cut short)'}", "",
             "| section | status | wall s / limit s | figures |", "|---|---|---|---|"]
    for name, r in report["sections"].items():
        cells = [name, r["status"], f"{_f(r.get('wall_s'), '{:.0f}')} / {_f(r.get('limit_s'), '{:.0f}')}",
                 figures_line(name, r.get("figures") or {})]
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    for name, r in report["sections"].items():
        if r.get("error"):
            lines += ["", f"**{name}**: `{r['error'].strip().splitlines()[-1][:300]}`"]
        for flag in ((r.get("figures") or {}).get("roofline") or {}).get("flags", [])[:3]:
            lines += ["", f"{name} roofline flag: {flag}"]
    return "\n".join(lines) + "\n"


def write_report(report: dict, args, logs: bool = False) -> None:
    out = Path(args.out)
    for file, text in (("gpu_check.json", json.dumps(report, indent=1, default=str) + "\n"),
                       ("gpu_check.md", markdown(report))):
        tmp = out / f".{file}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / file)
    if logs:
        _write_logs(args)


def _write_logs(args) -> None:
    """OUT/logs.tar.gz: section logs and bench JSONs first, then HLO and the XLA dump while the
    archive stays under MAX_TAR_BYTES (compressed size checked after each file)."""
    scratch = Path(args.scratch)
    files = sorted((scratch / "logs").glob("*")) + sorted(scratch.glob("*.json")) + sorted(scratch.glob("*.hlo.txt"))
    files += sorted(p for p in (scratch / "xla_dump_target").rglob("*") if p.is_file())
    buf = io.BytesIO()
    skipped = []
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for p in files:
            if buf.tell() + p.stat().st_size // 8 > MAX_TAR_BYTES:  # text compresses ~8x; leave the rest out
                skipped.append(p.name)
                continue
            tar.add(p, arcname=str(p.relative_to(scratch)))
        if skipped:
            note = ("left out (over the size limit): " + ", ".join(skipped) + "\n").encode()
            info = tarfile.TarInfo("LEFT_OUT.txt")
            info.size = len(note)
            tar.addfile(info, io.BytesIO(note))
    tmp = Path(args.out) / ".logs.tar.gz.tmp"
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, Path(args.out) / "logs.tar.gz")


def _not_runnable(section: Section, report: dict) -> str | None:
    pre = report["sections"].get("preflight")
    if section.name == "preflight":
        return None
    if pre is None or pre["status"] != "ok":
        return "not run: preflight did not finish"
    imports = pre["figures"].get("imports") or {}
    bad = [f"{m} ({imports[m]})" for m in section.needs if m in imports and not imports[m].startswith("ok")]
    return f"not run: needs {'; '.join(bad)}" if bad else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="result folder (default $OUT)")
    p.add_argument("--dry", action="store_true", help="CPU only, tiny shapes: rehearse every section")
    p.add_argument("--budget-s", type=float, default=None, help=f"overall deadline (default {BUDGET_S:.0f} s, "
                                                                 f"--dry {DRY_BUDGET_S:.0f} s)")
    p.add_argument("--sections", nargs="+", default=[s.name for s in SECTIONS], choices=[s.name for s in SECTIONS])
    p.add_argument("--limit", action="append", default=[], metavar="SECTION=SECONDS", help="override a section's limit")
    p.add_argument("--scratch", default=None, help="scratch folder (default: a new one under /tmp)")
    p.add_argument("--install", default=None, help="JSON of the wheel install step (written by gpu_check.sh)")
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)  # internal: run one section here
    args = p.parse_args(argv)
    for item in args.limit:
        name, _, secs = item.partition("=")
        if name not in BY_NAME or not secs.replace(".", "", 1).isdigit():
            p.error(f"--limit {item!r}: give SECTION=SECONDS with a section of {', '.join(BY_NAME)}")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.section:
        return _child(args)
    args.scratch = args.scratch or tempfile.mkdtemp(prefix="gpu_check.")
    (Path(args.scratch) / "logs").mkdir(parents=True, exist_ok=True)
    import datetime as dt

    budget = args.budget_s or (DRY_BUDGET_S if args.dry else BUDGET_S)
    limits = {s.name: (s.dry_limit_s if args.dry else s.limit_s) for s in SECTIONS if s.name in args.sections}
    limits.update({k: float(v) for k, _, v in (x.partition("=") for x in args.limit) if k in limits})
    if sum(limits.values()) > budget:  # a slow install left less: the last sections get what remains
        print(f"[gpu_check] the section limits add up to {sum(limits.values()):.0f} s, over the {budget:.0f} s "
              f"budget: the last sections are cut", flush=True)
    t0 = time.monotonic()
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "dry": args.dry,
              "command": "python -m bench.gpu_check " + shlex.join(sys.argv[1:] if argv is None else argv),
              "budget_s": budget, "limits_s": limits, "device": None, "wall_s": 0.0, "finished": False,
              "install": _read(Path(args.install)) if args.install else None, "scratch": args.scratch,
              "sections": {}}
    if args.install and Path(args.install).with_suffix(".log").is_file():
        (Path(args.scratch) / "logs" / "install.log").write_bytes(Path(args.install).with_suffix(".log").read_bytes())
    signal.signal(signal.SIGTERM, _on_term)

    def progress():
        report["wall_s"] = time.monotonic() - t0
        write_report(report, args)

    try:
        for s in SECTIONS:
            if s.name not in limits:
                continue
            why = _not_runnable(s, report)
            left = budget - (time.monotonic() - t0) - 2  # 2 s for the last writes
            if not why and left < 10:
                why = "skipped: the overall budget is spent"
            if why:
                report["sections"][s.name] = {"status": why, "limit_s": limits[s.name], "wall_s": 0.0, "figures": {}}
                continue
            limit = min(limits[s.name], left)
            print(f"[gpu_check] {s.name} (limit {limit:.0f} s)", flush=True)
            report["sections"][s.name] = {"status": "running", "limit_s": limit, "figures": {}}
            try:
                report["sections"][s.name] = r = run_section(s.name, args, limit, progress)
            except Interrupted as e:
                if e.args and isinstance(e.args[0], dict):
                    report["sections"][s.name] = e.args[0]
                raise
            if s.name == "preflight":
                report["device"] = r["figures"].get("device_kind")
            report["wall_s"] = time.monotonic() - t0
            write_report(report, args, logs=True)
            print(f"[gpu_check] {s.name}: {r['status']} in {r['wall_s']:.0f} s", flush=True)
            print(markdown(report), flush=True)
            if s.name == "preflight" and (r["figures"].get("stop") or r["status"] != "ok"):
                print(f"[gpu_check] stopping: {r['figures'].get('stop') or r.get('error')}", flush=True)
                break
        report["finished"] = True
    except Interrupted:
        print("[gpu_check] interrupted: the results so far are written", flush=True)
    report["wall_s"] = time.monotonic() - t0
    write_report(report, args, logs=True)
    print(markdown(report), flush=True)
    return report


if __name__ == "__main__":
    main()
