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
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxsft import distributed, trackers


# ---- FLOPs ----------------------------------------------------------------------------------------


def _geometry(config):
    """(layers, hidden, intermediate, q heads, kv heads, head_dim, vocab) from HF field names."""
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim") or hidden // heads
    return (get("num_hidden_layers"), hidden, get("intermediate_size"), heads,
            get("num_key_value_heads") or heads, head_dim, get("vocab_size"))


def matmul_flops_per_token(config) -> float:
    """Training FLOPs per token of the weight matmuls (attention projections, MLP, LM head). A
    mixture-of-experts MLP counts what a token runs: its router and its k experts (active parameters)."""
    layers, h, inter, nq, nkv, d, vocab = _geometry(config)
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    experts = get("num_experts") or 0
    if not experts:
        dense = layers
    elif isinstance(config, Mapping):  # transformers' rule: dense unless (i + 1) % decoder_sparse_step == 0
        step, only = get("decoder_sparse_step") or 1, set(get("mlp_only_layers") or ())
        dense = sum(1 for i in range(layers) if i in only or (i + 1) % step)
    else:
        dense = len(config.dense_layers)
    shared = get("shared_expert_intermediate_size") or 0  # qwen2_moe: + the shared expert and its gate
    sparse_mlp = (3 * h * get("moe_intermediate_size") * get("num_experts_per_tok") + h * experts + 3 * h * shared
                  + h * bool(shared)) if experts else 0
    attention = h * nq * d + 2 * h * nkv * d + nq * d * h  # q, k+v, o
    mlps = dense * 3 * h * inter + (layers - dense) * sparse_mlp  # gate+up+down (per expert run)
    return 6.0 * (layers * attention + mlps + h * vocab)


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


def _scalar(v):
    """A python number (or string) from a python, numpy or jax scalar; reading a jax scalar syncs."""
    return v if isinstance(v, str) else np.asarray(v).item()


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def trim_metrics_file(path: Path, last_step: int) -> int:
    """Drop the rows of steps after `last_step` (logged after the checkpoint a run resumes from,
    so the resumed run logs them again); returns how many were dropped. Atomic (tmp + rename)."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill mid-write
        if step <= last_step:
            keep.append(line if line.endswith("\n") else line + "\n")
    dropped = len(lines) - len(keep)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


class MetricsLogger:
    """Writes each `log(step, data)` to the chosen backends; a no-op off the main process.

    - console: `step:N - key:value - ...` on stdout (through tqdm.write when the bar is shown).
    - tqdm: a progress bar over total_steps with ETA; shown also with `console` alone when stdout
      is an interactive terminal (verl always shows one).
    - tensorboard: tensorboardX events under $TENSORBOARD_DIR, else run_dir/tensorboard, on disk at
      each `sync()` (before every checkpoint); events of steps after `initial_step` (a resumed
      run's) are purged.
    - file: run_dir/metrics.jsonl, one `{"step": N, "data": {...}}` per line, flushed per line;
      a resumed run first drops the rows after `initial_step` and continues the file (non-finite
      values are written as NaN/Infinity).
    - wandb: project, name = experiment_name, config = config_dict (entity from WANDB_ENTITY);
      a resumed run continues the same wandb run (jaxsft.trackers).
    - mlflow: experiment = project, run name = experiment_name, params = config_dict, the run
      directory's config.yaml as an artifact; a resumed run continues the same mlflow run
      (jaxsft.trackers, which says where the runs are stored).

    `backends` are checked names (`jaxsft.settings.LOGGERS`).
    """

    def __init__(self, backends, run_dir, project_name: str, experiment_name: str, config_dict: dict,
                 total_steps: int, is_main_process: bool = True, initial_step: int = 0):
        names = tuple(backends)
        self._bar = self._tb = self._file = None
        self._trackers = []
        self._active = is_main_process and bool(names)
        self._console = is_main_process and "console" in names
        self.dropped_rows = 0
        self._main, self._said = is_main_process, set()
        if not is_main_process:
            return
        run_dir = Path(run_dir)
        if "tqdm" in names or (self._console and sys.stdout.isatty()):
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)
        if "tensorboard" in names:
            self._tb_dir = os.environ.get("TENSORBOARD_DIR") or str(run_dir / "tensorboard")
            self._tb = self._tensorboard(purge_step=initial_step + 1)
        if "file" in names:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.dropped_rows = trim_metrics_file(run_dir / "metrics.jsonl", initial_step)
            self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        for name, tracker in (("wandb", trackers.Wandb), ("mlflow", trackers.Mlflow)):
            if name in names:
                self._trackers.append(tracker(run_dir, project_name, experiment_name, config_dict, initial_step))

    @classmethod
    def for_run(cls, settings, run_dir, *, initial_step: int, last_step: int, say=print) -> "MetricsLogger":
        """The logger of a run (process 0 writes); says when a resumed run drops rows of its metrics file."""
        t = settings.trainer
        logger = cls(t.logger, run_dir, t.project_name, t.experiment_name, settings.config, total_steps=last_step,
                     is_main_process=distributed.is_primary(), initial_step=initial_step)
        if logger.dropped_rows:
            say(f"[jaxsft] metrics.jsonl: dropped {logger.dropped_rows} row(s) logged after step {initial_step}, "
                f"the step this run resumes from")
        return logger

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
        for tracker in self._trackers:
            tracker.log(step, row)
        if self._bar:
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            if "train/loss" in row:
                self._bar.set_postfix(loss=_fmt(row["train/loss"]), refresh=False)
        if self._console:
            line = " - ".join([f"step:{step}"] + [f"{k}:{_fmt(v)}" for k, v in row.items()])
            self.say(line)

    def _tensorboard(self, purge_step=None):
        from tensorboardX import SummaryWriter

        # A unique file suffix: tensorboardX names files by the second and the host, so a relaunch
        # within the same second would overwrite the earlier launch's events.
        return SummaryWriter(logdir=self._tb_dir, purge_step=purge_step, filename_suffix=f".{os.getpid()}.{time.time_ns()}")

    def sync(self) -> None:
        """Put every row logged so far on disk: called before a checkpoint, after whose step a killed
        run resumes (the rows up to it are never logged again). metrics.jsonl is flushed per row;
        tensorboardX writes from a queue in a thread that only close() drains, so the writer is
        closed and a new one (a new event file) goes on."""
        if self._tb:
            self._tb.close()
            self._tb = self._tensorboard()

    def say_once(self, line: str) -> None:
        if line not in self._said:
            self._said.add(line)
            self.say(line)

    def say(self, line: str) -> None:
        """A console line that does not break the progress bar (main process only)."""
        if not self._main:
            return
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
        for tracker in self._trackers:
            tracker.close()
        self._active = self._console = False
        self._bar = self._tb = self._file = None
        self._trackers = []
