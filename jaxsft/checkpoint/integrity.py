"""Which step directories are complete, and which one a run resumes from.

A step directory is complete only when Orbax committed it, every item and file its metadata and
listing name is there at the listed size, and (hf_model) its export is in place — checked from
metadata and file sizes, no array data read. Resuming never uses an incomplete step: `auto` falls
back to the newest complete one and says which part was missing; a named step is refused.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from jaxsft.checkpoint.layout import (
    ADAPTER_DIR, MANIFEST, STEP_PREFIX, TRACKER, CheckpointError, parse_step, read_meta, read_tracker,
    state_tree_metadata, step_dirs, write_atomically)
from jaxsft.checkpoint.storage_errors import read_failure

log = logging.getLogger(__name__)


def step_problems(step_dir: str | os.PathLike) -> list[str]:
    """What keeps `step_dir` from being a complete checkpoint, as short phrases; [] when complete.

    Cheap (metadata and file sizes, no array data): Orbax's commit marker; the meta item; every
    item Orbax recorded (`_CHECKPOINT_METADATA`) and every data_process_i of the meta's
    process_count; the state's tree metadata holding the top-level keys that were saved; and every
    file of the `MANIFEST` written when the save finished, at its size (so one deleted or truncated
    array file counts). Steps saved before the manifest existed are checked without it.
    """
    p = Path(step_dir)
    if not ((p / "_CHECKPOINT_METADATA").is_file() and (p / "commit_success.txt").is_file()):
        return ["its save never finished: no Orbax commit marker"]
    try:
        meta = read_meta(p)
    except Exception:  # noqa: BLE001 - any unreadable meta means the step cannot be used
        return ["meta/ cannot be read"]
    problems = _item_problems(p, meta)
    if meta.get("files_manifest"):
        problems += [q for q in _manifest_problems(p) if q not in problems]
    elif "hf_model" in meta.get("save_contents", ()) and not (p / "huggingface" / "config.json").is_file():
        problems.append("huggingface/config.json is missing")
    if (not meta.get("files_manifest") and "hf_model" in meta.get("save_contents", ()) and meta.get("lora_adapter")
            and not (p / ADAPTER_DIR / "adapter_config.json").is_file()):
        problems.append(f"{ADAPTER_DIR}/adapter_config.json is missing")
    return problems


def is_complete(step_dir: str | os.PathLike) -> bool:
    return not step_problems(step_dir)


def describe(problems: list[str]) -> str:
    """The first problem, and how many more: one clause for a one-line message."""
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def _item_problems(p: Path, meta: dict) -> list[str]:
    try:
        items = set(json.loads((p / "_CHECKPOINT_METADATA").read_text())["item_handlers"])
    except (OSError, ValueError, KeyError, TypeError):
        return ["_CHECKPOINT_METADATA cannot be read"]
    if any(i.startswith("data_process_") for i in items):  # every process's iterator state, or none
        items |= {f"data_process_{i}" for i in range(int(meta.get("process_count", 1)))}
    problems = [f"{i}/ is missing" for i in sorted(items) if not (p / i).is_dir()]
    keys = meta.get("state_keys", ())
    if "state" in items and (p / "state").is_dir():
        if not (p / "state" / "_METADATA").is_file():
            return problems + ["state/_METADATA is missing"]
        try:
            tree = state_tree_metadata(p)  # state/_METADATA and each array's own metadata
        except Exception as e:  # noqa: BLE001 - any failure of Orbax's metadata reader: unreadable
            return problems + [read_failure(e, p) or "state/_METADATA cannot be read"]
        problems += [f"state/ holds no {k}" for k in keys if k not in tree]
    elif keys and "state" not in items:
        problems.append("state/ was not recorded by Orbax")
    return problems


def _manifest_problems(p: Path) -> list[str]:
    try:
        listed = json.loads((p / MANIFEST).read_text())
    except FileNotFoundError:
        return [f"its save never finished: no {MANIFEST}"]
    except (OSError, ValueError):
        return [f"{MANIFEST} cannot be read"]
    problems = []
    for rel, size in listed.items():
        top = rel.split("/")[0]
        if "/" in rel and not (p / top).is_dir():
            problem = f"{top}/ is missing"  # once for the directory, not for each of its files
        else:
            try:
                got = (p / rel).stat().st_size
            except OSError:
                got = None
            problem = (f"{rel} is missing" if got is None else
                       f"{rel} holds {got} bytes, {size} were written" if got != size else None)
        if problem and problem not in problems:
            problems.append(problem)
    return problems


def write_manifest(step_dir: Path) -> None:
    """List every file of a finished step with its size (tmp + fsync + rename): what
    `step_problems` checks the step against later."""
    files = {f.relative_to(step_dir).as_posix(): f.stat().st_size
             for f in sorted(step_dir.rglob("*")) if f.is_file() and f.name != MANIFEST}
    write_atomically(step_dir / MANIFEST, json.dumps(files, indent=0))


def latest_complete(root: str | os.PathLike, warn=log.warning) -> Path | None:
    """The step directory to resume from: the tracker's step, or the newest complete step before
    it when that one is missing or incomplete. Steps newer than the tracker are unfinished saves
    or leftovers of an abandoned run and are ignored. Without a tracker (killed before the first
    save was finalised) the newest complete step is used. Skipping an incomplete step is said in
    one line through `warn`, naming what it lacks.

    A CheckpointError when no complete step is left but one of the skipped steps had been finished
    (tracked, or with its file listing): its damage would otherwise restart training from the base
    model unnoticed. Unfinished saves alone (killed during the first save) mean starting fresh."""
    root = Path(root)
    dirs = step_dirs(root)
    tracked = read_tracker(root)
    candidates = sorted(dirs, reverse=True)
    if tracked is not None:
        newer = [dirs[s].name for s in sorted(dirs) if s > tracked]
        if newer:
            warn(f"ignoring {', '.join(newer)}: newer than {TRACKER} (step {tracked}), so not known to be complete")
        if tracked not in dirs:
            warn(f"{TRACKER} names step {tracked} but {STEP_PREFIX}_{tracked} is missing")
        candidates = [s for s in candidates if s <= tracked]
    skipped, damaged = [], False
    for s in candidates:
        problems = step_problems(dirs[s])
        if not problems:
            if skipped:
                warn(f"{'; '.join(skipped)}; resuming from {dirs[s].name} instead")
            return dirs[s]
        skipped.append(f"{dirs[s].name} is incomplete ({describe(problems)})")
        damaged = damaged or s == tracked or (dirs[s] / MANIFEST).is_file()
    if damaged:
        raise CheckpointError(f"{root} holds no complete checkpoint to resume from ({'; '.join(skipped)}); restore "
                              f"the missing files, or delete the damaged {STEP_PREFIX}_N directories to start fresh")
    if skipped:
        warn(f"{'; '.join(skipped)}; starting from the base model")
    return None


def resolve_resume(ckpt, warn=log.warning) -> Path | None:
    """The step directory to resume from, or None to start fresh (verl's resume_mode semantics),
    for the checkpoint settings `ckpt` (`jaxsft.config.settings.CheckpointSettings`)."""
    mode, path = ckpt.resume_mode, ckpt.resume_from_path
    if mode == "disable":
        return None
    if path:
        p = Path(path).absolute()  # Orbax reads no metadata through a relative path
        if not p.is_dir():
            raise CheckpointError(f"trainer.resume_from_path={path!r} does not exist")
        if parse_step(p) is None:
            raise CheckpointError(f"trainer.resume_from_path={path!r} is not a {STEP_PREFIX}_N directory")
        problems = step_problems(p)
        if problems:
            raise CheckpointError(f"trainer.resume_from_path={path!r} is an incomplete checkpoint "
                                  f"({describe(problems)}); choose an earlier {STEP_PREFIX}_N")
        return p
    return latest_complete(Path(ckpt.default_local_dir).absolute(), warn=warn)
