"""Checkpoints: Orbax step directories, the tracker file, retention, resume and preemption.

A run root (`trainer.default_local_dir`) holds

    global_step_N/                 one Orbax checkpoint, committed atomically (written as
                                   global_step_N.orbax-checkpoint-tmp, renamed when complete)
        state/                     pytree: params (model), opt_state (optimizer), step and any
                                   other train-state keys (extra)
        data_process_{i}/          JSON data-iterator state of process i (extra)
        meta/                      JSON: config, epoch, base_model, step, save_contents, versions
        huggingface/               transformers directory (hf_model)
    latest_checkpointed_iteration.txt
                                   N of the newest complete step, written last (tmp + rename)

An exact resume needs model, optimizer and extra: the lr is a function of `step`, and the data
order a function of (seed, epoch) and the iterator state; SFT draws no other random numbers.

Saving is asynchronous: `save` returns once the arrays are copied to the host and Orbax writes in
the background. The step counts as complete only when Orbax has committed it and its HF export is
in place; then the tracker is written and old steps are deleted. That happens at the next `save`,
`poll` (cheap; call it every step), `wait` or `close`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxsft import __version__, distributed, hf
from jaxsft.errors import UserError

STEP_PREFIX = "global_step"
TRACKER = "latest_checkpointed_iteration.txt"
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


def is_complete(step_dir: str | os.PathLike) -> bool:
    """Committed by Orbax (step metadata and commit marker present, meta readable) and, when the
    step was to carry an HF export, with its `huggingface/` directory in place."""
    p = Path(step_dir)
    if not ((p / "_CHECKPOINT_METADATA").is_file() and (p / "commit_success.txt").is_file()):
        return False
    try:
        meta = read_meta(p)
    except Exception:  # noqa: BLE001 - any unreadable meta means the step cannot be used
        return False
    return "hf_model" not in meta.get("save_contents", ()) or (p / "huggingface" / "config.json").is_file()


def read_tracker(root: str | os.PathLike) -> int | None:
    path = Path(root) / TRACKER
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        log.warning("ignoring %s: %r is not a step number", path, text)
        return None
    return int(text)


def latest_complete(root: str | os.PathLike) -> Path | None:
    """The step directory to resume from: the tracker's step, or the newest complete step before
    it when that one is missing or incomplete. Steps newer than the tracker are unfinished saves
    or leftovers of an abandoned run and are ignored. Without a tracker (killed before the first
    save was finalised) the newest complete step is used."""
    dirs = step_dirs(root)
    tracked = read_tracker(root)
    candidates = sorted(dirs, reverse=True)
    if tracked is not None:
        newer = [dirs[s].name for s in sorted(dirs) if s > tracked]
        if newer:
            log.warning("ignoring %s: newer than %s (step %d), so not known to be complete",
                        ", ".join(newer), TRACKER, tracked)
        if tracked not in dirs:
            log.warning("%s names step %d but %s is missing", TRACKER, tracked, f"{STEP_PREFIX}_{tracked}")
        candidates = [s for s in candidates if s <= tracked]
    for s in candidates:
        if is_complete(dirs[s]):
            return dirs[s]
        log.warning("skipping incomplete checkpoint %s (killed while saving?); trying the previous one", dirs[s])
    return None


def resolve_resume(ckpt) -> Path | None:
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
        if not is_complete(p):
            raise CheckpointError(f"trainer.resume_from_path={path!r} is an incomplete checkpoint (its save never "
                                  f"finished); choose an earlier {STEP_PREFIX}_N")
        return p
    return latest_complete(Path(ckpt.default_local_dir).absolute())


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


def _restore_state(step_dir: Path, target: dict, restore_args) -> dict:
    args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    return ocp.PyTreeCheckpointer().restore(step_dir / "state", args=args)


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
        `max_length`. `meta` goes into every step's meta; `export(params)` gives the HF tensors
        of a state's parameters (`jaxsft.hf.export_tensors`)."""
        self._meta, self._export_params = dict(meta or {}), export
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
            self._export_args = dict(
                base=hf.BaseModelFiles.read(Path(base_model_dir), trust_remote_code=trust_remote_code)
                if self._primary else None,
                dtype=ckpt.hf_dtype, max_shard_size=ckpt.max_shard_size, min_max_position_embeddings=max_length)
        self._pending: tuple[int, Path | None] | None = None  # (step, its HF export) awaiting commit
        if self._primary:
            self.root.mkdir(parents=True, exist_ok=True)
            for leftover in self.root.glob(f".{STEP_PREFIX}_*.huggingface.tmp"):
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
        invalidates. Every process calls this. Returns the step directory.
        """
        if export is None and self._export_params is not None and "params" in state:
            export = lambda: self._export_params(state["params"])  # noqa: E731
        meta = {**self._meta, **(meta or {})}
        self._finalize(block=True)
        self._replace_existing(step)
        tree = {k: v for k, v in state.items() if group_of(k) in self.contents}
        saved = [c for c in self.contents if c != "hf_model" or export is not None]
        items = {"meta": ocp.args.JsonSave({**(meta or {}), "step": step, "save_contents": saved,
                                            "jaxsft_version": __version__, "process_count": jax.process_count()})}
        if tree:
            items["state"] = ocp.args.StandardSave(tree)
        if "extra" in self.contents and data_state is not None:
            for i, s in enumerate(_gather_json(data_state)):
                items[f"data_process_{i}"] = ocp.args.JsonSave(s)
        # force: the trainer decides when to save; Orbax would refuse a step below one on disk.
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        hf_tmp = None
        if "hf_model" in saved:
            # Written beside the step (Orbax renames its own directory on commit) and moved in after.
            hf_tmp = self.root / f".{STEP_PREFIX}_{step}.huggingface.tmp"
            hf.write_hf_directory(export(), hf_tmp, **self._export_args)
        self._pending = (step, hf_tmp)
        if not self._async:
            self._finalize(block=True)
        return self.step_dir(step)

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
        meta = read_meta(step_dir)
        saved_tree = _state_tree_metadata(step_dir)
        wanted = [k for k in abstract_state if group_of(k) in self.load_contents]
        missing = [k for k in wanted if k not in saved_tree]
        if missing:
            log.warning("%s holds no %s (saved: %s); those start fresh", step_dir, ", ".join(missing),
                        ", ".join(meta.get("save_contents", ())))
        target = {k: abstract_state[k] for k in wanted if k in saved_tree}
        _check_same_shapes(step_dir, target, saved_tree, meta)
        state = _restore_state(step_dir, target, ocp.checkpoint_utils.construct_restore_args(target)) if target else {}
        data_state = self._restore_data_state(step_dir) if "extra" in self.load_contents else None
        return state, data_state, meta

    def resume(self, ckpt, state: dict, shardings: dict, loader, say=print) -> dict:
        """The train state to start from: `state` (fresh) unless the checkpoint settings `ckpt`
        name a step to resume (`resolve_resume`); then that step's contents restored into
        `shardings`, and the data loader set to its position."""
        step_dir = resolve_resume(ckpt)
        if step_dir is None:
            return state
        state, data_state = self.restore_state(step_dir, state, shardings)
        if data_state is not None:
            loader.set_state(data_state)
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
        log.warning("%s holds no data-iterator state; the data order restarts", step_dir)
        return None

    # ---- completion, tracker, retention -------------------------------------------------------

    def _finalize(self, *, block: bool) -> bool:
        if self._pending is None:
            return True
        if not block and self._manager.is_saving_in_progress():
            return False
        self._manager.wait_until_finished()  # also raises a failed background write
        step, hf_tmp = self._pending
        self._pending = None
        if self._primary:
            if hf_tmp is not None:
                os.replace(hf_tmp, self.step_dir(step) / "huggingface")
            self._write_tracker(step)
            self._apply_retention(step)
        return True

    def _write_tracker(self, step: int) -> None:
        tmp = self.root / f"{TRACKER}.tmp"
        with open(tmp, "w") as f:
            f.write(str(step))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / TRACKER)

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
