"""The tokenised-data cache (issue 14): a later build reads exactly what the first one built (the
arrays, origins, statistics, summary and warnings), memory-mapped; whatever changes the tokens
(file contents, tokenizer, template kwargs, max_length, ...) makes a new entry; a damaged or
half-written entry is never used; two processes building one entry build it once."""

import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cfg import chat_data
from e2e import ROOT, env_for

from jaxsft import bundled
from jaxsft.data import DataWarning, TokenizedDataset, build_dataset, summary
from jaxsft.hf import load_tokenizer
from jaxsft.data import cache as data_cache

TRAIN = str(bundled.path("humaneval_chat", "train.parquet"))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(bundled.path("tokenizer"))


data_cfg = chat_data  # tests/cfg.py


def user(text):
    return {"role": "user", "content": text}


def assistant(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def warning_file(tmp_path, name="w.parquet"):
    """Rows that warn: two without an assistant turn, one with verl's old loss_mask=0 (then a
    share of zero-loss rows over 10 %, warned by the checks)."""
    chats = [[user(f"q{i}"), assistant(f"a{i}")] for i in range(8)]
    chats[2] = [user("no answer")]
    chats[5] = [user("only a question")]
    chats[6] = [user("q6"), assistant("a6", loss_mask=0)]
    path = tmp_path / name
    pq.write_table(pa.table({"messages": chats}), path)
    return str(path)


def build(paths, tok, cache_dir, **kw):
    """(data set, warning messages, summary line)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build_dataset(paths, kw.pop("data", None) or data_cfg(), tok, verbose=False, cache_dir=cache_dir, **kw)
    return ds, [str(w.message) for w in caught if issubclass(w.category, DataWarning)], summary(ds)


def same_data(a, b):
    for name in ("input_ids", "loss_mask", "offsets", "lengths", "loss_tokens"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert list(a.origins) == list(b.origins)
    assert a.fingerprint == b.fingerprint  # a cached set's is the one stored with the entry:
    assert TokenizedDataset.fingerprint.func(b) == b.fingerprint  # the same as computed from its arrays
    for k in ("rows", "truncated", "file_rows", "loss_tokens", "zero_loss_rows", "files", "split", "max_length"):
        assert a.stats[k] == b.stats[k], k
    assert np.array_equal(a.stats["raw_lengths"], b.stats["raw_lengths"])
    assert np.array_equal(a.stats["raw_loss_tokens"], b.stats["raw_loss_tokens"])


def test_a_cached_build_is_the_build_it_cached(tok, tmp_path):
    paths = [warning_file(tmp_path, "a.parquet"), warning_file(tmp_path, "b.parquet")]
    fresh, fresh_warnings, fresh_summary = build(paths, tok, None)
    assert len(fresh_warnings) == 5  # per file: no assistant turn, loss_mask=0; then the zero-loss share
    cache_dir = tmp_path / "cache"
    first, first_warnings, first_summary = build(paths, tok, cache_dir)
    second, second_warnings, second_summary = build(paths, tok, cache_dir)
    assert first.stats["cache"]["hit"] is False and second.stats["cache"]["hit"] is True
    for ds in (first, second):
        same_data(fresh, ds)
    assert first_warnings == second_warnings == fresh_warnings
    # The same summary, plus where the data came from.
    head = fresh_summary.split("; tokenised ")[0]
    assert first_summary.startswith(head) and second_summary.startswith(head)
    entry = first.stats["cache"]["path"]
    assert re.search(f"; written to the data cache {re.escape(entry)} in [0-9.]+ s$", first_summary)
    assert f"; read from the data cache {entry} in " in second_summary
    # Memory-mapped token arrays; one entry on disk, no temporary left.
    assert isinstance(second.input_ids.base, np.memmap) and isinstance(second.loss_mask.base, np.memmap)
    assert not second.input_ids.flags.writeable
    assert sorted(p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock")) == [os.path.basename(entry)]


def test_a_cache_hit_tokenises_nothing(tok, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    build(TRAIN, tok, cache_dir)
    from jaxsft.data import dataset

    def refuse(*a, **k):
        raise AssertionError("tokenised although the entry is there")

    monkeypatch.setattr(dataset, "tokenize_files", refuse)
    ds, _, _ = build(TRAIN, tok, cache_dir)
    assert ds.stats["cache"]["hit"] and len(ds) == 150


def test_what_changes_the_tokens_changes_the_entry(tok, tmp_path):
    cache = data_cache.DataCache(tmp_path / "cache")
    path = warning_file(tmp_path)
    base = cache.key([path], data_cfg(), tok, "train")
    other_template = load_tokenizer(bundled.path("tokenizer"))
    other_template.chat_template = tok.chat_template.replace("You are Qwen", "You are Q")
    other_vocab = load_tokenizer(bundled.path("tokenizer"))
    other_vocab.add_tokens(["<extra>"])
    changed = {
        "tokenizer chat template": cache.key([path], data_cfg(), other_template, "train"),
        "tokenizer vocabulary": cache.key([path], data_cfg(), other_vocab, "train"),
        "template kwargs": cache.key([path], data_cfg(apply_chat_template_kwargs={"enable_thinking": False}), tok, "train"),
        "max_length": cache.key([path], data_cfg(max_length=256), tok, "train"),
        "truncation": cache.key([path], data_cfg(truncation="left"), tok, "train"),
        "thinking default": cache.key([path], data_cfg(enable_thinking_default=True), tok, "train"),
        "mismatch kept": cache.key([path], data_cfg(ignore_input_ids_mismatch=True), tok, "train"),
        "mask mode": cache.key([path], data_cfg(**{"multiturn.mask_mode": "whole_chat"}), tok, "train"),
        "messages key": cache.key([path], data_cfg(messages_key="chat"), tok, "train"),
        "row limit": cache.key([path], data_cfg(train_max_samples=4), tok, "train"),
        "split": cache.key([path], data_cfg(), tok, "val"),
        "another file list": cache.key([path, path], data_cfg(), tok, "train"),
    }
    names = {base.name} | {k.name for k in changed.values()}
    assert len(names) == len(changed) + 1, changed
    # Settings that only batch or mix the samples keep the entry.
    for same in (data_cfg(train_batch_size=8), data_cfg(packing="first_fit"), data_cfg(val_max_samples=3),
                 data_cfg(tokenize_workers=1), data_cfg(micro_batch_size_per_gpu=1)):
        assert cache.key([path], same, tok, "train") == base


def test_a_rewritten_file_is_tokenised_again_even_with_its_old_size_and_mtime(tok, tmp_path):
    path = tmp_path / "d.parquet"
    chats = [[user(f"question {i}"), assistant(f"answer number {i}")] for i in range(4)]
    pq.write_table(pa.table({"messages": chats}), path, compression="none", use_dictionary=False)
    cache_dir = tmp_path / "cache"
    before, _, _ = build(str(path), tok, cache_dir)
    stat = os.stat(path)
    raw = path.read_bytes()
    assert raw.count(b"answer number 2") == 1
    path.write_bytes(raw.replace(b"answer number 2", b"answer NUMBER 2"))  # one value, in place
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    path = str(path)
    assert os.path.getsize(path) == stat.st_size and os.stat(path).st_mtime_ns == stat.st_mtime_ns
    after, _, _ = build(path, tok, cache_dir)
    assert after.stats["cache"]["hit"] is False and after.fingerprint != before.fingerprint
    fresh, _, _ = build(path, tok, None)
    same_data(fresh, after)


@pytest.mark.parametrize("damage", ["flipped token byte", "truncated mask", "meta not JSON", "array missing",
                                    "meta of other inputs"])
def test_a_damaged_entry_is_rebuilt_never_used(tok, tmp_path, capsys, damage):
    cache_dir = tmp_path / "cache"
    first, _, _ = build(TRAIN, tok, cache_dir)
    entry = first.stats["cache"]["path"]
    del first
    if damage == "flipped token byte":
        with open(os.path.join(entry, "input_ids.bin"), "r+b") as f:
            f.seek(1001)
            b = f.read(1)
            f.seek(1001)
            f.write(bytes([b[0] ^ 0x40]))
    elif damage == "truncated mask":
        os.truncate(os.path.join(entry, "loss_mask.bin"), 100)
    elif damage == "meta not JSON":
        open(os.path.join(entry, "meta.json"), "w").write('{"format": 1, "key": ')
    elif damage == "array missing":
        os.unlink(os.path.join(entry, "offsets.bin"))
    else:
        meta = json.load(open(os.path.join(entry, "meta.json")))
        meta["key"] = "0" * 64
        json.dump(meta, open(os.path.join(entry, "meta.json"), "w"))
    capsys.readouterr()
    again = build_dataset(TRAIN, data_cfg(), tok, verbose=True, cache_dir=cache_dir)
    out = capsys.readouterr().out
    assert f"[jaxsft] data cache {entry}: not used (" in out and "); tokenising again" in out
    assert again.stats["cache"]["hit"] is False  # rebuilt and written again
    same_data(build(TRAIN, tok, None)[0], again)
    assert build(TRAIN, tok, cache_dir)[0].stats["cache"]["hit"] is True


def test_an_interrupted_write_leaves_no_entry(tok, tmp_path, monkeypatch):
    """Killed while writing (here: the third array fails): the entry's name never appears; the
    next build writes it. A dead process's temporary directory on this host is removed then."""
    cache_dir = tmp_path / "cache"
    calls = []
    real = data_cache._write_array

    def dies(path, a, *progress):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(path, a, *progress)

    monkeypatch.setattr(data_cache, "_write_array", dies)
    with pytest.raises(KeyboardInterrupt):
        build(TRAIN, tok, cache_dir)
    monkeypatch.setattr(data_cache, "_write_array", real)
    (leftover,) = [p for p in cache_dir.iterdir() if p.name.startswith(".tmp-")]
    key = data_cache.DataCache(cache_dir).key([TRAIN], data_cfg(), tok, "train")
    assert not (cache_dir / key.name).exists()
    dead = cache_dir / leftover.name.replace(f"-{os.getpid()}", "-999999999")
    leftover.rename(dead)
    ds, _, _ = build(TRAIN, tok, cache_dir)
    assert ds.stats["cache"]["hit"] is False and (cache_dir / key.name / "meta.json").exists()
    assert not dead.exists()


def test_an_unusable_cache_directory_only_costs_the_cache(tok, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    ds = build_dataset(TRAIN, data_cfg(), tok, verbose=True, cache_dir=blocker / "cache")
    out = capsys.readouterr().out
    assert f"[jaxsft] data cache {blocker / 'cache'}: cannot be written (Not a directory)" in out
    assert len(ds) == 150 and ds.stats["cache"] is None


BUILD_ONE = """
import os, sys, time
from pathlib import Path
from jaxsft import bundled, config
from jaxsft.data import build_dataset
from jaxsft.hf import load_tokenizer
cache_dir, ready, data_file = sys.argv[1:]
d = config.settings_from({"data.train_files": "/x", "model.partial_pretrain": "/m", "trainer.logger": ["console"],
                          "data.multiturn.enable": True, "data.max_length": 512, "data.truncation": "right"}).data
tok = load_tokenizer(bundled.path("tokenizer"))
(Path(ready) / str(os.getpid())).touch()
while len(os.listdir(ready)) < 2:  # both imported: start together
    time.sleep(0.002)
ds = build_dataset(data_file, d, tok, verbose=True, cache_dir=cache_dir)
print("fingerprint", ds.fingerprint, ds.stats["cache"]["hit"])
"""


@pytest.mark.slow  # over ~5 s on 2 cores: CI's full run, not the ≤ 3-minute inner loop
def test_two_processes_build_one_entry_once(tmp_path):
    """Started at the same moment on one cache: one tokenises and writes, the other waits on the
    entry's lock and reads it; both hold the same data."""
    chats = pq.read_table(TRAIN)
    big = tmp_path / "big.parquet"
    pq.write_table(pa.concat_tables([chats] * 4), big)  # 600 rows: the first takes a while
    ready = tmp_path / "ready"
    ready.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_ONE, str(tmp_path / "cache"), str(ready), str(big)],
                              cwd=ROOT, env=env_for(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = [next(line for line in out.splitlines() if line.startswith("fingerprint")).split() for out in outs]
    assert results[0][1] == results[1][1]
    assert sorted(r[2] for r in results) == ["False", "True"], outs  # one built, one read
    assert any("another process is building it; waiting for it" in out for out in outs), outs
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 1
