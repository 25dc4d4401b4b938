"""Reading a step's train state: the partial Orbax restore, and one entry of it for offline tools."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxsft.checkpoint.layout import STEP_PREFIX, CheckpointError, state_tree_metadata
from jaxsft.checkpoint.storage_errors import read_failure


def restore_state_tree(step_dir: Path, target: dict, restore_args) -> dict:
    """The entries of `target` read from the step's state item; a file that cannot be read is a
    CheckpointError naming it (the step was damaged after its save)."""
    args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    try:
        return ocp.PyTreeCheckpointer().restore(step_dir / "state", args=args)
    except Exception as e:  # Orbax wraps tensorstore's errors in a bare Exception
        reason = read_failure(e, step_dir)
        if reason is None:
            raise
        # Files that passed the completeness check but cannot be read: damaged after the save.
        raise CheckpointError(f"cannot read {step_dir}: {reason}, so the checkpoint is damaged; resume from an "
                              f"earlier {STEP_PREFIX}_N (trainer.resume_from_path) or restore its files") from None


def restore_entry(step_dir: str | os.PathLike, key: str | tuple[str, ...] = "params",
                  sharding: jax.sharding.Sharding | None = None):
    """One entry of a step's train state — a top-level key, or a key path down to one parameter —
    whatever mesh saved it (for offline tools): numpy arrays, or jax arrays in `sharding`. Only
    that entry is read (a partial restore). nnx variables come back as {'value': array} dicts."""
    step_dir = Path(step_dir)
    keys = (key,) if isinstance(key, str) else tuple(key)
    node = state_tree_metadata(step_dir)
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            raise CheckpointError(f"{step_dir} holds no '{'/'.join(keys)}' (see trainer.checkpoint.save_contents)")
        node = node[k]
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), node)
    for k in reversed(keys):
        target = {k: target}
    if sharding is None:
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    else:
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    restored = restore_state_tree(step_dir, target, restore_args)
    for k in keys:
        restored = restored[k]
    return restored
