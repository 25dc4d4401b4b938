"""The tokenised data set as training reads it: samples stored back to back with their origins
(file, row), built by jaxsft.data.dataset or read back from jaxsft.data.cache."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np


class Origins(Sequence):
    """(file, row) of each sample, held as two arrays (a Python tuple per row would cost more
    memory than the tokens of a short row)."""

    def __init__(self, files: Sequence[str], file_index: np.ndarray, rows: np.ndarray):
        self.files, self.file_index, self.rows = list(files), file_index, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.files[int(self.file_index[i])], int(self.rows[i])


class TokenizedDataset:
    """Samples stored back to back: `input_ids` / `loss_mask` of sample i are
    `[offsets[i], offsets[i + 1])` of the flat arrays. Items are the contract's dicts."""

    def __init__(self, input_ids: np.ndarray, loss_mask: np.ndarray, offsets: np.ndarray,
                 origins: Sequence[tuple[str, int]], stats: dict[str, Any] | None = None, *,
                 loss_tokens: np.ndarray | None = None, max_id: int | None = None, fingerprint: str | None = None):
        """`loss_tokens` / `max_id` / `fingerprint` when known (the cache stores them: computing them
        would read every token page of a memory-mapped set at start)."""
        self.input_ids, self.loss_mask, self.offsets = input_ids, loss_mask, offsets
        self.origins = origins  # (file, row) of each sample
        self.lengths = np.diff(offsets).astype(np.int32)
        if loss_tokens is None:
            # Targets the train step can use: token 0 of a sample has no prediction before it.
            starts = offsets[:-1]
            loss_tokens = (np.add.reduceat(loss_mask, starts, dtype=np.int64) if len(loss_mask) else
                           np.zeros(len(starts), np.int64)) - loss_mask[starts]
        self.loss_tokens = loss_tokens
        self.stats = stats or {}
        self._max_id = max_id
        if fingerprint is not None:
            self.__dict__["fingerprint"] = fingerprint  # the cached_property's own slot: computed already

    def max_id(self) -> int:
        """The largest token id (-1 for no tokens)."""
        if self._max_id is None:
            self._max_id = int(self.input_ids.max()) if len(self.input_ids) else -1
        return self._max_id

    def __len__(self) -> int:
        return len(self.lengths)

    @functools.cached_property
    def fingerprint(self) -> str:
        """The content identity of the tokenised data: a 128-bit blake2b of every sample's length,
        token ids and loss mask, in order. Equal exactly when what training sees is equal (a
        rewritten file with the same row count, another tokenizer or template, other truncation
        all change it). Computed once, on first use; checkpoints record it, caches may key on it."""
        h = hashlib.blake2b(digest_size=16)
        for array, dtype in ((self.offsets, np.int64), (self.input_ids, np.int32), (self.loss_mask, np.int8)):
            h.update(np.ascontiguousarray(array, dtype=dtype).data)
        return h.hexdigest()

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of sample i's ids and mask."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[a:b], self.loss_mask[a:b]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        ids, mask = self.tokens(i)
        return {"input_ids": ids.astype(np.int32), "loss_mask": mask.astype(np.int32),
                "position_ids": np.arange(len(ids), dtype=np.int32)}

    def inputs(self) -> list[str]:
        """The entries of data.train_files / val_files (files, directories, globs), else the files."""
        return [e for e, _ in self.stats["entries"]] if "entries" in self.stats else list(self.stats.get("files", ()))

    def sources(self) -> list[tuple[str, int]]:
        """(entry, rows) of each entry in order, as `data.train_files` listed them (an entry's
        shards together: `data.train_weights` weighs entries)."""
        if "file_rows" in self.stats:
            per_file = list(zip(self.stats["files"], self.stats["file_rows"]))
            out, at = [], 0
            for entry, shards in self.stats.get("entries") or [(f, 1) for f, _ in per_file]:
                out.append((entry, sum(n for _, n in per_file[at:at + shards])))
                at += shards
            return out
        out: list[tuple[str, int]] = []
        for file, _ in self.origins:
            if out and out[-1][0] == file:
                out[-1] = (file, out[-1][1] + 1)
            else:
                out.append((file, 1))
        return out

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
