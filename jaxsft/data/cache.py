"""The tokenised-data cache (`data.cache`, `data.cache_dir`): a build's arrays on disk, memory-mapped
by later launches instead of tokenising again.

An entry is a directory named by the split and a sha256 key over everything that changes the
result: each file's path (as given: errors name it), size and **full content hash** (sha256, no
mtime: a copied file, or each host's own copy, keeps its entry, and a file rewritten in place with
its old size and mtime does not); the tokenizer (its whole `tokenizer.json` serialisation, the
chat template, eos token and class); every data setting that tokenisation reads (all fields of
`DataSettings` but the few listed in `NOT_TOKENISATION`), the split's row limit; the source of
the tokenising modules and the versions of transformers, tokenizers, jinja2 and pyarrow. Hashing
the files costs a read of each (about 0.5-1 GB/s), small next to tokenising them.

An entry holds raw little-endian arrays (`*.bin`) and `meta.json` with their lengths and sha256,
the build's statistics, the warnings it printed and the data set's fingerprint. Reading one checks
every array against its sha256 (so the stored fingerprint holds for what is read, with no second
pass) and memory-maps the two token arrays; an entry that fails any check is moved aside and
rebuilt, never used. Entries are written to a temporary directory and renamed into place (atomic
on POSIX), so nobody reads a half-written entry; an exclusive `flock` on `.NAME.lock` makes a second process building the same entry wait for the
first and read its result.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numpy as np

from jaxsft import __version__, progress
from jaxsft.data.samples import Origins, TokenizedDataset

FORMAT = 1
# What decides an entry's content.
CODE = ("formats.py", "errors.py", "source.py", "tokenize.py", "whole_chat.py", "workers.py", "dataset.py", "samples.py", "cache.py")
# DataSettings fields that do not change the tokenised rows of a split (batching, mixing, where
# the cache is); every other field is part of the key, so a new data key is keyed by default.
NOT_TOKENISATION = ("train_files", "val_files", "train_max_samples", "val_max_samples", "train_batch_size",
                    "micro_batch_size_per_gpu", "packing", "train_weights", "cache_dir", "tokenize_workers")
TOKENS = {"input_ids": "<i4", "loss_mask": "i1"}  # memory-mapped
SMALL = {"offsets": "<i8", "origin_file": "<i4", "origin_row": "<i8", "raw_lengths": "<i8", "raw_loss_tokens": "<i8",
         "loss_tokens": "<i8"}  # one entry per row: read into memory


@dataclasses.dataclass(frozen=True)
class CacheKey:
    name: str  # the entry's directory name
    digest: str
    inputs: dict


class Corrupt(Exception):
    pass


def file_digest(path, advance=None) -> str:
    """sha256 of a file; `advance(bytes)` is told as it is read (a progress bar)."""
    with open(path, "rb") as f:
        if advance is None:
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256()
        while chunk := f.read(64 << 20):
            h.update(chunk)
            advance(len(chunk))
        return h.hexdigest()


def tokenizer_digest(tokenizer) -> str | None:
    """sha256 of what decides how the tokenizer renders and splits text; None if unknown."""
    parts = {"class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
             "chat_template": getattr(tokenizer, "chat_template", None), "eos_token": str(tokenizer.eos_token),
             "split_special_tokens": getattr(tokenizer, "split_special_tokens", None)}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        parts["tokenizer.json"] = hashlib.sha256(backend.to_str().encode()).hexdigest()
    else:  # a slow (Python) tokenizer: its files
        folder = Path(getattr(tokenizer, "name_or_path", "") or "")
        if not folder.is_dir():
            return None
        parts["files"] = {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.is_file()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _code_digest() -> str:
    h = hashlib.sha256(__version__.encode())
    for name in CODE:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("transformers", "tokenizers", "jinja2", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


class DataCache:
    def __init__(self, directory, say=print, show: bool = True):
        self.root, self.say, self.show = Path(directory), say, show  # show: progress and phase lines
        self.writable = True

    # ---- key ------------------------------------------------------------------------------------

    def key(self, paths: list[str], data, tokenizer, split: str) -> CacheKey | None:
        """The entry of this build, or None when an input cannot be fingerprinted (a missing or
        unreadable file: the build then says what is wrong with it)."""
        files = []
        for p in paths:
            try:
                if not os.path.isfile(p):
                    return None
                files.append({"path": p, "size": os.path.getsize(p), "sha256": file_digest(p)})
            except OSError:
                return None
        tok = tokenizer_digest(tokenizer)
        if tok is None:
            self.say("[jaxsft] data cache: the tokenizer has no tokenizer.json and no directory to fingerprint; "
                     "tokenising without the cache")
            return None
        settings = {f.name: getattr(data, f.name) for f in dataclasses.fields(data) if f.name not in NOT_TOKENISATION}
        inputs = {"format": FORMAT, "code": _code_digest(), "versions": _versions(), "split": split, "files": files,
                  "tokenizer": tok, "data": settings, "max_samples": data.max_samples(split)}
        digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=repr).encode()).hexdigest()
        return CacheKey(f"{split}-{digest[:24]}", digest, inputs)

    def entry(self, key: CacheKey) -> Path:
        return self.root / key.name

    # ---- one builder at a time ------------------------------------------------------------------

    @contextmanager
    def lock(self, key: CacheKey):
        """Held while an entry is looked up and, if missing, built and written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / f".{key.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            self.writable = False
            self.say(f"[jaxsft] data cache {self.root}: cannot be written ({e.strerror or e}); an entry already "
                     f"there is still read, a new one is not written")
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.say(f"[jaxsft] data cache {self.entry(key)}: another process is building it; waiting for it")
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    # ---- read -----------------------------------------------------------------------------------

    def load(self, key: CacheKey, paths: list[str], t0: float):
        """The data set of `key` from its entry, checked; None if there is none or it is damaged
        (then it is moved aside and removed)."""
        entry = self.entry(key)
        if not entry.exists():
            return None
        try:
            meta = json.loads((entry / "meta.json").read_text())
            if meta.get("format") != FORMAT or meta.get("key") != key.digest:
                raise Corrupt("it was written for other inputs")
            size = sum((entry / f"{name}.bin").stat().st_size for name in {**TOKENS, **SMALL})
            with progress.phase(f"checking the data cache {entry.name}", total=size, unit="B", unit_scale=True,
                                show=self.show) as advance:
                a = {name: self._array(entry, name, dtype, meta, mapped=name in TOKENS, advance=advance)
                     for name, dtype in {**TOKENS, **SMALL}.items()}
            n = meta["stats"]["rows"]
            if not (len(a["offsets"]) == n + 1 and all(len(a[k]) == n for k in SMALL if k != "offsets")
                    and int(a["offsets"][-1]) == len(a["input_ids"]) == len(a["loss_mask"])):
                raise Corrupt("its arrays disagree in length")
            fingerprint = str(meta["fingerprint"])
        except (OSError, ValueError, KeyError, TypeError, Corrupt) as e:
            reason = str(e) if isinstance(e, Corrupt) else f"{type(e).__name__}: {e}"
            self.say(f"[jaxsft] data cache {entry}: not used ({reason}); tokenising again")
            self._discard(entry)
            return None
        stats = {**meta["stats"], "files": list(paths), "raw_lengths": a["raw_lengths"],
                 "raw_loss_tokens": a["raw_loss_tokens"],
                 "cache": {"path": str(entry), "hit": True, "seconds": time.perf_counter() - t0}}
        dataset = TokenizedDataset(a["input_ids"], a["loss_mask"], a["offsets"],
                                   Origins(paths, a["origin_file"], a["origin_row"]), stats, loss_tokens=a["loss_tokens"],
                                   max_id=meta["max_id"], fingerprint=fingerprint)
        # (the fingerprint was written from these arrays, whose sha256 were checked: no second pass)
        return dataset

    @staticmethod
    def _array(entry: Path, name: str, dtype: str, meta: dict, mapped: bool, advance=None) -> np.ndarray:
        info, path = meta["arrays"][name], entry / f"{name}.bin"
        length, size = int(info["length"]), path.stat().st_size
        if size != length * np.dtype(dtype).itemsize:
            raise Corrupt(f"{name}.bin has {size} bytes, {length * np.dtype(dtype).itemsize} were written")
        if file_digest(path, advance) != info["sha256"]:
            raise Corrupt(f"{name}.bin does not match its sha256")
        if not length:
            return np.zeros(0, dtype)
        if mapped:
            return np.asarray(np.memmap(path, dtype=dtype, mode="r", shape=(length,)))
        return np.fromfile(path, dtype=dtype)

    # ---- write ----------------------------------------------------------------------------------

    def store(self, key: CacheKey, dataset):
        """Write `dataset` as the entry of `key`; returns it read back (memory-mapped), or the
        in-memory data set if the entry cannot be written (said once)."""
        if not self.writable:
            return dataset
        entry = self.entry(key)
        tmp = self.root / f".tmp-{key.name}-{socket.gethostname()}-{os.getpid()}"
        self._clean_leftovers(key)
        o = dataset.origins
        arrays = {"input_ids": dataset.input_ids, "loss_mask": dataset.loss_mask, "offsets": dataset.offsets,
                  "origin_file": o.file_index, "origin_row": o.rows, "raw_lengths": dataset.stats["raw_lengths"],
                  "raw_loss_tokens": dataset.stats["raw_loss_tokens"], "loss_tokens": dataset.loss_tokens}
        s = dataset.stats
        meta = {"format": FORMAT, "key": key.digest, "inputs": key.inputs, "max_id": dataset.max_id(),
                "fingerprint": dataset.fingerprint,
                "stats": {k: s[k] for k in ("rows", "truncated", "seconds", "split", "truncation", "max_length",
                                            "file_rows", "warnings", "processes", "mask_mode")}, "arrays": {}}
        arrays = {name: np.asarray(arrays[name]).astype(dtype, copy=False) for name, dtype in {**TOKENS, **SMALL}.items()}
        t0 = time.perf_counter()
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            with progress.phase(f"writing the data cache {entry.name}", total=sum(a.nbytes for a in arrays.values()),
                                unit="B", unit_scale=True, show=self.show) as advance:
                for name, a in arrays.items():
                    meta["arrays"][name] = _write_array(tmp / f"{name}.bin", a, advance)
            _write_file(tmp / "meta.json", json.dumps(meta, indent=1, default=repr).encode())
            _fsync_dir(tmp)
            try:
                os.rename(tmp, entry)
            except OSError:  # written meanwhile by a process that holds no lock on it (another host)
                shutil.rmtree(tmp, ignore_errors=True)
            _fsync_dir(self.root)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            self.say(f"[jaxsft] data cache {entry}: cannot be written ({e.strerror or e}); the next launch tokenises again")
            return dataset
        loaded = self.load(key, s["files"], time.perf_counter())
        if loaded is None:
            return dataset
        loaded.stats.update(seconds=s["seconds"], cache={"path": str(entry), "hit": False,
                                                         "seconds": time.perf_counter() - t0})
        return loaded

    def _discard(self, entry: Path) -> None:
        trash = entry.with_name(f".trash-{entry.name}-{os.getpid()}")
        try:
            os.rename(entry, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def _clean_leftovers(self, key: CacheKey) -> None:
        """Temporary directories of builds of this entry killed on this host (their pid is gone)."""
        host = socket.gethostname()
        for p in self.root.glob(f".tmp-{key.name}-{host}-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)


def _write_array(path: Path, a: np.ndarray, advance=None) -> dict:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        step = max(1, (64 << 20) // max(a.itemsize, 1))
        for i in range(0, len(a), step):
            chunk = memoryview(np.ascontiguousarray(a[i:i + step])).cast("B")
            h.update(chunk)
            f.write(chunk)
            if advance is not None:
                advance(len(chunk))
        f.flush()
        os.fsync(f.fileno())
    return {"length": len(a), "sha256": h.hexdigest()}


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
