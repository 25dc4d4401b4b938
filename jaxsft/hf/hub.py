"""`model.partial_pretrain` → a local model directory, as verl accepts it: a directory, or a hub
id (`Qwen/Qwen2.5-Coder-7B-Instruct`) found in the local Hugging Face cache. jaxsft never
downloads: an id that is not cached is one line saying how to fetch it.
"""

from __future__ import annotations

from pathlib import Path

from jaxsft.hf.load import ModelDirError, check_readable
from jaxsft.hf.names import CONFIG_FILE

KEY = "model.partial_pretrain"


def _is_repo_id(value: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if value.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _from_cache(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True))  # the cache only: no network
    except LocalEntryNotFoundError:
        raise ModelDirError(
            f"{KEY}={repo_id!r} is neither a local directory nor a model in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}, set by HF_HOME); jaxsft does not download at run time: fetch it once with "
            f"`hf download {repo_id}`, or give a local directory") from None
    if not (snapshot / CONFIG_FILE).is_file():
        raise ModelDirError(f"{KEY}={repo_id!r}: the cached snapshot {snapshot} has no {CONFIG_FILE} (an interrupted "
                            f"download? run `hf download {repo_id}` again)")
    return snapshot


def resolve_model_dir(value) -> Path:
    """The model directory `model.partial_pretrain=value` names: `value` itself when it is a
    directory, else the cached snapshot of the hub id `value`. Raises ModelDirError naming the key."""
    path = Path(value).expanduser()
    if path.is_dir():
        check_readable(path)
        if not (path / CONFIG_FILE).is_file():
            raise ModelDirError(f"{KEY}={str(value)!r} is not a Hugging Face model directory (no {CONFIG_FILE} there)")
        return path
    if path.exists():
        raise ModelDirError(f"{KEY}={str(value)!r} is a file, not a Hugging Face model directory")
    if _is_repo_id(str(value)):
        return _from_cache(str(value))
    raise ModelDirError(f"{KEY}={str(value)!r} is not a Hugging Face model directory (no {CONFIG_FILE} there): "
                        f"{path} does not exist")


def model_directory(spec) -> Path:
    """The base model directory for the model settings `spec` (`jaxsft.config.settings.ModelSpec`),
    after importing `model.external_lib` (verl imports it before loading the model, to register
    custom code). The smoke recipe's tiny model is written first when missing — only at the
    recipe's own path, never at one the user gave; every other directory must exist."""
    if spec.external_lib:
        import importlib

        try:
            importlib.import_module(spec.external_lib)
        except Exception as e:  # noqa: BLE001 - any failure of the user's module, in one line
            raise ModelDirError(f"model.external_lib={spec.external_lib!r} cannot be imported ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if spec.tiny is not None:
        import jax

        from jaxsft import distributed, tiny

        if jax.process_index() == 0 and not (Path(spec.partial_pretrain) / CONFIG_FILE).exists():
            tiny.ensure_tiny_model(spec.partial_pretrain, spec.tiny.tokenizer_dir, seed=spec.tiny.seed, **spec.tiny.shape)
        distributed.barrier("tiny-model")  # every process meets it, also one that already sees the model
    return resolve_model_dir(spec.partial_pretrain)
