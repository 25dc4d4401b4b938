"""The tokenised data set: every row read, checked, tokenised and truncated once, up front (or
read back from the tokenised-data cache, `jaxsft.data.cache`)."""

from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from typing import Any

import numpy as np

from jaxsft.data import cache as data_cache
from jaxsft.data import formats, source
from jaxsft.data.checks import check_loss_tokens, check_vocab
from jaxsft.data.errors import DataWarning, where
from jaxsft.data.samples import Origins, TokenizedDataset  # noqa: F401 (Origins: part of this API)
from jaxsft.data.workers import SliceResult, make_encoder, tokenize_files, worker_count


class Collected:
    """The slices of a build, in order, until they become one data set (in memory or on disk)."""

    def __init__(self):
        self.slices: list[tuple[int, int, SliceResult]] = []

    def add(self, file_index: int, first_row: int, result: SliceResult) -> None:
        self.slices.append((file_index, first_row, result))

    def column(self, name: str, dtype, consume: bool = False) -> np.ndarray:
        """One field of every slice concatenated; `consume` frees each slice's part as it is
        copied (so the build never holds the tokens twice)."""
        parts = [getattr(r, name) for _, _, r in self.slices]
        out = np.empty(sum(len(p) for p in parts), dtype)
        at = 0
        for k, p in enumerate(parts):
            out[at:at + len(p)] = p
            at += len(p)
            if consume:
                setattr(self.slices[k][2], name, None)
                parts[k] = None
        return out

    def origins(self, files: list[str]) -> Origins:
        file_index = np.concatenate([np.full(len(r.lengths), f, np.int32) for f, _, r in self.slices] or
                                    [np.zeros(0, np.int32)])
        rows = np.concatenate([np.arange(a, a + len(r.lengths), dtype=np.int64) for _, a, r in self.slices] or
                              [np.zeros(0, np.int64)])
        return Origins(files, file_index, rows)

    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.column("lengths", np.int64))]).astype(np.int64)

    def to_dataset(self, stats: dict[str, Any]) -> TokenizedDataset:
        offsets, origins = self.offsets(), self.origins(stats["files"])
        return TokenizedDataset(self.column("ids", np.int32, consume=True), self.column("mask", np.int8, consume=True),
                                offsets, origins, stats)


def build_dataset(files, data, tokenizer, *, split: str = "train", verbose: bool | None = None,
                  vocab_size: int | None = None, cache_dir: str | None = None,
                  workers: int | None = None) -> TokenizedDataset:
    """Read, check and tokenise `files` (one path or a list) with the data settings `data`
    (`jaxsft.settings.DataSettings`); print the summary once (on process 0 unless `verbose`
    says otherwise). `vocab_size` (the model's) refuses token ids the model cannot embed.
    `cache_dir`: the tokenised-data cache (read when it holds this exact build, else written);
    None = no cache. `workers`: tokenising processes (default `data.tokenize_workers`; 0 = cores)."""
    t0 = time.perf_counter()
    entries = source.file_list(files)
    shards = formats.expand(entries, "data.train_files" if split == "train" else "data.val_files")
    paths = [p for s in shards for p in s]  # read in this order; errors, origins and the cache key name each
    show = _main_process() if verbose is None else verbose
    encoder = make_encoder(tokenizer, data)  # the template's own problems come first, as ever
    cache = data_cache.DataCache(cache_dir, say=print if show else _quiet, show=show) if cache_dir else None
    key = cache.key(paths, data, tokenizer, split) if cache else None
    with cache.lock(key) if key else nullcontext():
        dataset = cache.load(key, paths, t0) if key else None
        if dataset is not None:
            for message in dataset.stats["warnings"]:
                warnings.warn(message, DataWarning, stacklevel=2)
        else:
            dataset = _tokenize(paths, ", ".join(entries), data, tokenizer, encoder, split, t0,
                                worker_count(data.tokenize_workers if workers is None else workers), show)
            if key:
                dataset = cache.store(key, dataset)
    dataset.stats["entries"] = [(e, len(s)) for e, s in zip(entries, shards)]  # what data.train_weights weighs
    check_vocab(dataset, tokenizer, vocab_size)
    check_loss_tokens(dataset, split=split, raw_loss_tokens=dataset.stats["raw_loss_tokens"],
                      truncated=dataset.stats["raw_lengths"] > dataset.stats["max_length"])
    if show:
        print(summary(dataset), flush=True)
    return dataset


def _tokenize(paths, entries: str, data, tokenizer, encoder, split, t0, workers, show: bool = True) -> TokenizedDataset:
    said: list[str] = []

    def warn(message: str) -> None:
        said.append(message)
        warnings.warn(message, DataWarning, stacklevel=4)

    collected = Collected()
    counts = tokenize_files(paths, data, tokenizer, encoder, limit=data.max_samples(split), workers=workers,
                            add=collected.add, warn=warn, show=show)
    if data.multiturn:
        _chat_warnings(counts, data, tokenizer, encoder, entries, warn)
    raw = collected.column("raw_lengths", np.int64)
    stats = {"rows": int(sum(counts["file_rows"])), "raw_lengths": raw, "truncated": int((raw > data.max_length).sum()),
             "seconds": time.perf_counter() - t0, "files": paths, "split": split, "truncation": data.truncation,
             "max_length": data.max_length, "file_rows": counts["file_rows"], "processes": counts["processes"],
             "raw_loss_tokens": collected.column("raw_loss_tokens", np.int64), "warnings": said, "cache": None,
             "mask_mode": data.mask_mode if data.multiturn else None}
    return collected.to_dataset(stats)


def _chat_warnings(counts, data, tokenizer, encoder, files: str, warn) -> None:
    if counts["mismatched_rows"]:
        warn(f"{counts['mismatched_rows']} row(s) of {files} differ from the whole-conversation rendering; trained on "
             f"the per-message tokens, as verl (data.ignore_input_ids_mismatch=true); data.multiturn.mask_mode=whole_chat "
             f"would train on the conversation as the template renders it")
    dropped = counts["reasoning_dropped_rows"]
    if dropped and data.mask_mode == "whole_chat":
        warn(f"{dropped} row(s) of {files} hold assistant reasoning that the chat template leaves out of the "
             f"conversation (Qwen3's drops it from the turns before the last user message): those turns train on "
             f"their answers only, as the model sees them")
    elif dropped:
        warn(f"{dropped} of those row(s) hold assistant reasoning that the per-message renders drop (a lone assistant "
             f"turn, as Qwen3's template renders it): none of it is trained, as in verl (data.multiturn.mask_mode="
             f"per_message is verl's semantics); data.multiturn.mask_mode=whole_chat trains each turn as the template "
             f"renders it in the conversation, the reasoning of the turns after the last user message included")
    if counts["unprompted_turns"]:
        file, row = counts["unprompted_example"]
        warn(f"{counts['unprompted_turns']} assistant turn(s) of {files} (first: {where(file, row)}) do not "
             f"start with the template's generation prompt {tokenizer.decode(encoder.generation_prompt)!r}; as in "
             f"verl, the first {len(encoder.generation_prompt)} tokens of each are not targets, so "
             f"{counts['untrained_tokens']} of their own tokens are not trained")


def summary(dataset: TokenizedDataset) -> str:
    s = dataset.stats
    raw = s["raw_lengths"]
    p50, p90, p99 = (int(np.percentile(raw, q, method="higher")) for q in (50, 90, 99))
    tokens = int(raw.sum())
    masks = f" ({s['mask_mode']} masks)" if s.get("mask_mode") else ""
    text = (f"[jaxsft] {s['split']} data: {s['rows']} rows from {len(s['files'])} file(s){_entries(s)}; tokens per row "
            f"p50 {p50}, p90 {p90}, p99 {p99}, max {int(raw.max())}; {s['truncated']} row(s) over "
            f"data.max_length={s['max_length']} (truncation={s['truncation']}); "
            f"{int((dataset.loss_tokens == 0).sum())} row(s) with zero loss tokens; "
            f"{int(dataset.loss_tokens.sum())} loss tokens in total{masks}; tokenised {tokens} tokens in {s['seconds']:.2f} s "
            f"({s['rows'] / max(s['seconds'], 1e-9):.0f} rows/s, {tokens / max(s['seconds'], 1e-9):.0f} tokens/s)")
    cached = s.get("cache")
    if cached:
        text += (f"; read from the data cache {cached['path']} in {cached['seconds']:.2f} s" if cached["hit"] else
                 f"; written to the data cache {cached['path']} in {cached['seconds']:.2f} s")
    return text


def _entries(stats) -> str:
    """` of 2 entries` when the entries of data.*_files are not one file each."""
    entries = stats.get("entries") or ()
    return f" of {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}" if any(n != 1 for _, n in entries) else ""


def _quiet(*args, **kwargs) -> None:
    pass


def _main_process() -> bool:
    import sys

    jax = sys.modules.get("jax")  # never import jax just to ask
    return jax is None or jax.process_index() == 0
