"""A weightless model directory for planning: config.json of a real model's geometry (Qwen2.5,
Qwen3, Qwen3-30B-A3B, Llama 3.1, Mistral, Gemma: bench.throughput.SHAPES) plus the
bundled tokenizer, so `python -m jaxsft.train ... --dry_run=h100:8` can plan the real shape on a
machine that has neither the weights nor a GPU.

    python -m bench.model_dir --shape qwen2.5-7b --out models/qwen2.5-7b-plan

The tokenizer is jaxsft's small bundled one (its ids are below every listed vocabulary size):
it only feeds the data summary and the batch shape. A directory made here has no weights, so
training from it stops at loading with a sentence; it is for `--dry_run` only.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from bench.throughput import SHAPES, hf_config


def write_model_dir(shape: str, out) -> Path:
    """config.json for SHAPES[shape] (transformers' own writer) and the bundled tokenizer files."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from jaxsft import bundled

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(shape)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.save_pretrained(out)
    for f in bundled.path("tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.model_dir", description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-7b")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    print(f"[bench] wrote {write_model_dir(args.shape, args.out)} ({args.shape}: config.json and the bundled "
          f"tokenizer, no weights)")


if __name__ == "__main__":
    main()
