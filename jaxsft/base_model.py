"""Finding the base model directory of a run: `model.partial_pretrain` (a directory, or a hub id in
the local cache), after `model.external_lib` is imported; the smoke recipe's tiny model is built
at the recipe's own path when missing."""

from __future__ import annotations

import importlib
from pathlib import Path


from jaxsft import distributed, tiny
from jaxsft.hf.files import ModelDirError
from jaxsft.hf.hub import resolve_model_dir
from jaxsft.hf.names import CONFIG_FILE
from jaxsft.settings import ModelSettings


def directory(spec: ModelSettings) -> Path:
    """The base model directory for the model settings `spec`,
    after importing `model.external_lib` (verl imports it before loading the model, to register
    custom code). The smoke recipe's tiny model is written first when missing — only at the
    recipe's own path, never at one the user gave; every other directory must exist."""
    if spec.external_lib:
        try:
            importlib.import_module(spec.external_lib)
        except Exception as e:  # noqa: BLE001 - any failure of the user's module, in one line
            raise ModelDirError(f"model.external_lib={spec.external_lib!r} cannot be imported ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if spec.tiny is not None:
        if distributed.is_primary() and not (Path(spec.partial_pretrain) / CONFIG_FILE).exists():
            tiny.ensure_tiny_model(spec.partial_pretrain, spec.tiny.tokenizer_dir, seed=spec.tiny.seed, **dict(spec.tiny.shape))
        distributed.barrier("tiny-model")  # every process meets it, also one that already sees the model
    return resolve_model_dir(spec.partial_pretrain)
