"""Whether a saved step fits the run resuming from it: the same arrays, the same training mode."""

from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp

from jaxsft.checkpoint.layout import CheckpointError


def check_same_shapes(step_dir: Path, target: dict, saved_tree: dict, meta: dict) -> None:
    """Refuse, in one sentence, a checkpoint whose arrays are not those of the state to restore
    (another base model, or another optimizer): Orbax would fail deep in tensorstore instead."""
    saved = ocp.tree.to_flat_dict(saved_tree)
    differ = []
    flat = ocp.tree.to_flat_dict(target)
    for key, leaf in sorted(flat.items(), key=lambda item: item[0][0] != "params"):  # parameters first
        if getattr(leaf, "shape", None) is None:
            continue
        name = "/".join(k for k in key if k != "value")  # nnx variables are stored as {'value': ...}
        if key not in saved:
            differ.append(f"{name} is not in it")
        elif tuple(saved[key].shape) != tuple(leaf.shape):
            differ.append(f"{name} has shape {list(saved[key].shape)} there but {list(leaf.shape)} here")
    for key, leaf in saved.items():  # e.g. an untied LM head that this (tied) model would drop
        if key[0] in target and key not in flat and getattr(leaf, "shape", None) is not None:
            differ.append(f"{'/'.join(k for k in key if k != 'value')} is in it but not in this model")
    if differ:
        more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
        raise CheckpointError(
            f"cannot resume from {step_dir}: it holds a different model — {differ[0]}{more}; it was trained from "
            f"{meta.get('base_model', 'another base model')}: resume with that model.partial_pretrain, or choose "
            f"another trainer.default_local_dir to start fresh")


# model.* keys that change what the train state holds (LoRA adapters, trainable part, vocabulary)
# or what its numbers mean (the adapters' scale and dropout), with their defaults.
_MODE_KEYS = {"lora_rank": 0, "lora_alpha": 16, "target_modules": ["all-linear"], "lora_dropout": 0.0,
              "trainable": ["all"]}


def check_same_mode(step_dir: Path, saved_meta: dict, current_meta: dict) -> None:
    """Refuse, naming the keys, a checkpoint saved under other training-mode settings (the added
    tokens compared as the tokens the meta records, not as the file that listed them)."""
    if not current_meta.get("config"):
        return

    def mode(meta):
        model = (meta.get("config") or {}).get("model", {})
        return {**{f"model.{k}": model.get(k, default) for k, default in _MODE_KEYS.items()},
                "model.added_tokens": meta.get("added_tokens")}

    saved, now = mode(saved_meta), mode(current_meta)
    differ = [f"{k}={saved[k]!r} there, {now[k]!r} here" for k in saved if saved[k] != now[k]]
    if differ:
        raise CheckpointError(f"cannot resume from {step_dir}: it was trained with other settings — {'; '.join(differ)}; "
                              f"resume with its settings, or choose another trainer.default_local_dir to start fresh")
