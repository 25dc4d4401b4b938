"""The tokenised data set: every row read, checked, tokenised and truncated once, up front."""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from jaxsft.data import source
from jaxsft.data.checks import check_loss_tokens, check_vocab
from jaxsft.data.errors import DataError, DataWarning
from jaxsft.data.tokenize import ChatEncoder, PairEncoder, truncate


class TokenizedDataset:
    """Samples stored back to back: `input_ids` / `loss_mask` of sample i are
    `[offsets[i], offsets[i + 1])` of the flat arrays. Items are the contract's dicts."""

    def __init__(self, input_ids: np.ndarray, loss_mask: np.ndarray, offsets: np.ndarray,
                 origins: list[tuple[str, int]], stats: dict[str, Any] | None = None):
        self.input_ids, self.loss_mask, self.offsets = input_ids, loss_mask, offsets
        self.origins = origins  # (file, row) of each sample
        self.lengths = np.diff(offsets).astype(np.int32)
        # Targets the train step can use: token 0 of a sample has no prediction before it.
        starts = offsets[:-1]
        self.loss_tokens = (np.add.reduceat(loss_mask.astype(np.int64), starts) if len(loss_mask) else
                            np.zeros(len(starts), np.int64)) - loss_mask[starts]
        self.stats = stats or {}

    def __len__(self) -> int:
        return len(self.lengths)

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of sample i's ids and mask."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[a:b], self.loss_mask[a:b]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        ids, mask = self.tokens(i)
        return {"input_ids": ids.astype(np.int32), "loss_mask": mask.astype(np.int32),
                "position_ids": np.arange(len(ids), dtype=np.int32)}

    @classmethod
    def from_samples(cls, samples: list[tuple[np.ndarray, np.ndarray]], origins: list[tuple[str, int]],
                     stats: dict[str, Any] | None = None) -> "TokenizedDataset":
        lengths = np.array([len(ids) for ids, _ in samples], np.int64)
        # One mask entry per token, checked per row: a longer mask would shift every later
        # sample's mask in the flat array (training the next sample's prompt).
        short = np.flatnonzero(lengths != np.array([len(mask) for _, mask in samples], np.int64))
        if short.size:
            file, row = origins[short[0]]
            raise AssertionError(f"{file} row {row}: {lengths[short[0]]} tokens but {len(samples[short[0]][1])} "
                                 f"loss-mask entries (a bug in jaxsft's tokenisation, not in the data)")
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = np.concatenate([s[0] for s in samples]).astype(np.int32)
        mask = np.concatenate([s[1] for s in samples]).astype(np.int8)
        return cls(ids, mask, offsets, origins, stats)


def build_dataset(files, data, tokenizer, *, split: str = "train", verbose: bool | None = None,
                  vocab_size: int | None = None) -> TokenizedDataset:
    """Read, check and tokenise `files` (one path or a list) with the data settings `data`
    (`jaxsft.config.settings.DataSettings`); print the summary once (on process 0 unless `verbose`
    says otherwise). `vocab_size` (the model's) refuses token ids the model cannot embed."""
    t0 = time.perf_counter()
    paths = source.file_list(files)
    max_length, mode = data.max_length, data.truncation
    remaining = data.max_samples(split)
    template_kwargs = dict(data.apply_chat_template_kwargs)
    if data.multiturn:
        encoder = ChatEncoder(tokenizer, template_kwargs, enable_thinking_default=data.enable_thinking_default,
                              ignore_mismatch=data.ignore_input_ids_mismatch)
    else:
        encoder = PairEncoder(tokenizer, template_kwargs)

    samples, origins, raw_lengths, raw_loss_tokens = [], [], [], []
    for path in paths:
        if remaining == 0:
            break
        if data.multiturn:
            rows = source.read_chats(path, messages_key=data.messages_key, tools_key=data.tools_key,
                                     enable_thinking_key=data.enable_thinking_key, limit=remaining)
        else:
            rows = source.read_pairs(path, prompt_key=data.prompt_key, response_key=data.response_key,
                                     prompt_dict_keys=data.prompt_dict_keys, response_dict_keys=data.response_dict_keys,
                                     limit=remaining)
        for r, (ids, mask) in enumerate(encoder.encode(rows, path)):
            raw_lengths.append(len(ids))
            raw_loss_tokens.append(int(mask[1:].sum()))
            samples.append(truncate(ids, mask, max_length, mode, path, r))
            origins.append((path, r))
        if remaining is not None:
            remaining -= len(rows)
    if data.multiturn and encoder.mismatched_rows:
        warnings.warn(f"{encoder.mismatched_rows} row(s) of {', '.join(paths)} differ from the whole-conversation "
                      f"rendering; trained on the per-message tokens (data.ignore_input_ids_mismatch=true)", DataWarning)
    if data.multiturn and encoder.unprompted_turns:
        file, row = encoder.unprompted_example
        warnings.warn(f"{encoder.unprompted_turns} assistant turn(s) of {', '.join(paths)} (first: {file} row {row}) do not "
                      f"start with the template's generation prompt {tokenizer.decode(encoder.generation_prompt)!r}; as in "
                      f"verl, the first {len(encoder.generation_prompt)} tokens of each are not targets, so "
                      f"{encoder.untrained_tokens} of their own tokens are not trained", DataWarning)

    seconds = time.perf_counter() - t0
    raw = np.asarray(raw_lengths, np.int64)
    stats = {"rows": len(samples), "raw_lengths": raw, "truncated": int((raw > max_length).sum()),
             "seconds": seconds, "files": paths, "split": split, "truncation": mode, "max_length": max_length}
    dataset = TokenizedDataset.from_samples(samples, origins, stats)
    check_vocab(dataset, tokenizer, vocab_size)
    check_loss_tokens(dataset, split=split, raw_loss_tokens=np.asarray(raw_loss_tokens, np.int64),
                      truncated=raw > max_length)
    if _main_process() if verbose is None else verbose:
        print(summary(dataset), flush=True)
    return dataset


def summary(dataset: TokenizedDataset) -> str:
    s = dataset.stats
    raw = s["raw_lengths"]
    p50, p90, p99 = (int(np.percentile(raw, q, method="higher")) for q in (50, 90, 99))
    tokens = int(raw.sum())
    return (f"[jaxsft] {s['split']} data: {s['rows']} rows from {len(s['files'])} file(s); tokens per row "
            f"p50 {p50}, p90 {p90}, p99 {p99}, max {int(raw.max())}; {s['truncated']} row(s) over "
            f"data.max_length={s['max_length']} (truncation={s['truncation']}); "
            f"{int((dataset.loss_tokens == 0).sum())} row(s) with zero loss tokens; "
            f"{int(dataset.loss_tokens.sum())} loss tokens in total; tokenised {tokens} tokens in {s['seconds']:.2f} s "
            f"({s['rows'] / max(s['seconds'], 1e-9):.0f} rows/s, {tokens / max(s['seconds'], 1e-9):.0f} tokens/s)")


def _main_process() -> bool:
    import sys

    jax = sys.modules.get("jax")  # never import jax just to ask
    return jax is None or jax.process_index() == 0
