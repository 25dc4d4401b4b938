"""Checkpoints: Orbax step directories, the tracker file, retention and resume (see checkpointer)."""

from jaxsft import hf  # noqa: F401 - tests patch checkpoint.hf.write_hf_directory
from jaxsft.checkpoint.checkpointer import (
    ADAPTER_DIR, MANIFEST, STEP_PREFIX, TRACKER, Checkpointer, CheckpointError, PreemptionFlag, describe,
    is_complete, latest_complete, parse_step, read_meta, resolve_resume, restore_entry, step_dirs, step_problems)

__all__ = ["ADAPTER_DIR", "MANIFEST", "STEP_PREFIX", "TRACKER", "Checkpointer", "CheckpointError", "PreemptionFlag",
           "describe", "is_complete", "latest_complete", "parse_step", "read_meta", "resolve_resume", "restore_entry",
           "step_dirs", "step_problems"]
