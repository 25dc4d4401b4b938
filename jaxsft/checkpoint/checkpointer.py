"""The Checkpointer: saves a run's train states as step directories (async), finalises them
(listing, tracker, retention) and restores them into another mesh.

An exact resume needs model, optimizer and extra: the lr is a function of `step`, and the data
order a function of (seed, epoch) and the iterator state; SFT draws no other random numbers.

Saving is asynchronous: `save` returns once the arrays are copied to the host and Orbax writes in
the background. The step counts as complete only when Orbax has committed it and its HF export is
in place; then the tracker is written and old steps are deleted. That happens at the next `save`,
`poll` (cheap; call it every step), `wait` or `close`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxsft import __version__, distributed, hf
from jaxsft.checkpoint.compat import check_same_mode, check_same_shapes
from jaxsft.checkpoint.integrity import describe, resolve_resume, step_problems, write_manifest
from jaxsft.checkpoint.layout import (
    ADAPTER_DIR, MANIFEST, STEP_PREFIX, TRACKER, CheckpointError, group_of, read_json_item, read_meta, read_tracker,
    state_tree_metadata, step_dirs, write_tracker)
from jaxsft.checkpoint.restore import restore_state_tree
from jaxsft.checkpoint.storage_errors import disk_full, quiet_storage_noise, size_text

_DELETING = ".deleting."  # a step directory retention is deleting: .deleting.global_step_N.tmp
log = logging.getLogger(__name__)


class Checkpointer:
    """Saves and restores train states under `trainer.default_local_dir` (see the module doc)."""

    def __init__(self, ckpt, *, base_model_dir, max_length: int, process_index: int | None = None,
                 meta: dict | None = None, export=None, trust_remote_code: bool = False, mode_defaults=None):
        """`ckpt`: the checkpoint settings (`jaxsft.config.settings.CheckpointSettings`); the HF
        export takes config and tokenizer from `base_model_dir` and raises its context to
        `max_length`. `meta` goes into every step's meta; `export` (`jaxsft.hf.Export`) says what
        the HF export of a state's parameters is (merged LoRA, the PEFT adapter, added tokens).
        `mode_defaults`: the defaults of the training-mode keys, for metas saved before one of them
        existed (`compat.check_same_mode`)."""
        self._exporter = export
        self._mode_defaults = dict(mode_defaults or {})
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
        self._older_incomplete: dict[int, list[str]] = {}  # steps before the pending one that are incomplete
        self._bytes_needed = 0  # the size estimate of the last save, for a full disk's message
        quiet_storage_noise()
        if self._primary:
            self.root.mkdir(parents=True, exist_ok=True)
            for leftover in [*self.root.glob(f".{STEP_PREFIX}_*.huggingface.tmp"),
                             *self.root.glob(f".{STEP_PREFIX}_*.{ADAPTER_DIR}.tmp"),
                             *self.root.glob(f"{_DELETING}{STEP_PREFIX}_*.tmp")]:
                shutil.rmtree(leftover)  # an export whose save never completed, a deletion a kill cut short
        distributed.barrier("jaxsft-checkpoint-init")
        options = ocp.CheckpointManagerOptions(
            step_name_format=ocp.path.step.standard_name_format(step_prefix=STEP_PREFIX),
            enable_async_checkpointing=self._async, cleanup_tmp_directories=True, create=True)
        self._manager = ocp.CheckpointManager(self.root, options=options)

    @classmethod
    def for_run(cls, settings, model_dir: Path, export, mode_defaults: dict) -> "Checkpointer":
        """The run's checkpointer: every step's meta records the configuration and the base model;
        `mode_defaults`: the training-mode keys' defaults as a meta records them (`model.KEY` for
        each of MODE_KEYS), for metas older than a key — the configuration layer knows them."""
        return cls(settings.checkpoint, base_model_dir=model_dir, max_length=settings.data.max_length,
                   meta={"config": settings.config, "base_model": str(Path(model_dir).resolve())}, export=export,
                   trust_remote_code=settings.model.trust_remote_code,
                   mode_defaults=mode_defaults)

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
        # Retention (when this save is finalised) deletes these. Checked here, where every process is
        # at the same point: reading a step's meta is an Orbax restore, a collective in a multi-process
        # job, while finalising happens whenever each process sees its background write done.
        self._older_incomplete = {s: problems for s, p in step_dirs(self.root).items()
                                  if s < step and (problems := step_problems(p))}
        tree = {k: v for k, v in state.items() if group_of(k) in self.contents}
        saved = [c for c in self.contents if c != "hf_model" or export is not None]
        items = {"meta": ocp.args.JsonSave({**meta, "step": step, "save_contents": saved, "state_keys": sorted(tree),
                                            "files_manifest": MANIFEST, "jaxsft_version": __version__,
                                            "process_count": jax.process_count()})}
        if tree:
            items["state"] = ocp.args.StandardSave(tree)
        if "extra" in self.contents and data_state is not None:
            for i, s in enumerate(distributed.gather_json(data_state)):
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
            say(f"[jaxsft] warning: {self.root} has {size_text(free)} free but one checkpoint needs about {size_text(need)} "
                f"(written in full before older ones are deleted), so saving will fail; free some space or choose "
                f"another trainer.default_local_dir")

    @contextlib.contextmanager
    def _full_disk_is_one_line(self, step: int):
        try:
            yield
        except Exception as e:
            if not disk_full(e):
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
                f"{size_text(shutil.disk_usage(self.root).free)} free, one checkpoint needs about "
                f"{size_text(self._bytes_needed)}; free some space (or lower trainer.max_ckpt_to_keep) and run again "
                f"({kept})") from None

    def _discard(self, step: int) -> None:
        """Delete what an unfinished save of `step` left: nothing half-written may look complete."""
        def leftovers():
            return [p for p in (self.step_dir(step), self.root / f".{STEP_PREFIX}_{step}.huggingface.tmp",
                                self.root / f".{STEP_PREFIX}_{step}.{ADAPTER_DIR}.tmp",
                                *self.root.glob(f"{STEP_PREFIX}_{step}.orbax-checkpoint-tmp*")) if p.exists()]

        # A failed synchronous save can leave tensorstore writes in flight that recreate Orbax's
        # temporary directory after it is deleted: delete until it has stayed gone for 0.2 s (≤ 10 s).
        deadline, absent = time.monotonic() + 10, 0
        while absent < 2 and time.monotonic() < deadline:
            doomed = leftovers()
            for path in doomed:
                shutil.rmtree(path, ignore_errors=True)
            absent = 0 if doomed else absent + 1
            time.sleep(0.1)
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
        saved_tree = state_tree_metadata(step_dir)
        wanted = [k for k in abstract_state if group_of(k) in self.load_contents]
        missing = [k for k in wanted if k not in saved_tree]
        if missing:  # complete, so these were never saved (trainer.checkpoint.save_contents)
            log.warning("%s was saved without %s (save_contents: %s); those start fresh", step_dir,
                        ", ".join(missing), ", ".join(meta.get("save_contents", ())))
        target = {k: abstract_state[k] for k in wanted if k in saved_tree}
        check_same_mode(step_dir, meta, self._meta, self._mode_defaults)
        check_same_shapes(step_dir, target, saved_tree, meta)
        state = restore_state_tree(step_dir, target, ocp.checkpoint_utils.construct_restore_args(target)) if target else {}
        data_state = self._restore_data_state(step_dir) if "extra" in self.load_contents else None
        return state, data_state, meta

    def resume(self, ckpt, state: dict, shardings: dict, *, restore_data, say=print) -> dict:
        """The train state to start from: `state` (fresh) unless the checkpoint settings `ckpt`
        name a step to resume (`resolve_resume`); then that step's contents restored into
        `shardings`, and `restore_data(saved)` called with its data-iterator state (when it has
        one) for the caller to reposition its data loader. Warns first when the disk is short of
        one checkpoint.

        The caller repositions the loader (the checkpoint knows no loader), through a callback
        rather than after the return so that "resumed from" is said only once the loader has
        accepted the position: a refused data state stays the run's last word."""
        self.warn_if_short_of_space(state, say=say)
        step_dir = resolve_resume(ckpt, warn=lambda message: say(f"[jaxsft] warning: {message}"))
        if step_dir is None:
            return state
        state, data_state = self.restore_state(step_dir, state, shardings)
        if data_state is not None:
            restore_data(data_state)
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
                write_tracker(self.root, step)
        if self._primary:
            self._apply_retention(step)
        return True

    def _apply_retention(self, newest: int) -> None:
        """Keep `max_ckpt_to_keep` complete step directories in all, counting those of earlier
        launches (verl counts only its own, #7395); `newest`, just completed, always stays. Steps
        beyond it (an abandoned run's) go, and incomplete ones before it (a damaged step the run
        resumed past: never resumable, it must not take a kept step's place); then the oldest."""
        if self.keep <= 0:
            return
        dirs = step_dirs(self.root)
        broken = {s: problems for s, problems in self._older_incomplete.items() if s in dirs}  # see `save`
        kept = sorted((s for s in dirs if s < newest and s not in broken), reverse=True)
        doomed = sorted(s for s in dirs if s > newest) + sorted(broken) + kept[self.keep - 1:]
        for s in doomed:
            # renamed first (atomic), so a kill mid-delete leaves a temporary, not a half step directory
            gone = self.root / f"{_DELETING}{dirs[s].name}.tmp"
            shutil.rmtree(gone, ignore_errors=True)
            os.replace(dirs[s], gone)
            shutil.rmtree(gone)
        if doomed:
            log.info("retention (trainer.max_ckpt_to_keep=%d): deleted %s", self.keep,
                     ", ".join(dirs[s].name + (f" (incomplete: {describe(broken[s])})" if s in broken else "")
                               for s in doomed))
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
