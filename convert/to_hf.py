"""jaxsft checkpoint → Hugging Face directory.

    bin/convert_to_hf CHECKPOINT --out DIR [--dtype bfloat16|float32] [--max-shard-size 5GB]
                      [--base-model DIR]

CHECKPOINT is a `global_step_N` directory or a run root (then the tracker names the latest
complete step). The parameters are read on the CPU whatever mesh saved them; config.json,
generation config and tokenizer files come from the base model recorded in the step's meta
(`--base-model` when it has moved). The export dtype defaults to the run's
trainer.checkpoint.hf_dtype, else its model.param_dtype.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax

from jaxsft import checkpoint, hf
from jaxsft.checkpoint import CheckpointError


def find_step_dir(path: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{path} does not exist")
    if checkpoint.parse_step(p) is not None:
        if not checkpoint.is_complete(p):
            raise CheckpointError(f"{p} is an incomplete checkpoint (its save never finished)")
        return p
    if not checkpoint.step_dirs(p):
        raise CheckpointError(f"{p} is neither a {checkpoint.STEP_PREFIX}_N directory nor a run directory holding one")
    latest = checkpoint.latest_complete(p)
    if latest is None:
        raise CheckpointError(f"{p} holds no complete {checkpoint.STEP_PREFIX}_N directory")
    return latest


def _unwrap_variables(tree):
    """nnx variables are stored as {'value': array}; the export wants the bare arrays."""
    if isinstance(tree, dict):
        if tree.keys() == {"value"}:
            return tree["value"]
        return {k: _unwrap_variables(v) for k, v in tree.items()}
    return tree


def convert(checkpoint_path: str, out: str, *, dtype: str | None = None, max_shard_size: str = "5GB",
            base_model: str | None = None) -> Path:
    hf.parse_size(max_shard_size)  # a bad size fails before the slow part
    step_dir = find_step_dir(checkpoint_path)
    meta = checkpoint.read_meta(step_dir)
    cfg = meta.get("config") or {}
    base = Path(base_model or meta.get("base_model") or cfg.get("model", {}).get("partial_pretrain") or "")
    if not (base / "config.json").is_file():
        raise CheckpointError(f"base model directory {str(base)!r} (from {step_dir.name}/meta) has no config.json; "
                              f"pass --base-model")
    export_dtype = dtype or cfg.get("trainer", {}).get("checkpoint", {}).get("hf_dtype") \
        or cfg.get("model", {}).get("param_dtype", "float32")
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    # One stacked parameter at a time from disk, never the whole model in host memory.
    fetch = lambda path: _unwrap_variables(checkpoint.restore_entry(step_dir, ("params", *path), cpu))  # noqa: E731
    tensors = hf.export_tensors(None, hf.read_config(base), fetch=fetch)
    print(f"[convert_to_hf] {step_dir} → {out} ({export_dtype})")
    return hf.write_hf_directory(tensors, out, base_model_dir=base, dtype=export_dtype, max_shard_size=max_shard_size,
                                 min_max_position_embeddings=cfg.get("data", {}).get("max_length"),
                                 trust_remote_code=bool(cfg.get("model", {}).get("trust_remote_code")))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="convert_to_hf", description="jaxsft checkpoint → Hugging Face directory")
    ap.add_argument("checkpoint", help="a global_step_N directory, or a run root (latest complete step)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), help="export dtype (default: the run's)")
    ap.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB or 500MB")
    ap.add_argument("--base-model", help="base model directory, when the one recorded in the checkpoint has moved")
    args = ap.parse_args(argv)
    try:
        out = convert(args.checkpoint, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                      base_model=args.base_model)
    except ValueError as e:  # CheckpointError, a bad size, a config hf refuses: all one sentence
        raise SystemExit(f"convert_to_hf: error: {e}") from None
    print(f"[convert_to_hf] wrote {out}")


if __name__ == "__main__":
    main()
