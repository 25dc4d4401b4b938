"""jaxsft checkpoint → Hugging Face directory (and, for a LoRA run, its PEFT adapter).

    bin/convert_to_hf CHECKPOINT --out DIR [--dtype bfloat16|float32] [--max-shard-size 5GB]
                      [--base-model DIR] [--adapter-out DIR]

CHECKPOINT is a `global_step_N` directory or a run root (then the tracker names the latest
complete step). The parameters are read on the CPU whatever mesh saved them; config.json,
generation config and tokenizer files come from the base model recorded in the step's meta
(`--base-model` when it has moved). The export dtype defaults to the run's
trainer.checkpoint.hf_dtype, else its model.param_dtype.

A LoRA run (model.lora_rank > 0 in the step's config) exports the merged model to `--out` and
its PEFT adapter to `--adapter-out` (default: DIR_lora_adapter beside DIR; it applies to the base
model, not to the merged one). A run with model.added_tokens exports its tokenizer and
config.json with the tokens the meta records.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax

from jaxsft import checkpoint, hf, plan
from jaxsft.checkpoint import CheckpointError


def find_step_dir(path: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{path} does not exist")
    if checkpoint.parse_step(p) is not None:
        problems = checkpoint.step_problems(p)
        if problems:
            raise CheckpointError(f"{p} is an incomplete checkpoint ({checkpoint.describe(problems)}); "
                                  f"convert an earlier {checkpoint.STEP_PREFIX}_N")
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


def export_of(meta: dict, base: Path) -> hf.Export:
    """The run's hf.Export from its step meta: LoRA settings from its config, the added tokens recorded."""
    from jaxsft.model.lora import LoRASettings, target_names, target_parameters

    cfg = meta.get("config") or {}
    model_cfg = cfg.get("model", {})
    config = hf.read_config(base)
    lora = None
    if model_cfg.get("lora_rank"):
        lora = LoRASettings(rank=int(model_cfg["lora_rank"]), alpha=float(model_cfg["lora_alpha"]),
                            targets=target_names(model_cfg["target_modules"]),
                            dropout=float(model_cfg.get("lora_dropout") or 0.0),
                            parameters=target_parameters(model_cfg.get("target_parameters") or ()))
    added = None
    if meta.get("added_tokens"):
        tokenizer = hf.open_tokenizer(base, trust_remote_code=bool(model_cfg.get("trust_remote_code")))
        added = hf.add_tokens(tokenizer, tuple(meta["added_tokens"]), config.vocab_size)
        if added.vocab_size != meta["vocab_size"]:
            raise CheckpointError(f"the tokenizer of {base} plus the run's added tokens has {added.vocab_size} entries; "
                                  f"the run trained {meta['vocab_size']}: pass --base-model the model it trained from")
        config = dataclasses.replace(config, vocab_size=added.vocab_size)
    return hf.Export(config, lora, added)


def convert(checkpoint_path: str, out: str, *, dtype: str | None = None, max_shard_size: str = "5GB",
            base_model: str | None = None, adapter_out: str | None = None) -> Path:
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
    export = export_of(meta, base)
    trust = bool(cfg.get("model", {}).get("trust_remote_code"))
    if export.lora is not None:
        adapter_out = adapter_out or f"{str(out).rstrip('/')}_lora_adapter"
        print(f"[convert_to_hf] {step_dir} → {adapter_out} (PEFT adapter of {base}, float32)")
        export.write_adapter(None, adapter_out, base_model_name_or_path=str(base.absolute()), fetch=fetch)
    print(f"[convert_to_hf] {step_dir} → {out} ({export_dtype}{', LoRA merged' if export.lora else ''})")
    return hf.write_hf_directory(export.tensors(None, fetch=fetch), out, base=export.base_files(base, trust_remote_code=trust),
                                 dtype=export_dtype, max_shard_size=max_shard_size,
                                 min_max_position_embeddings=cfg.get("data", {}).get("max_length"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="convert_to_hf", description="jaxsft checkpoint → Hugging Face directory")
    ap.add_argument("checkpoint", help="a global_step_N directory, or a run root (latest complete step)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), help="export dtype (default: the run's)")
    ap.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB or 500MB")
    ap.add_argument("--base-model", help="base model directory, when the one recorded in the checkpoint has moved")
    ap.add_argument("--adapter-out", help="a LoRA run's PEFT adapter directory (default: OUT_lora_adapter)")
    args = ap.parse_args(argv)
    plan.prepare_environment(None)  # the CPU is all it needs: no failed CUDA check printed on a machine without a GPU
    t0 = time.perf_counter()
    try:
        out = convert(args.checkpoint, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                      base_model=args.base_model, adapter_out=args.adapter_out)
    except ValueError as e:  # CheckpointError, a bad size, a config hf refuses: all one sentence
        raise SystemExit(f"convert_to_hf: error: {e}") from None
    print(f"[convert_to_hf] wrote {out} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
