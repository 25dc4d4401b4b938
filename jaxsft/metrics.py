"""Training FLOPs / MFU accounting and the metrics logger (verl's `trainer.logger` backends).

FLOPs follow MaxText's convention so MFU is comparable: every weight matmul counted as 2·in·out per
token, ×3 for forward + backward, the LM head included, the embedding gather excluded, and causal
attention counted as half of the dense S² score and value matmuls. For packed rows the honest
attention count is Σ over segments of sᵢ² (attention never crosses segments), not S².
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxsft.config import ConfigError

# ---- FLOPs ----------------------------------------------------------------------------------------


def _geometry(config):
    """(layers, hidden, intermediate, q heads, kv heads, head_dim, vocab) from HF field names."""
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim") or hidden // heads
    return (get("num_hidden_layers"), hidden, get("intermediate_size"), heads,
            get("num_key_value_heads") or heads, head_dim, get("vocab_size"))


def matmul_flops_per_token(config) -> float:
    """Training FLOPs per token of the weight matmuls (attention projections, MLP, LM head)."""
    layers, h, inter, nq, nkv, d, vocab = _geometry(config)
    per_layer = h * nq * d + 2 * h * nkv * d + nq * d * h + 3 * h * inter  # q, k+v, o, gate+up+down
    return 6.0 * (layers * per_layer + h * vocab)


def attention_flops_for_segments(config, segment_lengths) -> float:
    """Training FLOPs of causal attention over independent segments: Σ 6·L·Hq·D·sᵢ².

    QKᵀ and PV are 2·s²·Hq·D each when dense; causal halves them; ×3 for forward + backward.
    """
    layers, _, _, nq, _, d, _ = _geometry(config)
    s = np.asarray(segment_lengths, dtype=np.float64)
    return 6.0 * layers * nq * d * float(np.sum(s * s))


def training_flops_per_token(config, seq_len: int) -> float:
    """MaxText's per-token training FLOPs for rows of one sequence of length seq_len."""
    return matmul_flops_per_token(config) + attention_flops_for_segments(config, [seq_len]) / seq_len


class FlopCounter:
    """Training FLOPs of one step from the lengths of the samples (segments) it processed."""

    def __init__(self, config):
        self.config = config
        self.per_token = matmul_flops_per_token(config)

    def step_flops(self, segment_lengths) -> float:
        tokens = float(np.sum(np.asarray(segment_lengths, dtype=np.float64)))
        return tokens * self.per_token + attention_flops_for_segments(self.config, segment_lengths)


# Dense bf16 peak FLOP/s by device kind; the first matching substring wins, so the more specific
# names come first ("h200" before "h20", "gb200" before "b200", "v5 lite" before "v5").
_PEAK_BF16 = (
    ("h100 pcie", 756e12), ("h100 nvl", 835e12), ("gh200", 989e12), ("h200", 989e12), ("h100", 989e12),
    ("h800", 989e12), ("h20", 148e12), ("a100", 312e12), ("a800", 312e12), ("l40s", 362e12),
    ("gb200", 2500e12), ("b200", 2250e12),
    ("tpu v4", 275e12), ("tpu v5 lite", 197e12), ("tpu v5", 459e12), ("tpu v6 lite", 918e12),
)


def peak_flops_per_device(device) -> float | None:
    """Dense bf16 peak FLOP/s of a jax device, or None when unknown (CPU, unlisted accelerators):
    MFU is then not reported unless trainer.peak_flops_per_device is set."""
    if device.platform == "cpu":
        return None
    kind = device.device_kind.lower()
    return next((peak for name, peak in _PEAK_BF16 if name in kind), None)


# ---- logging --------------------------------------------------------------------------------------

BACKENDS = ("console", "tqdm", "tensorboard", "file", "wandb")


def parse_backends(spec) -> tuple[str, ...]:
    """verl's list syntax: a list/tuple, one name, or a string such as "['console','file']"."""
    if isinstance(spec, str):
        spec = spec.strip().strip("[]()").split(",")
    names = tuple(n for n in (str(s).strip().strip("'\"") for s in spec) if n)
    for name in names:
        if name not in BACKENDS:
            raise ConfigError(f"trainer.logger: unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return names


def _scalar(v):
    """A python number (or string) from a python, numpy or jax scalar; reading a jax scalar syncs."""
    return v if isinstance(v, str) else np.asarray(v).item()


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


class MetricsLogger:
    """Writes each `log(step, data)` to the chosen backends; a no-op off the main process.

    - console: `step:N - key:value - ...` on stdout (through tqdm.write when the bar is shown).
    - tqdm: a progress bar over total_steps with ETA.
    - tensorboard: tensorboardX events under $TENSORBOARD_DIR, else run_dir/tensorboard.
    - file: run_dir/metrics.jsonl, one `{"step": N, "data": {...}}` per line, flushed per line,
      appended to so a resumed run continues it (non-finite values are written as NaN/Infinity).
    - wandb: project, name = experiment_name, config = config_dict (entity from WANDB_ENTITY).
    """

    def __init__(self, backends, run_dir, project_name: str, experiment_name: str, config_dict: dict,
                 total_steps: int, is_main_process: bool = True, initial_step: int = 0):
        names = parse_backends(backends)
        self._bar = self._tb = self._file = self._wandb = None
        self._active = is_main_process and bool(names)
        self._console = is_main_process and "console" in names
        if not is_main_process:
            return
        run_dir = Path(run_dir)
        if "tqdm" in names:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)
        if "tensorboard" in names:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=os.environ.get("TENSORBOARD_DIR") or str(run_dir / "tensorboard"))
        if "file" in names:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if "wandb" in names:
            try:
                import wandb
            except ImportError:
                raise ConfigError("trainer.logger includes wandb but the wandb package is not installed: "
                                  "pip install wandb or remove wandb from trainer.logger") from None
            self._wandb = wandb.init(project=project_name, name=experiment_name, config=config_dict)

    def log(self, step: int, data: dict) -> None:
        if not self._active:
            return
        row = {k: _scalar(v) for k, v in data.items()}
        if self._file:
            self._file.write(json.dumps({"step": step, "data": row}) + "\n")
            self._file.flush()
        if self._tb:
            for k, v in row.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if self._wandb:
            self._wandb.log(row, step=step)
        if self._bar:
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            if "train/loss" in row:
                self._bar.set_postfix(loss=_fmt(row["train/loss"]), refresh=False)
        if self._console:
            line = " - ".join([f"step:{step}"] + [f"{k}:{_fmt(v)}" for k, v in row.items()])
            if self._bar:
                self._bar.write(line, file=sys.stdout)
            else:
                print(line, flush=True)

    def close(self) -> None:
        if self._bar:
            self._bar.close()
        if self._tb:
            self._tb.close()
        if self._file:
            self._file.close()
        if self._wandb:
            self._wandb.finish()
        self._active = self._console = False
        self._bar = self._tb = self._file = self._wandb = None
