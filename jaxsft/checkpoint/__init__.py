"""Checkpoints of a run: Orbax step directories, the tracker file, retention and resume.

One job per module, each importing only those before it:

    layout          names on disk (global_step_N, the tracker, the file listing), their readers and atomic writers
    storage_errors  Orbax / tensorstore storage failures as one line (unreadable file, full disk) and their log noise
    integrity       complete-step detection, the file listing, the step a run resumes from
    compat          whether a saved step fits the resuming run (array shapes, training-mode keys)
    restore         the partial restore of a step's train state, and one entry of it for offline tools
    checkpointer    the Checkpointer: asynchronous saves, their completion (tracker, retention), restore

The names below are what the rest of jaxsft, bin/, convert/, bench/ and tests/ use.
"""

from jaxsft import hf  # noqa: F401 - tests patch checkpoint.hf.write_hf_directory
from jaxsft.checkpoint.checkpointer import Checkpointer
from jaxsft.checkpoint.compat import MODE_KEYS
from jaxsft.checkpoint.integrity import describe, is_complete, latest_complete, resolve_resume, step_problems
from jaxsft.checkpoint.layout import (ADAPTER_DIR, MANIFEST, STEP_PREFIX, TRACKER, CheckpointError, parse_step,
                                      read_meta, step_dirs)
from jaxsft.checkpoint.restore import restore_entry
from jaxsft.preemption import PreemptionFlag  # moved out (not a checkpoint's job); kept here for its callers

__all__ = ["ADAPTER_DIR", "MANIFEST", "MODE_KEYS", "STEP_PREFIX", "TRACKER", "Checkpointer", "CheckpointError", "PreemptionFlag",
           "describe", "is_complete", "latest_complete", "parse_step", "read_meta", "resolve_resume", "restore_entry",
           "step_dirs", "step_problems"]
