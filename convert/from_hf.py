"""Hugging Face directory → jaxsft parameter checkpoint (for users who pre-convert once).

    python -m convert.from_hf HF_DIR --out RUN_DIR [--dtype float32|bfloat16]

Writes RUN_DIR/global_step_0 holding the parameters only (save_contents=model), in the layout
the trainer restores, sharded over this machine's devices. Train from it with
`trainer.resume_mode=resume_path trainer.resume_from_path=RUN_DIR/global_step_0` (optimizer and
data order start fresh) and `model.partial_pretrain=HF_DIR` (config and tokenizer).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
from flax import nnx

from jaxsft import checkpoint, config, hf, parallel
from jaxsft.checkpoint import CheckpointError
from jaxsft.settings import ModelSettings


def convert(hf_dir: str, out: str, *, dtype: str = "float32") -> Path:
    hf_dir = Path(hf_dir).resolve()
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    if checkpoint.step_dirs(out):
        raise CheckpointError(f"{out} already holds {checkpoint.STEP_PREFIX}_N directories; choose an empty --out")
    s = config.settings_from({"model.partial_pretrain": str(hf_dir), "data.train_files": "(none: conversion only)",
                              "model.param_dtype": dtype, "trainer.default_local_dir": str(out),
                              "trainer.checkpoint.save_contents": ["model"], "trainer.checkpoint.async_save": False,
                              "trainer.logger": ["console"], "trainer.device": "auto"})
    settings = ModelSettings(param_dtype=dtype, compute_dtype=s.model.compute_dtype, scan_layers=s.model.scan_layers,
                             remat_policy=s.model.remat_policy, attn_implementation=s.model.attn_implementation)
    mesh = parallel.make_mesh(jax.device_count(), 1)
    with jax.set_mesh(mesh):
        params = nnx.state(hf.load_model(hf_dir, mesh, settings), nnx.Param)
    ckpt = checkpoint.Checkpointer(s.checkpoint, base_model_dir=hf_dir, max_length=s.data.max_length)
    step_dir = ckpt.save(0, {"params": params}, meta={"config": s.config, "base_model": str(hf_dir), "epoch": 0})
    ckpt.close()
    return step_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="from_hf", description="Hugging Face directory → jaxsft parameter checkpoint")
    ap.add_argument("hf_dir", help="Hugging Face model directory (config.json + safetensors)")
    ap.add_argument("--out", required=True, help="run directory to create global_step_0 in")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="parameter dtype")
    args = ap.parse_args(argv)
    try:
        step_dir = convert(args.hf_dir, args.out, dtype=args.dtype)
    except ValueError as e:  # CheckpointError or a config hf refuses: one sentence
        raise SystemExit(f"from_hf: error: {e}") from None
    print(f"[from_hf] wrote {step_dir}")


if __name__ == "__main__":
    main()
