"""Training throughput of jaxsft against verl's per-GPU PyTorch path, on synthetic batches.

    python -m bench.throughput --shape tiny|qwen2.5-0.5b|qwen2.5-1.5b|qwen2.5-7b|qwen3-8b|llama-3.1-8b|... [options]

One run:
1. draws the samples of every step (lengths `fixed` = seq_len, or `seed` = a lognormal fitted to
   the seed data's quantiles), loss mask on the last ~60 % of each sample;
2. runs the PyTorch baseline in a child process — transformers' model of the family (random init,
   SDPA, gradient checkpointing) + torch AdamW + clip_grad_norm_, every sample padded to seq_len,
   micro-batches accumulated with loss.backward(), as verl's FSDP SFT trainer does on one GPU.
   A child because JAX preallocates most of the GPU's memory and the two stacks bring their own
   CUDA libraries; the child exits before JAX touches the device;
3. builds the same shape in jaxsft with random weights created directly in their shardings (no
   host copy), and runs jaxsft's real train step (jit, donated state) on the same samples, padded
   or packed (first-fit per dp rank, a fixed [K, rows, T] for every step, as TrainLoader);
4. prints and saves tokens/s, loss-tokens/s, MFU, peak memory, compile time; the last line is
   `tokens/s jaxsft/torch = X.XX` (per-device figures).

Timing excludes data loading: every step's batch is on the device before the clock starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Real Qwen2.5 geometries (HF config.json fields); `tiny` is CPU-sized.
_QWEN25 = dict(rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768, hidden_act="silu",
               use_sliding_window=False, model_type="qwen2")
SHAPES = {
    "tiny": dict(_QWEN25, vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(_QWEN25, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(_QWEN25, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(_QWEN25, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    # the other families, as their published config.json files give them
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960, attention_bias=False,
                     use_sliding_window=False, hidden_act="silu", tie_word_embeddings=False),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         rms_norm_eps=1e-5, max_position_embeddings=131072, hidden_act="silu",
                         attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
                         rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "mistral-7b": dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768, sliding_window=None,
                       hidden_act="silu", tie_word_embeddings=False),
    # 128 experts of width 768, 8 per token: 30.5B parameters, 3.3B active
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960, attention_bias=False,
                          use_sliding_window=False, hidden_act="silu", tie_word_embeddings=False),
    # Qwen1.5-MoE-A2.7B: 60 experts of width 1408, 4 per token, and a shared expert of width 5632: 14.3B
    # parameters, 2.7B active
    "qwen1.5-moe-a2.7b": dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                              moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60,
                              num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                              router_aux_loss_coef=0.001, num_hidden_layers=24, num_attention_heads=16,
                              num_key_value_heads=16, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=8192,
                              qkv_bias=True, use_sliding_window=False, hidden_act="silu", tie_word_embeddings=False),
    "gemma-7b": dict(model_type="gemma", vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                     num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16, head_dim=256,
                     rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=8192,
                     hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True),
}


def hf_config(shape: str):
    """transformers' config object of SHAPES[shape], of its family."""
    import transformers

    geometry = dict(SHAPES[shape])
    return transformers.AutoConfig.for_model(geometry.pop("model_type"), **geometry)

# Seed-data sample lengths (tokens) at max_length 4096: p50, p90, p99.
SEED_QUANTILES = {0.5: 800.0, 0.9: 2000.0, 0.99: 3500.0}
SEED_MAX_LENGTH = 4096
_Z = {0.5: 0.0, 0.9: 1.2815515655446004, 0.99: 2.3263478740408408}  # standard normal quantiles
MIN_LENGTH = 8
LOSS_FRACTION = 0.6  # the loss mask covers the last 60 % of a sample (the "response")
RESULTS_MARKER = "<!-- bench:results -->"
# A caller in this process (bench.gpu_check) may set this to `fn(key, value)`: the jaxsft run reports
# its compile time, memory plan and each step's time as it has them, so a run killed midway keeps them.
PROGRESS = None


def _progress(key: str, value) -> None:
    if PROGRESS is not None:
        PROGRESS(key, value)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--seq-len", type=int, default=4096, help="row length T (data.max_length)")
    p.add_argument("--global-batch", type=int, default=8, help="samples per step (all devices together)")
    p.add_argument("--micro-batch", type=int, default=1, help="rows per device per micro-batch")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--lengths", choices=("fixed", "seed"), default="fixed")
    p.add_argument("--packing", choices=("none", "first_fit", "best_fit"), default="none")
    p.add_argument("--remat", default="minimal", help="jaxsft model.remat_policy")
    p.add_argument("--no-scan", action="store_true", help="unrolled layers instead of lax.scan")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--compute-dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--attn", default="auto", help="jaxsft model.attn_implementation")
    p.add_argument("--dp", type=int, default=None, help="devices to use (default: all)")
    p.add_argument("--chunk-size", type=int, default=512, help="jaxsft trainer.loss_chunk_size")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense TFLOP/s per device for MFU (default: from the device kind; none on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--hlo-out", default=None, help="write the compiled jaxsft step's optimized HLO text here")
    p.add_argument("--append-md", default=None, help="append a row to this file's results table")
    p.add_argument("--compile-only", action="store_true",
                   help="jaxsft only: compile the train step for abstract (unallocated) state and report the "
                        "compile time and XLA's memory plan for this machine's first device; no torch, no steps. "
                        "On a CPU that is an XLA:CPU plan, not a GPU memory figure: for a GPU plan without a GPU "
                        "use `python -m jaxsft.train ... --dry_run=h100:N`.")
    p.add_argument("--torch-inprocess", action="store_true",
                   help="run the baseline in this process, not a child (CPU only: on a GPU JAX would find "
                        "its memory taken)")
    p.add_argument("--torch-child", default=None, help=argparse.SUPPRESS)  # internal: run torch, write JSON
    args = p.parse_args(argv)
    if args.compute_dtype == "auto":
        args.compute_dtype = "bfloat16" if _has_accelerator() else "float32"
    if min(args.seq_len, args.micro_batch, args.steps) < 1 or args.warmup < 0:
        p.error("--seq-len, --micro-batch and --steps must be positive and --warmup non-negative")
    if args.compile_only and args.append_md:
        p.error("--compile-only measures no throughput, so there is no results row to --append-md")
    return args


def _has_accelerator() -> bool:
    """Whether JAX will run on a GPU, decided without initialising any backend (torch must get the
    GPU first): JAX_PLATFORMS, else whether jaxlib's CUDA plugin is installed *and* an NVIDIA
    driver is loaded (the test extra installs the plugin on CPU machines too, for deviceless plans)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return any(p in platforms for p in ("cuda", "gpu", "rocm"))
    import importlib.util

    plugin = any(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    return plugin and (Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists())


# ---- synthetic data -------------------------------------------------------------------------------


def seed_lognormal(scale: float) -> tuple[float, float]:
    """(mu, sigma) of log-length: least squares through the seed quantiles (times `scale`)."""
    z = np.array([_Z[q] for q in SEED_QUANTILES])
    y = np.log([v * scale for v in SEED_QUANTILES.values()])
    sigma, mu = np.polyfit(z, y, 1)
    return float(mu), float(sigma)


def sample_lengths(kind: str, seq_len: int, num_steps: int, global_batch: int, seed: int) -> np.ndarray:
    """int [num_steps, global_batch]. `seed`: the seed distribution scaled by seq_len / 4096, so at
    --seq-len 512 the quantiles are 1/8 of the seed data's; clipped to [8, seq_len] as truncation
    would."""
    if kind == "fixed":
        return np.full((num_steps, global_batch), seq_len, np.int64)
    mu, sigma = seed_lognormal(seq_len / SEED_MAX_LENGTH)
    rng = np.random.default_rng([seed, 1])
    n = np.exp(mu + sigma * rng.standard_normal((num_steps, global_batch)))
    return np.clip(np.rint(n), min(MIN_LENGTH, seq_len), seq_len).astype(np.int64)


def sample_tokens(lengths: np.ndarray, vocab: int, seed: int, step: int) -> list[np.ndarray]:
    """Token ids of one step's samples (ids >= 1, so id 0 can pad)."""
    rng = np.random.default_rng([seed, 2, step])
    return [rng.integers(1, vocab, int(n)).astype(np.int32) for n in lengths]


def loss_start(n: int) -> int:
    """First masked position of a sample of n tokens (the last ~60 % are loss tokens)."""
    return n - max(1, round(LOSS_FRACTION * n))


def loss_tokens(n: int) -> int:
    """Predictions that count: position t counts iff t+1 is masked (position 0 has none before)."""
    return n - max(loss_start(n), 1)


def _fill(out: dict, at: tuple, samples: list[np.ndarray]) -> None:
    col = 0
    for seg, ids in enumerate(samples, start=1):
        n = len(ids)
        out["input_ids"][at][col:col + n] = ids
        out["positions"][at][col:col + n] = np.arange(n)
        out["segment_ids"][at][col:col + n] = seg
        out["loss_mask"][at][col + loss_start(n):col + n] = 1
        col += n


def plan_rows(lengths: np.ndarray, seq_len: int, dp: int, packing: str) -> list[list[list[list[int]]]]:
    """rows[step][rank] = list of rows, each a list of sample indices of that step. Rank r holds the
    contiguous block r of the step's samples (verl / TrainLoader order)."""
    from jaxsft.data.packing import pack

    per_rank = lengths.shape[1] // dp
    plan = []
    for step_lengths in lengths:
        ranks = []
        for r in range(dp):
            share = list(range(r * per_rank, (r + 1) * per_rank))
            if packing == "none":
                ranks.append([[i] for i in share])
            else:
                ranks.append([[share[p] for p in row] for row in pack(step_lengths[share], seq_len, packing)])
        plan.append(ranks)
    return plan


def jaxsft_batches(lengths, seq_len, dp, micro_batch, packing, vocab, seed):
    """One [K, dp·b, T] batch dict per step; K is fixed across steps (the most any step needs)."""
    plan = plan_rows(lengths, seq_len, dp, packing)
    most = max(len(rows) for ranks in plan for rows in ranks)
    k_total = -(-most // micro_batch)
    batches = []
    for step, ranks in enumerate(plan):
        tokens = sample_tokens(lengths[step], vocab, seed, step)
        shape = (k_total, dp * micro_batch, seq_len)
        out = {name: np.zeros(shape, np.int32) for name in ("input_ids", "positions", "segment_ids", "loss_mask")}
        for r, rows in enumerate(ranks):
            for q, row in enumerate(rows):
                k, j = divmod(q, micro_batch)
                _fill(out, (k, r * micro_batch + j), [tokens[i] for i in row])
        batches.append(out)
    return batches


def step_counts(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(real tokens, loss tokens) per step."""
    loss = np.array([[loss_tokens(int(n)) for n in row] for row in lengths])
    return lengths.sum(axis=1), loss.sum(axis=1)


# ---- figures --------------------------------------------------------------------------------------


def machine_name(platform_kind: str, device_kind: str | None) -> str:
    if platform_kind != "cpu" and device_kind:
        return device_kind
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model} ({os.cpu_count()} cores)"


def max_rss_bytes(who=resource.RUSAGE_SELF) -> int:
    return resource.getrusage(who).ru_maxrss * 1024  # Linux reports KiB


def throughput(step_times, real_tokens, loss_toks, n_devices: int) -> dict:
    """tokens/s over the timed steps (totals ÷ total time), overall and per device."""
    total = float(np.sum(step_times))
    tok, loss = float(np.sum(real_tokens)) / total, float(np.sum(loss_toks)) / total
    return {"step_s": total / len(step_times), "step_s_min": float(np.min(step_times)),
            "step_times_s": [float(t) for t in step_times],
            "tokens_per_s": tok, "loss_tokens_per_s": loss,
            "tokens_per_s_per_device": tok / n_devices, "loss_tokens_per_s_per_device": loss / n_devices}


def flop_figures(model_cfg: dict, seq_len: int, row_slots: int, lengths: np.ndarray, step_times, n_devices: int,
                 peak: float | None) -> dict:
    """MaxText convention: every row slot counts as a token of a length-T sequence (what MaxText's
    calculate_tflops_training_per_device does for batch × seq_len). Segment-aware: the real samples
    only, attention Σ sᵢ². Both are MFU (recomputation not counted)."""
    from jaxsft import metrics

    counter = metrics.FlopCounter(model_cfg)
    maxtext = metrics.training_flops_per_token(model_cfg, seq_len) * row_slots * len(step_times)
    segments = sum(counter.step_flops(step_lengths) for step_lengths in lengths)
    total = float(np.sum(step_times)) * n_devices
    out = {"flops_per_step_maxtext": maxtext / len(step_times), "flops_per_step_segments": segments / len(step_times),
           "tflops_per_device_maxtext": maxtext / total / 1e12, "tflops_per_device_segments": segments / total / 1e12,
           "peak_tflops_per_device": peak / 1e12 if peak else None, "mfu_maxtext": None, "mfu_segments": None}
    if peak:
        out["mfu_maxtext"] = maxtext / total / peak
        out["mfu_segments"] = segments / total / peak
    return out


# ---- PyTorch baseline (verl's per-GPU path) ------------------------------------------------------


def run_torch(args, model_cfg: dict, lengths: np.ndarray) -> dict:
    """transformers' model of the shape's family + AdamW, every sample padded to seq_len, on one device."""
    import torch
    import transformers

    torch.manual_seed(args.seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = args.compute_dtype == "bfloat16"
    hf_cfg = hf_config(args.shape)
    with torch.device(dev):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=getattr(torch, args.param_dtype),
                                                              attn_implementation="sdpa")
    model.config.use_cache = False
    # verl: gradient checkpointing, non-reentrant (transformers 5 renamed the method)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01, eps=1e-8)
    T, b = args.seq_len, args.micro_batch
    n_micro = lengths.shape[1] // b

    def micro_batches(step):
        tokens = sample_tokens(lengths[step], model_cfg["vocab_size"], args.seed, step)
        ids = np.zeros((lengths.shape[1], T), np.int64)
        mask = np.zeros_like(ids)
        loss_mask = np.zeros_like(ids)
        for i, t in enumerate(tokens):
            ids[i, :len(t)], mask[i, :len(t)], loss_mask[i, loss_start(len(t)):len(t)] = t, 1, 1
        pos = np.broadcast_to(np.arange(T), ids.shape)
        cast = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
        return [tuple(cast(a[k * b:(k + 1) * b]) for a in (ids, mask, pos, loss_mask)) for k in range(n_micro)]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def train_step(mbs):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for ids, mask, pos, loss_mask in mbs:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
            # verl: token CE on shifted logits, masked, ÷ this micro-batch's loss tokens ÷ micro-batches
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                                   reduction="none")
            w = loss_mask[:, 1:].flatten().float()
            loss = (ce * w).sum() / (w.sum() + 1e-8) / len(mbs)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sync()
        return total

    data = [micro_batches(s) for s in range(lengths.shape[0])]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for s, mbs in enumerate(data):
        t0 = time.perf_counter()
        losses.append(train_step(mbs))
        times.append(time.perf_counter() - t0)
    first, timed = times[0], times[1 + args.warmup:]
    real, loss_tok = step_counts(lengths[1 + args.warmup:])
    out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "devices": 1,
           "dtype_regime": (f"params {args.param_dtype}, " + ("bf16 autocast" if bf16 else "float32 (no autocast)")),
           "torch_version": torch.__version__, "transformers_version": transformers.__version__,
           "batch_shape": [n_micro, b, T], "first_step_s": first, "losses": losses,
           **throughput(timed, real, loss_tok, 1),
           **flop_figures(model_cfg, T, n_micro * b * T, lengths[1 + args.warmup:], timed, 1,
                          _torch_peak(args, dev))}
    if dev.type == "cuda":
        out.update(peak_memory_bytes=int(torch.cuda.max_memory_allocated()),
                   peak_memory_kind="torch.cuda.max_memory_allocated")
    else:
        out.update(peak_memory_bytes=max_rss_bytes(), peak_memory_kind="host max RSS (CPU)")
    return out


def _torch_peak(args, dev) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if dev.type != "cuda":
        return None
    import types

    import torch
    from jaxsft import metrics

    # peak_flops_per_device reads only these two attributes of a jax device
    return metrics.peak_flops_per_device(types.SimpleNamespace(platform="gpu", device_kind=torch.cuda.get_device_name()))


def torch_in_child(argv: list[str]) -> dict:
    """Run the baseline in a fresh interpreter and read its figures."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "torch.json"
        cmd = [sys.executable, "-m", "bench.throughput", *argv, "--torch-child", str(path)]
        subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parent.parent)
        return json.loads(path.read_text())


# ---- jaxsft -------------------------------------------------------------------------------------


def random_model(config, settings, mesh, seed: int):
    """CausalLM with random weights initialised on the devices, each parameter directly in
    its NamedSharding (no host copy: a 7B never exists whole anywhere)."""
    import jax
    from flax import nnx

    from jaxsft import parallel
    from jaxsft.model.decoder import CausalLM

    def build():
        return CausalLM(config, settings, rngs=nnx.Rngs(seed))

    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    shardings = parallel.param_shardings(abstract, mesh)
    state = jax.jit(lambda: nnx.state(build()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def run_jaxsft(args, model_cfg: dict, lengths: np.ndarray, dp: int) -> dict:
    import jax
    import ml_collections

    from jaxsft import config as jconfig, metrics, optim, parallel, step
    from jaxsft.model import attention
    from jaxsft.model.config import ModelConfig
    from jaxsft.settings import ModelSettings

    devices = jax.devices()[:dp]
    mesh = parallel.make_mesh(dp, 1, devices)
    settings = ModelSettings(param_dtype=args.param_dtype, compute_dtype=args.compute_dtype,
                             scan_layers=not args.no_scan, remat_policy=args.remat, attn_implementation=args.attn)
    config = ModelConfig.from_hf_dict(model_cfg)
    optim_cfg = ml_collections.ConfigDict(jconfig.default_config().optim.to_dict())
    tx, schedule = optim.make_optimizer(optim_cfg, total_steps=1000, param_dtype=args.param_dtype)
    step_cfg = step.StepConfig(loss_normalization="global_tokens", balance_dp_token=False, dp=dp,
                               chunk_size=args.chunk_size,  # as the trainer: in-backward sums under full remat
                               accumulate_in_backward=settings.scan_layers and settings.remat_policy == "full")
    host_batches = jaxsft_batches(lengths, args.seq_len, dp, args.micro_batch, args.packing,
                                  model_cfg["vocab_size"], args.seed)
    batch_shape = list(host_batches[0]["input_ids"].shape)

    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        graphdef, rest, state, shardings = step.init_train_state(random_model(config, settings, mesh, args.seed),
                                                                 tx, mesh)
        jax.block_until_ready(state)
        init_s = time.perf_counter() - t0
        fn = jax.jit(step.make_train_step(graphdef, rest, tx, schedule, step_cfg), donate_argnums=0,
                     out_shardings=(shardings, parallel.replicated(mesh)))
        sharding = parallel.batch_sharding(mesh)
        batches = [{k: jax.device_put(v, sharding) for k, v in b.items()} for b in host_batches]
        jax.block_until_ready(batches)
        t0 = time.perf_counter()
        compiled = fn.lower(state, batches[0]).compile()
        compile_s = time.perf_counter() - t0
        _progress("compile_s", compile_s)
        _progress("compiled_memory", _memory_analysis(compiled))
        if args.hlo_out:
            Path(args.hlo_out).write_text(compiled.as_text())
        times, losses, counted = [], [], []
        for b in batches:
            t0 = time.perf_counter()
            state, m = compiled(state, b)
            losses.append(float(m["loss"]))  # syncs: the step has finished
            times.append(time.perf_counter() - t0)
            counted.append(int(m["loss_tokens"]))
            _progress("step_times_s", times)
    # The step's own count of loss tokens must be the one this benchmark divides by.
    expected = step_counts(lengths)[1]
    if counted != [int(n) for n in expected]:
        raise AssertionError(f"loss tokens per step: train step counted {counted}, benchmark expected {list(expected)}")

    device = devices[0]
    peak = args.peak_tflops * 1e12 if args.peak_tflops else metrics.peak_flops_per_device(device)
    timed = times[1 + args.warmup:]
    real, loss_tok = step_counts(lengths[1 + args.warmup:])
    k, rows, T = batch_shape
    out = {"device": device.device_kind, "platform": device.platform, "devices": dp, "mesh": {"dp": dp, "sp": 1},
           "jax_version": jax.__version__, "settings": dataclasses.asdict(settings),
           "attention": attention.resolve(args.attn),
           "batch_shape": batch_shape, "init_s": init_s, "compile_s": compile_s, "first_step_s": times[0],
           "losses": losses, "real_token_fraction": float(np.sum(real)) / (len(timed) * k * rows * T),
           **throughput(timed, real, loss_tok, dp),
           **flop_figures(model_cfg, T, k * rows * T, lengths[1 + args.warmup:], timed, dp, peak),
           "compiled_memory": _memory_analysis(compiled)}
    stats = [d.memory_stats() for d in devices]
    if all(stats) and all("peak_bytes_in_use" in s for s in stats):
        out.update(peak_memory_bytes=max(int(s["peak_bytes_in_use"]) for s in stats),
                   peak_memory_kind="device peak_bytes_in_use (max over devices)")
    else:
        out.update(peak_memory_bytes=max_rss_bytes(), peak_memory_kind="host max RSS (CPU)")
    return out


def _memory_analysis(compiled) -> dict:
    """XLA's compiled memory plan (bytes, per device)."""
    ma = compiled.memory_analysis()
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    return {f: int(getattr(ma, f)) for f in fields if ma is not None and hasattr(ma, f)}


def t_by_t_arrays(hlo_text: str, seq_len: int) -> dict:
    """Arrays in an optimized HLO text with two or more dimensions equal to seq_len (a [T, T] score
    or mask buffer): how many distinct shapes, and the largest by bytes. (Equal, not >=: [T, I]
    MLP activations and [T, V] logit chunks have one dimension T and a larger one.)"""
    sizes = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}
    found = {}
    for dtype, dims in re.findall(r"\b(f32|bf16|f16|f64|s32|u32|s64|s8|u8|pred)\[([\d,]+)\]", hlo_text):
        shape = tuple(int(x) for x in dims.split(","))
        if shape.count(seq_len) >= 2:
            found[f"{dtype}{list(shape)}"] = sizes[dtype] * int(np.prod(shape))
    largest = max(found, key=found.get) if found else None
    return {"count": len(found), "largest": largest, "largest_bytes": found.get(largest, 0)}


def compile_only(args, model_cfg: dict, lengths: np.ndarray) -> dict:
    """Compile time and memory plan of the train step on one device, for state that is never
    allocated (jax.ShapeDtypeStruct leaves), so a 7B plan can be read on a small machine."""
    import jax
    import ml_collections
    from flax import nnx

    from jaxsft import config as jconfig, optim, step
    from jaxsft.model import attention
    from jaxsft.model.config import ModelConfig
    from jaxsft.model.decoder import CausalLM
    from jaxsft.settings import ModelSettings

    settings = ModelSettings(param_dtype=args.param_dtype, compute_dtype=args.compute_dtype,
                             scan_layers=not args.no_scan, remat_policy=args.remat, attn_implementation=args.attn)
    config = ModelConfig.from_hf_dict(model_cfg)
    tx, schedule = optim.make_optimizer(ml_collections.ConfigDict(jconfig.default_config().optim.to_dict()),
                                        total_steps=1000, param_dtype=args.param_dtype)
    model = nnx.eval_shape(lambda: CausalLM(config, settings, rngs=nnx.Rngs(args.seed)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
             "step": jax.ShapeDtypeStruct((), np.int32)}
    shape = jaxsft_batches(lengths[:1], args.seq_len, 1, args.micro_batch, args.packing, model_cfg["vocab_size"],
                           args.seed)[0]["input_ids"].shape
    batch = {k: jax.ShapeDtypeStruct(shape, np.int32) for k in ("input_ids", "positions", "segment_ids", "loss_mask")}
    step_cfg = step.StepConfig(loss_normalization="global_tokens", balance_dp_token=False, dp=1,
                               chunk_size=args.chunk_size,
                               accumulate_in_backward=settings.scan_layers and settings.remat_policy == "full")
    fn = jax.jit(step.make_train_step(graphdef, rest, tx, schedule, step_cfg), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    device = jax.devices()[0]
    return {"device": device.device_kind, "platform": device.platform, "devices": 1, "jax_version": jax.__version__,
            "settings": dataclasses.asdict(settings), "attention": attention.resolve(args.attn),
            "batch_shape": list(shape), "compile_s": compile_s, "compiled_memory": _memory_analysis(compiled),
            "t_by_t_arrays": t_by_t_arrays(compiled.as_text(), args.seq_len)}


# ---- report -------------------------------------------------------------------------------------


def _gib(n) -> str:
    return "—" if n is None else f"{n / 2**30:.2f} GiB"


def _num(x, fmt="{:.1f}") -> str:
    return "—" if x is None else fmt.format(x)


NOISY_SPREAD = 1.5  # slowest / fastest timed step above this: something else was using the machine


def step_spreads(r: dict) -> list[tuple[str, float]]:
    return [(name, max(r[name]["step_times_s"]) / r[name]["step_s_min"]) for name in ("jaxsft", "torch") if r.get(name)]


def markdown_row(r: dict) -> str:
    j, t = r["jaxsft"], r.get("torch")
    mfu = (f"{_num(j['mfu_maxtext'], '{:.1%}')} / {_num(j['mfu_segments'], '{:.1%}')}" if j["mfu_maxtext"] is not None
           else f"n/a ({j['tflops_per_device_maxtext']:.3g} / {j['tflops_per_device_segments']:.3g} TFLOP/s)")
    mem = f"{_gib(j['peak_memory_bytes'])} / {_gib(t['peak_memory_bytes']) if t else '—'}"
    if "RSS" in j["peak_memory_kind"]:
        mem += " (RSS)"
    noisy = [f"{name} steps vary {spread:.1f}×" for name, spread in step_spreads(r) if spread > NOISY_SPREAD]
    cells = [r["date"][:10], r["machine"], f"`{r['command']}`", r["shape"], str(r["seq_len"]),
             f"{r['global_batch']} ({r['lengths']['kind']}, {r['packing']})",
             _num(j["tokens_per_s_per_device"]), _num(t["tokens_per_s"]) if t else "—",
             _num(r["ratios"]["tokens_per_s"], "{:.2f}") + (f" (noisy: {', '.join(noisy)})" if noisy else ""),
             _num(r["ratios"]["loss_tokens_per_s"], "{:.2f}"),
             mfu, mem, _num(j["compile_s"]),
             f"{r['load_avg_1min']['start']:.1f} → {r['load_avg_1min']['end']:.1f} ({r['load_avg_1min']['cpus']} CPUs)"]
    return "| " + " | ".join(cells) + " |"


def append_markdown(path: str, row: str) -> None:
    """Insert `row` at the end of the table that follows RESULTS_MARKER."""
    lines = Path(path).read_text().splitlines()
    if RESULTS_MARKER not in lines:
        raise SystemExit(f"--append-md {path}: no line {RESULTS_MARKER!r} marking the results table")
    i = lines.index(RESULTS_MARKER) + 1
    while i < len(lines) and not lines[i].startswith("|"):
        i += 1
    while i < len(lines) and lines[i].startswith("|"):
        i += 1
    lines.insert(i, row)
    Path(path).write_text("\n".join(lines) + "\n")


def print_summary(r: dict) -> None:
    L, j, t = r["lengths"], r["jaxsft"], r.get("torch")
    print(f"[bench] lengths {L['kind']}: p50 {L['p50']:.0f}, p90 {L['p90']:.0f}, p99 {L['p99']:.0f}, "
          f"mean {L['mean']:.0f}, max {L['max']} (seq_len {r['seq_len']})")
    for name, f in (("jaxsft", j), ("torch", t)):
        if f is None:
            continue
        mfu = (f"MFU {f['mfu_maxtext']:.1%} (MaxText) / {f['mfu_segments']:.1%} (segments)"
               if f["mfu_maxtext"] is not None else "MFU n/a (no peak FLOP/s for this device; --peak-tflops)")
        extra = f"compile {f['compile_s']:.1f} s, " if "compile_s" in f else f"first step {f['first_step_s']:.2f} s, "
        print(f"[bench] {name}: batch {f['batch_shape']} on {f['devices']} device(s), {extra}step {f['step_s']:.3f} s, "
              f"{f['tokens_per_s_per_device']:.1f} tokens/s/device, {f['loss_tokens_per_s_per_device']:.1f} "
              f"loss-tokens/s/device, {f['tflops_per_device_maxtext']:.3g} / {f['tflops_per_device_segments']:.3g} "
              f"TFLOP/s/device (MaxText / segments), {mfu}, peak memory {_gib(f['peak_memory_bytes'])} "
              f"[{f['peak_memory_kind']}]")
    for name, spread in step_spreads(r):
        if spread > NOISY_SPREAD:
            print(f"[bench] warning: {name} step times vary {spread:.1f}-fold; "
                  f"is the machine shared? Repeat the run before trusting the ratio.")
    ratios = r["ratios"]
    if t is None:
        print("loss-tokens/s jaxsft/torch = n/a (--no-torch)")
        print("tokens/s jaxsft/torch = n/a (--no-torch)")
    else:
        print(f"loss-tokens/s jaxsft/torch = {ratios['loss_tokens_per_s']:.2f}")
        print(f"tokens/s jaxsft/torch = {ratios['tokens_per_s']:.2f}")


def main(argv=None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from jaxsft import plan

    plan.prepare_environment(None)  # no NVIDIA driver: the CPU, without the CUDA plugin's failed check
    load_start = os.getloadavg()[0]  # other jobs on the machine skew every figure; keep the evidence
    model_cfg = SHAPES[args.shape]
    if args.packing != "none" and args.lengths == "fixed":
        print("[bench] note: --lengths fixed fills every row, so packing changes nothing", flush=True)
    global_batch = args.global_batch
    num_steps = 1 + args.warmup + args.steps  # the compile step is not timed
    lengths = sample_lengths(args.lengths, args.seq_len, num_steps, global_batch, args.seed)

    if args.torch_child:  # internal: the baseline alone, figures to a file
        if global_batch % args.micro_batch:
            raise SystemExit(f"--global-batch {global_batch} is not divisible by --micro-batch {args.micro_batch}")
        Path(args.torch_child).write_text(json.dumps(run_torch(args, model_cfg, lengths)))
        return None

    if args.compile_only:
        figures = compile_only(args, model_cfg, lengths)
        result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "machine": machine_name(figures["platform"], figures["device"]),
                  "command": "python -m bench.throughput " + shlex.join(argv), "shape": args.shape,
                  "seq_len": args.seq_len, "compile_only": figures}
        mem, square = figures["compiled_memory"], figures["t_by_t_arrays"]
        print(f"[bench] compile-only {args.shape} T={args.seq_len} batch {figures['batch_shape']} "
              f"{figures['settings']} (attention {figures['attention']}): compile {figures['compile_s']:.1f} s, "
              f"temp {_gib(mem.get('temp_size_in_bytes'))}, arguments {_gib(mem.get('argument_size_in_bytes'))}, "
              f"outputs {_gib(mem.get('output_size_in_bytes'))}; arrays with two dims = T in the optimized HLO: "
              f"{square['count']}" + (f" (largest {square['largest']}, {_gib(square['largest_bytes'])})"
                                      if square["count"] else ""))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        return result

    # The baseline first: it must have the GPU to itself and has finished before JAX starts.
    if args.no_torch:
        torch_figures = None
    elif args.torch_inprocess:
        torch_figures = run_torch(args, model_cfg, lengths)
    else:
        child_argv = argv + ["--compute-dtype", args.compute_dtype]  # resolved here, so both sides agree
        torch_figures = torch_in_child(child_argv)
    if torch_figures and torch_figures["device"] == "cpu" and _has_accelerator():
        raise SystemExit("the torch baseline ran on the CPU but JAX will use the GPU: install a CUDA build of torch "
                         "(or pass --no-torch)")

    import jax

    dp = args.dp or jax.device_count()
    if global_batch % (dp * args.micro_batch):
        raise SystemExit(f"--global-batch {global_batch} must divide by dp ({dp}) × --micro-batch ({args.micro_batch})")
    jax_figures = run_jaxsft(args, model_cfg, lengths, dp)

    q = np.quantile(lengths, [0.5, 0.9, 0.99])
    command = "python -m bench.throughput " + shlex.join(argv)
    ratios = {"tokens_per_s": None, "loss_tokens_per_s": None}
    if torch_figures:
        ratios = {k: jax_figures[f"{k}_per_device"] / torch_figures[f"{k}_per_device"]
                  for k in ("tokens_per_s", "loss_tokens_per_s")}
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_name(jax_figures["platform"], jax_figures["device"]), "command": command,
              "shape": args.shape, "model": model_cfg, "seq_len": args.seq_len, "global_batch": global_batch,
              "micro_batch": args.micro_batch, "packing": args.packing, "steps": args.steps, "warmup": args.warmup,
              "dtypes": {"param": args.param_dtype, "compute": args.compute_dtype},
              "lengths": {"kind": args.lengths, "p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]),
                          "mean": float(lengths.mean()), "min": int(lengths.min()), "max": int(lengths.max()),
                          "scale": args.seq_len / SEED_MAX_LENGTH if args.lengths == "seed" else None},
              "load_avg_1min": {"start": load_start, "end": os.getloadavg()[0], "cpus": os.cpu_count()},
              "jaxsft": jax_figures, "torch": torch_figures, "ratios": ratios}
    print_summary(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.append_md:
        append_markdown(args.append_md, markdown_row(result))
    # last line stays the ratio: anything above is informational
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
