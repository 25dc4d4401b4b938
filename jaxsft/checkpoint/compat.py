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
# or what its numbers mean (the adapters' scale and dropout).
MODE_KEYS = ("lora_rank", "lora_alpha", "target_modules", "lora_dropout", "target_parameters", "trainable")


def check_same_mode(step_dir: Path, saved_meta: dict, current_meta: dict, defaults: dict) -> None:
    """Refuse, naming the keys, a checkpoint saved under other training-mode settings (the added
    tokens compared as the tokens the meta records, not as the file that listed them).

    Every meta records the whole configuration, so a mode key is absent only from a meta written
    before the key existed: it reads as its default, `defaults["model.<key>"]` in the form the meta
    records (None when not given). The caller passes the defaults in (`Checkpointer.for_run` asks the
    settings) rather than this module restating them: the key table lives in jaxsft.config, which
    sits above the checkpoint package, and a second copy here would drift from it."""
    if not current_meta.get("config"):
        return

    def mode(meta):
        model = (meta.get("config") or {}).get("model", {})
        return {**{f"model.{k}": model.get(k, defaults.get(f"model.{k}")) for k in MODE_KEYS},
                "model.added_tokens": meta.get("added_tokens")}

    saved, now = mode(saved_meta), mode(current_meta)
    differ = [f"{k}={saved[k]!r} there, {now[k]!r} here" for k in saved if saved[k] != now[k]]
    if differ:
        raise CheckpointError(f"cannot resume from {step_dir}: it was trained with other settings — {'; '.join(differ)}; "
                              f"resume with its settings, or choose another trainer.default_local_dir to start fresh")
