"""Where a checkpoint's parts lie on disk: the names of a run root's step directories, the tracker
and the file listing, and the readers and atomic writers of those small files.

A run root (`trainer.default_local_dir`) holds

    global_step_N/                 one Orbax checkpoint, committed atomically (written as
                                   global_step_N.orbax-checkpoint-tmp, renamed when complete)
        state/                     pytree: params (model), opt_state (optimizer), step and any
                                   other train-state keys (extra)
        data_process_{i}/          JSON data-iterator state of process i (extra)
        meta/                      JSON: config, epoch, base_model, step, save_contents, versions
        huggingface/               transformers directory (hf_model); a LoRA run's is merged
        lora_adapter/              a LoRA run's PEFT adapter (with hf_model)
        jaxsft_files.json          every file above with its size, written once the step is
                                   finished (the listing that completeness is checked against)
    latest_checkpointed_iteration.txt
                                   N of the newest complete step, written last (tmp + rename)
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import orbax.checkpoint as ocp

from jaxsft.errors import UserError

STEP_PREFIX = "global_step"
TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "jaxsft_files.json"  # in each step: every file and its size, written when the save finished
ADAPTER_DIR = "lora_adapter"
_STEP_DIR = re.compile(rf"{STEP_PREFIX}_(\d+)")
_GROUP = {"params": "model", "opt_state": "optimizer"}  # every other state key is "extra"

log = logging.getLogger(__name__)


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message is one sentence."""


def group_of(state_key: str) -> str:
    return _GROUP.get(state_key, "extra")


def parse_step(path: str | os.PathLike) -> int | None:
    """N for a path named global_step_N, else None."""
    m = _STEP_DIR.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def step_dirs(root: str | os.PathLike) -> dict[int, Path]:
    """Every `global_step_N` directory under `root`, complete or not, by N."""
    root = Path(root)
    if not root.is_dir():
        return {}
    return {parse_step(p): p for p in root.iterdir() if parse_step(p) is not None and p.is_dir()}


def read_json_item(item_dir: Path):
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(item_dir, args=ocp.args.JsonRestore())


def read_meta(step_dir: str | os.PathLike) -> dict:
    return read_json_item(Path(step_dir) / "meta")


def write_atomically(path: Path, text: str) -> None:
    """`text` into `path` all at once: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_tracker(root: str | os.PathLike) -> int | None:
    path = Path(root) / TRACKER
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        log.warning("ignoring %s: %r is not a step number", path, text)
        return None
    return int(text)


def write_tracker(root: Path, step: int) -> None:
    """Record `step` as the newest complete one, written last (tmp + fsync + rename)."""
    write_atomically(Path(root) / TRACKER, str(step))


def state_tree_metadata(step_dir: Path) -> dict:
    """The saved state's tree of array metadata (shapes, dtypes), read without any array data."""
    if not (step_dir / "state").is_dir():
        return {}
    # The handler's own reader: the checkpointer's would warn about a step-level metadata file.
    from etils import epath

    return ocp.PyTreeCheckpointHandler().metadata(epath.Path(Path(step_dir).absolute() / "state")).tree
