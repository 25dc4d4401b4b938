"""A LoRA run's adapters as a PEFT adapter directory (`lora_adapter/`) that
`peft.PeftModel.from_pretrained(base_model, dir)` loads onto the base model.

`adapter_model.safetensors` holds PEFT's names, `base_model.model.<HF module>.lora_A.weight [r, in]`
and `lora_B.weight [out, r]` (our `lora_a` / `lora_b` transposed), in float32 as trained; the
experts' adapters (`model.target_parameters`) as PEFT's ParamWrapper holds them, all E experts in
one pair, `lora_A.weight [E·r, in]` (row e·r + j: expert e's row j) and `lora_B.weight [out, r·E]`
(column j·E + e). `adapter_config.json` (LoRA, CAUSAL_LM, r, lora_alpha, lora_dropout,
target_modules, target_parameters, bias none) is written last, so a directory with it is whole. Every process calls `write_adapter` (gathers are
collective); process 0 writes.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxsft.hf.names import PEFT_PREFIX, expert_lora_modules, lora_modules
from jaxsft.hf.writer import param_arrays, write_single_file
from jaxsft.model.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def adapter_config(lora, base_model_name_or_path: str) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "target_modules": list(lora.targets), "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "use_rslora": False,
            "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
            "base_model_name_or_path": base_model_name_or_path,
            **({"target_parameters": list(lora.parameters)} if lora.parameters else {})}


def adapter_tensors(model_or_params, config: ModelConfig, lora, *, fetch=None):
    """(PEFT name, host-ready array [r, in] or [out, r]) for every adapter, layer by layer."""
    if fetch is None:
        params = param_arrays(model_or_params)
        fetch = lambda path: _get(params, path)  # noqa: E731
    for module, path, layer in lora_modules(config, lora.targets):
        for which, key in (("A", "lora_a"), ("B", "lora_b")):
            stack = fetch((*path, key))
            array = stack[layer] if layer is not None else stack
            yield f"{PEFT_PREFIX}{module}.lora_{which}.weight", array.T
    for module, path, layer in expert_lora_modules(config, lora.parameters):
        a, b = fetch((*path, "lora_a"))[layer], fetch((*path, "lora_b"))[layer]  # [E, in, r], [E, r, out]
        experts, rank = a.shape[0], a.shape[-1]
        yield f"{PEFT_PREFIX}{module}.lora_A.weight", a.transpose(0, 2, 1).reshape(experts * rank, a.shape[1])
        yield f"{PEFT_PREFIX}{module}.lora_B.weight", b.transpose(2, 1, 0).reshape(b.shape[-1], rank * experts)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def write_adapter(model_or_params, config: ModelConfig, lora, out_dir, *, base_model_name_or_path: str,
                  fetch=None) -> Path:
    """Write `out_dir` as a PEFT LoRA adapter directory; returns its path."""
    out_dir = Path(out_dir)
    # PEFT reads one weights file
    if write_single_file(adapter_tensors(model_or_params, config, lora, fetch=fetch), out_dir / WEIGHTS_FILE,
                         dtype="float32") is None:
        return out_dir  # not process 0
    path = out_dir / CONFIG_FILE
    path.write_text(json.dumps(adapter_config(lora, base_model_name_or_path), indent=2) + "\n")
    return out_dir
