"""Helpers for the training-mode tests (LoRA, new tokens, partial fine-tuning, optimizer offload):
a jaxsft train step on a tiny HF model with a mode switched on, and its PyTorch reference step."""

from __future__ import annotations

import types

import jax
import numpy as np
import torch
import transformers
from cfg import settings

from jaxsft import hf, optim, parallel, step, trainable
from jaxsft.model.decoder import ModelSettings

LR, TOTAL_STEPS = 1e-3, 20
BETAS, EPS, WD = (0.9, 0.95), 1e-8, 0.01


def model_settings(lora=None, **kw):
    return ModelSettings(**{"param_dtype": "float32", "compute_dtype": "float32", "scan_layers": True,
                            "remat_policy": "full", "attn_implementation": "xla", "lora": lora, **kw})


def optim_cfg():
    return settings({"optim.lr": LR, "optim.lr_warmup_steps_ratio": 0.0}).optim


class Run:
    """A jaxsft train step on `model_dir` with a mode switched on: `run(batch)` takes one step."""

    def __init__(self, model_dir, mesh_shape=(4, 2), *, lora=None, trainable_items=("all",), added=None,
                 offload=False, ms=None, dropout_seed=None, chunk_size=16):
        self.mesh = parallel.make_mesh(*mesh_shape)
        self.settings = ms or model_settings(lora)
        config = hf.read_config(model_dir)
        if added is not None:
            config = __import__("dataclasses").replace(config, vocab_size=added.vocab_size)
        self.config = config
        spec = types.SimpleNamespace(lora=lora, trainable=tuple(trainable_items))
        with jax.set_mesh(self.mesh):
            model = hf.load_model(model_dir, self.mesh, self.settings, seed=0, config=config)
            self.partition = trainable.for_model(model, spec, added, say=lambda *a: None)
            self.tx, self.schedule = optim.make_optimizer(optim_cfg(), TOTAL_STEPS, "float32")
            self.graphdef, self.rest, self.state, self.shardings = step.init_train_state(
                model, self.tx, self.mesh, self.partition, optimizer_offload=offload, say=lambda *a: None)
        self.cfg = step.StepConfig("global_tokens", False, mesh_shape[0], chunk_size, dropout_seed=dropout_seed)
        self.fn = jax.jit(step.make_train_step(self.graphdef, self.rest, self.tx, self.schedule, self.cfg, self.partition,
                                               self.shardings["opt_state"]),
                          donate_argnums=0, out_shardings=(self.shardings, parallel.replicated(self.mesh)))

    def put(self, batch):
        return {k: jax.device_put(v, parallel.batch_sharding(self.mesh)) for k, v in batch.items()}

    def __call__(self, batch):
        with jax.set_mesh(self.mesh):
            self.state, m = self.fn(self.state, self.put(batch))
        return {k: float(v) for k, v in m.items()}

    def hf_params(self, lora=None) -> dict[str, np.ndarray]:
        """HF-named float32 numpy tensors of the current parameters (LoRA merged when given)."""
        return {n: np.asarray(jax.device_get(a)) for n, a in hf.export_tensors(self.state["params"], self.config, lora=lora)}

    def param(self, *path) -> np.ndarray:
        node = self.state["params"]
        for k in path:
            node = node[k]
        return np.asarray(jax.device_get(node[...]))


def padded_batch(seed, K, R, T, vocab=128):
    """[K, R, T] padded rows: random lengths, loss mask on a random suffix of each sample."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(K, R, T)).astype(np.int32)
    seg = np.zeros((K, R, T), np.int32)
    mask = np.zeros((K, R, T), np.int32)
    pos = np.zeros((K, R, T), np.int32)
    for k in range(K):
        for r in range(R):
            n = int(rng.integers(T // 3, T + 1))
            start = int(rng.integers(1, n))
            seg[k, r, :n] = 1
            pos[k, r, :n] = np.arange(n)
            mask[k, r, start:n] = 1
            ids[k, r, n:] = 0
    return {"input_ids": ids, "positions": pos, "segment_ids": seg, "loss_mask": mask}


def torch_loss(logits, flat):
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           flat["input_ids"][:, 1:].reshape(-1), reduction="none")
    w = (flat["loss_mask"][:, 1:] * (flat["segment_ids"][:, 1:] > 0)).reshape(-1).float()
    return (ce * w).sum() / w.sum()


def torch_steps(forward, params: dict, batches, lrs):
    """verl's step in torch: loss, backward, clip_grad_norm_(1.0) and AdamW over `params` (name →
    the tensors that train); `forward(flat batch) -> logits`, or (logits, a loss term to add).
    Returns per step (loss, pre-clip norm, {name: gradient}, {name: value after the step})."""
    opt = torch.optim.AdamW(list(params.values()), lr=lrs[0], betas=BETAS, eps=EPS, weight_decay=WD)
    out = []
    for batch, lr in zip(batches, lrs):
        flat = {k: torch.from_numpy(v.reshape(-1, v.shape[-1])).long() for k, v in batch.items()}
        result = forward(flat)
        logits, extra = result if isinstance(result, tuple) else (result, 0.0)  # extra: a loss term to add (MoE router)
        loss = torch_loss(logits.float(), flat) + extra
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        grads = {n: p.grad.detach().numpy().copy() for n, p in params.items()}
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        out.append((loss.item(), norm.item(), grads, {n: p.detach().numpy().copy() for n, p in params.items()}))
    return out


def hf_forward(model):
    return lambda flat: model(input_ids=flat["input_ids"], attention_mask=flat["segment_ids"],
                              position_ids=flat["positions"]).logits


def load_torch(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def adam_close(ours, theirs, grads, lr=LR):
    """Parameters after the steps taken so far, against torch's, with torch's gradients `grads`
    (one array per step). Every entry within 1e-2·lr; "conditioned" entries within 1e-4·lr beyond
    two float32 ulps. Adam's update lr·m̂/(√v̂+ε) amplifies a float32 gradient error δ (≈ 1e-6 of
    the tensor's largest gradient, ≤ 1e-8 here): by ε·δ/(|g|+ε)² at step 1 (tests/test_train_step.py's
    argument), and by about δ/|g| once the moments hold earlier gradients. So an entry is
    conditioned when, at every step, its gradient was exactly 0 (the update is then exact) or
    |g| ≥ 1e-6 at step 1 and |g| ≥ 1e-4 after it. Returns (worst, worst conditioned) in units of lr."""
    grads = [np.asarray(g) for g in (grads if isinstance(grads, (list, tuple)) else [grads])]
    conditioned_entries = np.all([(g == 0) | (np.abs(g) >= (1e-6 if t == 0 else 1e-4)) for t, g in enumerate(grads)],
                                 axis=0)
    diff = np.abs(ours - theirs)
    worst = float(diff.max())
    beyond = np.maximum(diff - 2 * np.spacing(np.abs(theirs)), 0) * conditioned_entries
    conditioned = float(beyond.max())
    at = np.unravel_index(np.argmax(beyond), diff.shape)
    # not derivable a priori (Adam's amplification of δ, above): from δ ≤ 1e-8 of the largest gradient; ulps beyond 2
    assert worst <= 1e-2 * lr and conditioned <= 1e-4 * lr, (worst / lr, conditioned / lr, at, ours[at], theirs[at],
                                                              [float(g[at]) for g in grads])
    return worst / lr, conditioned / lr


def jax_logits(run, batch) -> np.ndarray:
    """The logits of `run`'s model (its current parameters) on micro-batch 0 of `batch`."""
    from flax import nnx

    model = nnx.merge(run.graphdef, run.state["params"], run.rest)
    with jax.set_mesh(run.mesh):
        return np.asarray(jax.jit(lambda b: model(b["input_ids"], b["positions"], b["segment_ids"]))(
            {k: v[0] for k, v in batch.items()}))


def logits_error(run, torch_model, batch) -> float:
    """Largest relative difference between `run`'s logits and `torch_model`'s on micro-batch 0 of
    `batch`, over the positions of real (non-padding) tokens."""
    flat = {k: torch.from_numpy(v[0]).long() for k, v in batch.items()}
    with torch.no_grad():
        theirs = hf_forward(torch_model)(flat).numpy()
    valid = batch["segment_ids"][0] > 0
    return rel(jax_logits(run, batch)[valid], theirs[valid])
