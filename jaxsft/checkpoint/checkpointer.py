"""Checkpoints: Orbax step directories, the tracker file, retention, resume and preemption.

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

A step directory is complete only when Orbax committed it, every item and file its metadata and
listing name is there at the listed size, and (hf_model) its export is in place — checked from
metadata and file sizes, no array data read. Resuming never uses an incomplete step: `auto` falls
back to the newest complete one and says which part was missing; a named step is refused.

An exact resume needs model, optimizer and extra: the lr is a function of `step`, and the data
order a function of (seed, epoch) and the iterator state; SFT draws no other random numbers.

Saving is asynchronous: `save` returns once the arrays are copied to the host and Orbax writes in
the background. The step counts as complete only when Orbax has committed it and its HF export is
in place; then the tracker is written and old steps are deleted. That happens at the next `save`,
`poll` (cheap; call it every step), `wait` or `close`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxsft import __version__, distributed, hf
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
            tree = _state_tree_metadata(p)  # state/_METADATA and each array's own metadata
        except Exception as e:  # noqa: BLE001 - any failure of Orbax's metadata reader: unreadable
            return problems + [_read_failure(e, p) or "state/_METADATA cannot be read"]
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
    _write_atomically(step_dir / MANIFEST, json.dumps(files, indent=0))


def _write_atomically(path: Path, text: str) -> None:
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


def _gather_json(obj) -> list:
    """Every process's JSON-able `obj`, by process index (Orbax's JSON items are written by
    process 0 only, so process 0 must hold all of them)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(raw.size)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    everyone = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(everyone[i, :sizes[i]].tobytes()) for i in range(len(sizes))]


def _state_tree_metadata(step_dir: Path) -> dict:
    if not (step_dir / "state").is_dir():
        return {}
    # The handler's own reader: the checkpointer's would warn about a step-level metadata file.
    from etils import epath

    return ocp.PyTreeCheckpointHandler().metadata(epath.Path(Path(step_dir).absolute() / "state")).tree


def _check_same_shapes(step_dir: Path, target: dict, saved_tree: dict, meta: dict) -> None:
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


def _check_same_mode(step_dir: Path, saved_meta: dict, current_meta: dict) -> None:
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


def _restore_state(step_dir: Path, target: dict, restore_args) -> dict:
    args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    try:
        return ocp.PyTreeCheckpointer().restore(step_dir / "state", args=args)
    except Exception as e:  # Orbax wraps tensorstore's errors in a bare Exception
        reason = _read_failure(e, step_dir)
        if reason is None:
            raise
        # Files that passed the completeness check but cannot be read: damaged after the save.
        raise CheckpointError(f"cannot read {step_dir}: {reason}, so the checkpoint is damaged; resume from an "
                              f"earlier {STEP_PREFIX}_N (trainer.resume_from_path) or restore its files") from None


# tensorstore reports storage failures as ValueError("CODE: ..."); other codes are not the disk's.
_STORAGE_CODES = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE", "PERMISSION_DENIED", "FAILED_PRECONDITION")
_LOCAL_FILE = re.compile(r'local file "([^"]+)"')


def _read_failure(e: BaseException | None, step_dir: Path) -> str | None:
    """One clause naming what of `step_dir` could not be read, when `e` (or an exception it was
    raised from) is a failure to read the files themselves — an OSError, or one of tensorstore's
    storage codes; else None (a bug keeps its traceback)."""
    while e is not None and not isinstance(e, OSError) and str(e).split(":", 1)[0] not in _STORAGE_CODES:
        e = e.__cause__ or e.__context__
    if e is None:
        return None
    root = f"{step_dir}/"
    if isinstance(e, OSError):
        path, why = e.filename, e.strerror or str(e)
    else:
        why = str(e).split(" [tensorstore_spec=")[0].splitlines()[0].replace(root, "")
        files = _LOCAL_FILE.findall(str(e).split(" [tensorstore_spec=")[0])
        path = files[-1] if files else None
    if path is None:
        return f"a file under it cannot be read ({why})"
    shown = str(path).replace(root, "")
    return f"{shown} is missing" if not Path(path).exists() else f"{shown} cannot be read ({why})"


_FULL_DISK = ("No space left on device", "Disk quota exceeded")


def _disk_full(e: BaseException | None) -> bool:
    """ENOSPC / EDQUOT, as Python's OSError or as tensorstore's RESOURCE_EXHAUSTED text."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(e) for t in _FULL_DISK):
            return True
        e = e.__cause__ or e.__context__
    return False


class _QuietFullDisk(logging.Filter):
    """Orbax logs a failed background write (with tracebacks) from each of its threads; a full disk
    is reported once, as one line, by the Checkpointer."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (_disk_full(exc) or any(t in record.getMessage() for t in _FULL_DISK))


_QUIET_FULL_DISK = _QuietFullDisk()


def _hush_closed_loop_callbacks() -> None:
    """When a write or read fails, tensorstore's callbacks for the operations still in flight find
    Orbax's event loop already closed and each prints an "Event loop is closed" traceback (dozens
    for one full disk); the failure itself surfaces as one exception, so those are dropped. Every
    other unraisable exception still prints."""
    previous = sys.unraisablehook
    if getattr(previous, "jaxsft_hush", False):
        return

    def hook(unraisable) -> None:
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook.jaxsft_hush = True
    sys.unraisablehook = hook


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def restore_entry(step_dir: str | os.PathLike, key: str | tuple[str, ...] = "params",
                  sharding: jax.sharding.Sharding | None = None):
    """One entry of a step's train state — a top-level key, or a key path down to one parameter —
    whatever mesh saved it (for offline tools): numpy arrays, or jax arrays in `sharding`. Only
    that entry is read (a partial restore). nnx variables come back as {'value': array} dicts."""
    step_dir = Path(step_dir)
    keys = (key,) if isinstance(key, str) else tuple(key)
    node = _state_tree_metadata(step_dir)
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
    restored = _restore_state(step_dir, target, restore_args)
    for k in keys:
        restored = restored[k]
    return restored


class Checkpointer:
    """Saves and restores train states under `trainer.default_local_dir` (see the module doc)."""

    def __init__(self, ckpt, *, base_model_dir, max_length: int, process_index: int | None = None,
                 meta: dict | None = None, export=None, trust_remote_code: bool = False):
        """`ckpt`: the checkpoint settings (`jaxsft.config.settings.CheckpointSettings`); the HF
        export takes config and tokenizer from `base_model_dir` and raises its context to
        `max_length`. `meta` goes into every step's meta; `export` (`jaxsft.hf.Export`) says what
        the HF export of a state's parameters is (merged LoRA, the PEFT adapter, added tokens)."""
        self._exporter = export
        self._meta = {**(meta or {}), **(export.meta() if export else {}),
                      "lora_adapter": bool(export and export.lora and "hf_model" in ckpt.save_contents)}
        self._base_model_dir = str(Path(base_model_dir).absolute())
        self.root = Path(ckpt.default_local_dir).absolute()
        self.contents, self.load_contents = ckpt.save_contents, ckpt.load_contents
        self.keep = ckpt.max_ckpt_to_keep
        self.process_index = jax.process_index() if process_index is None else process_index
        self._primary = jax.process_index() == 0
        self._async = ckpt.async_save
        self._export_args = None
        if "hf_model" in self.contents:
            # The base model's config, generation config and tokenizer, read (and so checked) now
            # rather than at the first save, hours later; only process 0 writes them.
            read = export.base_files if export else hf.BaseModelFiles.read
            self._export_args = dict(
                base=read(Path(base_model_dir), trust_remote_code=trust_remote_code) if self._primary else None,
                dtype=ckpt.hf_dtype, max_shard_size=ckpt.max_shard_size, min_max_position_embeddings=max_length)
        self._pending: tuple[int, list[tuple[Path, str]]] | None = None  # (step, its exports) awaiting commit
        self._bytes_needed = 0  # the size estimate of the last save, for a full disk's message
        for name in ("absl", "asyncio"):  # asyncio: "Task exception was never retrieved" for each failed write
            logging.getLogger(name).addFilter(_QUIET_FULL_DISK)
        _hush_closed_loop_callbacks()
        if self._primary:
            self.root.mkdir(parents=True, exist_ok=True)
            for leftover in [*self.root.glob(f".{STEP_PREFIX}_*.huggingface.tmp"),
                             *self.root.glob(f".{STEP_PREFIX}_*.{ADAPTER_DIR}.tmp")]:
                shutil.rmtree(leftover)  # an export whose save never completed
        distributed.barrier("jaxsft-checkpoint-init")
        options = ocp.CheckpointManagerOptions(
            step_name_format=ocp.path.step.standard_name_format(step_prefix=STEP_PREFIX),
            enable_async_checkpointing=self._async, cleanup_tmp_directories=True, create=True)
        self._manager = ocp.CheckpointManager(self.root, options=options)

    @classmethod
    def for_run(cls, settings, model_dir: Path, export) -> "Checkpointer":
        """The run's checkpointer: every step's meta records the configuration and the base model."""
        return cls(settings.checkpoint, base_model_dir=model_dir, max_length=settings.data.max_length,
                   meta={"config": settings.config, "base_model": str(Path(model_dir).resolve())}, export=export,
                   trust_remote_code=settings.model.trust_remote_code)

    def step_dir(self, step: int) -> Path:
        return self.root / f"{STEP_PREFIX}_{step}"

    def save(self, step: int, state: dict, *, data_state=None, meta: dict | None = None, export=None) -> Path:
        """Start saving `state` ({params, opt_state, step, ...} of jax arrays) as global_step_`step`.

        Blocks only for the device→host copy, plus the HF export when `hf_model` is saved: `export()`
        (default: the constructor's `export` of `state["params"]`) must return
        `jaxsft.hf.export_tensors(...)` of the live arrays, which the next (donating) train step
        invalidates. Every process calls this. Returns the step directory. A full disk, here or
        when the background write ends, is a CheckpointError naming the space needed; the
        unfinished step is deleted and the previous one stays as it was.
        """
        if export is None and self._exporter is not None and "params" in state:
            export = lambda: self._exporter.tensors(state["params"])  # noqa: E731
        meta = {**self._meta, **(meta or {})}
        self._finalize(block=True)
        self._replace_existing(step)
        tree = {k: v for k, v in state.items() if group_of(k) in self.contents}
        saved = [c for c in self.contents if c != "hf_model" or export is not None]
        items = {"meta": ocp.args.JsonSave({**meta, "step": step, "save_contents": saved, "state_keys": sorted(tree),
                                            "files_manifest": MANIFEST, "jaxsft_version": __version__,
                                            "process_count": jax.process_count()})}
        if tree:
            items["state"] = ocp.args.StandardSave(tree)
        if "extra" in self.contents and data_state is not None:
            for i, s in enumerate(_gather_json(data_state)):
                items[f"data_process_{i}"] = ocp.args.JsonSave(s)
        self._bytes_needed = self.checkpoint_bytes(state)
        exports = []
        with self._full_disk_is_one_line(step):
            # force: the trainer decides when to save; Orbax would refuse a step below one on disk.
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
            if "hf_model" in saved:
                # Written beside the step (Orbax renames its own directory on commit) and moved in after.
                if self._meta["lora_adapter"]:
                    tmp = self.root / f".{STEP_PREFIX}_{step}.{ADAPTER_DIR}.tmp"
                    exports.append((tmp, ADAPTER_DIR))
                    self._exporter.write_adapter(state["params"], tmp, base_model_name_or_path=self._base_model_dir)
                hf_tmp = self.root / f".{STEP_PREFIX}_{step}.huggingface.tmp"
                exports.append((hf_tmp, "huggingface"))
                hf.write_hf_directory(export(), hf_tmp, **self._export_args)
        self._pending = (step, exports)
        if not self._async:
            self._finalize(block=True)
        return self.step_dir(step)

    def checkpoint_bytes(self, state: dict) -> int:
        """About what one checkpoint of `state` takes on disk: the saved arrays at their dtypes,
        plus (hf_model) the parameters at the export dtype."""
        def size(tree, itemsize=None) -> int:
            leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and hasattr(x, "size")]
            return sum(int(x.size) * (itemsize or np.dtype(x.dtype).itemsize) for x in leaves)

        n = size([v for k, v in state.items() if group_of(k) in self.contents])
        if self._export_args is not None and "params" in state:
            n += size(state["params"], np.dtype(jax.numpy.dtype(self._export_args["dtype"])).itemsize)
        return n

    def warn_if_short_of_space(self, state: dict, say=print) -> None:
        """One line when the run directory's disk has less free space than one checkpoint needs."""
        need, free = self.checkpoint_bytes(state), shutil.disk_usage(self.root).free
        if self._primary and free < need:
            say(f"[jaxsft] warning: {self.root} has {_size(free)} free but one checkpoint needs about {_size(need)} "
                f"(written in full before older ones are deleted), so saving will fail; free some space or choose "
                f"another trainer.default_local_dir")

    @contextlib.contextmanager
    def _full_disk_is_one_line(self, step: int):
        try:
            yield
        except Exception as e:
            if not _disk_full(e):
                raise
            self._pending = None
            try:
                self._manager.wait_until_finished()  # a background write may still be going
            except Exception:  # noqa: BLE001 - it fails the same way; its files are discarded next
                pass
            if self._primary:
                self._discard(step)
            tracked = read_tracker(self.root)
            kept = (f"{STEP_PREFIX}_{tracked} is intact and the run resumes from it" if tracked is not None else
                    "nothing was saved before")
            raise CheckpointError(
                f"no space left on the disk of {self.root} while saving {STEP_PREFIX}_{step}: "
                f"{_size(shutil.disk_usage(self.root).free)} free, one checkpoint needs about "
                f"{_size(self._bytes_needed)}; free some space (or lower trainer.max_ckpt_to_keep) and run again "
                f"({kept})") from None

    def _discard(self, step: int) -> None:
        """Delete what an unfinished save of `step` left: nothing half-written may look complete."""
        doomed = [self.step_dir(step), self.root / f".{STEP_PREFIX}_{step}.huggingface.tmp",
                  self.root / f".{STEP_PREFIX}_{step}.{ADAPTER_DIR}.tmp", *self.root.glob(f"{STEP_PREFIX}_{step}.orbax-checkpoint-tmp*")]
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)
        for tmp in (self.root / f"{TRACKER}.tmp", self.step_dir(step) / f"{MANIFEST}.tmp"):
            tmp.unlink(missing_ok=True)

    def poll(self) -> bool:
        """Finalise a save whose background write has finished, without blocking; True when
        nothing is left pending. Calling it every step keeps the tracker close behind the disk."""
        return self._finalize(block=False)

    def wait(self) -> None:
        """Block until the last save is complete and recorded in the tracker."""
        self._finalize(block=True)

    def close(self) -> None:
        self.wait()
        self._manager.close()

    def restore(self, step_dir: str | os.PathLike, abstract_state: dict):
        """Restore into the shardings of `abstract_state` (jax.ShapeDtypeStruct leaves with the new
        NamedSharding, so another mesh or device count works); returns (state, data_state, meta).

        `state` holds the keys of `abstract_state` that `trainer.checkpoint.load_contents` selects
        and the checkpoint has (merge it into a fresh state); `data_state` is this process's
        iterator state or None.
        """
        step_dir = Path(step_dir)
        problems = step_problems(step_dir)
        if problems:
            raise CheckpointError(f"cannot resume from {step_dir}: it is an incomplete checkpoint ({describe(problems)})")
        meta = read_meta(step_dir)
        saved_tree = _state_tree_metadata(step_dir)
        wanted = [k for k in abstract_state if group_of(k) in self.load_contents]
        missing = [k for k in wanted if k not in saved_tree]
        if missing:  # complete, so these were never saved (trainer.checkpoint.save_contents)
            log.warning("%s was saved without %s (save_contents: %s); those start fresh", step_dir,
                        ", ".join(missing), ", ".join(meta.get("save_contents", ())))
        target = {k: abstract_state[k] for k in wanted if k in saved_tree}
        _check_same_mode(step_dir, meta, self._meta)
        _check_same_shapes(step_dir, target, saved_tree, meta)
        state = _restore_state(step_dir, target, ocp.checkpoint_utils.construct_restore_args(target)) if target else {}
        data_state = self._restore_data_state(step_dir) if "extra" in self.load_contents else None
        return state, data_state, meta

    def resume(self, ckpt, state: dict, shardings: dict, loader, say=print) -> dict:
        """The train state to start from: `state` (fresh) unless the checkpoint settings `ckpt`
        name a step to resume (`resolve_resume`); then that step's contents restored into
        `shardings`, and the data loader set to its position. Warns first when the disk is short
        of one checkpoint."""
        self.warn_if_short_of_space(state, say=say)
        step_dir = resolve_resume(ckpt, warn=lambda message: say(f"[jaxsft] warning: {message}"))
        if step_dir is None:
            return state
        state, data_state = self.restore_state(step_dir, state, shardings)
        if data_state is not None:
            loader.set_state(data_state, accept_changed_data=ckpt.resume_accept_changed_data, say=say)
        say(f"[jaxsft] resumed from {step_dir} at step {int(state['step'])}")
        return state

    def restore_state(self, step_dir: str | os.PathLike, state: dict, shardings: dict) -> tuple[dict, dict | None]:
        """`state` (a fresh train state) with what `step_dir` holds restored into `shardings`;
        returns (state, this process's data-iterator state or None)."""
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
        restored, data_state, meta = self.restore(step_dir, abstract)
        state = {**state, **restored}  # entries not saved / not in load_contents start fresh
        if "step" not in restored:
            state["step"] = jax.device_put(np.int32(meta["step"]), shardings["step"])
        return state, data_state

    def _restore_data_state(self, step_dir: Path):
        own = step_dir / f"data_process_{self.process_index}"
        if own.is_dir():
            return read_json_item(own)
        first = step_dir / "data_process_0"
        if first.is_dir():  # saved with fewer processes; iterator states are process-independent
            log.warning("%s has no %s; using data_process_0", step_dir, own.name)
            return read_json_item(first)
        log.warning("%s was saved without a data-iterator state; the data order restarts", step_dir)
        return None

    # ---- completion, tracker, retention -------------------------------------------------------

    def _finalize(self, *, block: bool) -> bool:
        if self._pending is None:
            return True
        if not block and self._manager.is_saving_in_progress():
            return False
        step, exports = self._pending
        with self._full_disk_is_one_line(step):
            self._manager.wait_until_finished()  # also raises a failed background write
            self._pending = None
            if self._primary:
                for tmp, name in exports:
                    os.replace(tmp, self.step_dir(step) / name)
                write_manifest(self.step_dir(step))  # the step is complete from here on
                self._write_tracker(step)
        if self._primary:
            self._apply_retention(step)
        return True

    def _write_tracker(self, step: int) -> None:
        _write_atomically(self.root / TRACKER, str(step))

    def _apply_retention(self, newest: int) -> None:
        """Keep `max_ckpt_to_keep` step directories in all, counting those of earlier launches
        (verl counts only its own, #7395); `newest`, just completed, always stays. Steps beyond it
        (an abandoned run's) go first, then the oldest."""
        if self.keep <= 0:
            return
        dirs = step_dirs(self.root)
        others = sorted((s for s in dirs if s != newest), key=lambda s: (s > newest, -s))
        doomed = others[self.keep - 1:]
        for s in doomed:
            shutil.rmtree(dirs[s])
        if doomed:
            log.info("retention (trainer.max_ckpt_to_keep=%d): deleted %s", self.keep,
                     ", ".join(dirs[s].name for s in doomed))
            self._manager.reload()

    def _replace_existing(self, step: int) -> None:
        """A directory for `step` can only be left over (an incomplete save, or a run resumed from
        an earlier step): Orbax would refuse to write over it, so it goes."""
        if not self.step_dir(step).exists():
            return
        distributed.barrier("jaxsft-checkpoint-replace-seen")
        if self._primary:
            log.warning("replacing %s left by an earlier run", self.step_dir(step))
            shutil.rmtree(self.step_dir(step))
        distributed.barrier("jaxsft-checkpoint-replace-done")
        self._manager.reload()


class PreemptionFlag:
    """Set by SIGTERM or SIGINT so the train loop can finish its step, save and exit 0.

    With several processes JAX's preemption service owns SIGTERM and agrees on a step at which
    every process stops; `check(step)` asks it (call it once per step on every process).
    A second SIGINT interrupts at once. `restore()` puts the previous handlers back.
    """

    def __init__(self):
        self._set = False
        self._multi = jax.process_count() > 1
        self._previous = {} if self._multi else {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum, frame) -> None:
        if self._set and signum == signal.SIGINT:
            raise KeyboardInterrupt("interrupted again: not saving")
        self._set = True

    def check(self, step: int) -> bool:
        if self._multi and not self._set:
            from jax.experimental import multihost_utils

            self._set = multihost_utils.reached_preemption_sync_point(step)
        return self._set

    def is_set(self) -> bool:
        return self._set

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
