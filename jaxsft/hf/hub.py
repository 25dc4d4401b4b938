"""`model.partial_pretrain` → a local model directory, as verl accepts it: a directory, or a hub
id (`Qwen/Qwen2.5-Coder-7B-Instruct`) found in the local Hugging Face cache. jaxsft never
downloads: an id that is not cached is one line saying how to fetch it.
"""

from __future__ import annotations

from pathlib import Path

from jaxsft.hf.files import ModelDirError, check_readable
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
