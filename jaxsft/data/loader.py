"""Training batches with verl's step semantics, and validation batches.

A run is `total_epochs × steps_per_epoch` steps, `steps_per_epoch = floor(N / train_batch_size)`
(the rest of each epoch's permutation is dropped, as verl's drop_last). Epoch e uses a fresh
permutation seeded by (seed, e) (with `data.train_weights`, the weighted mixture of
`jaxsft.data.mixture`); step s of it takes the next `train_batch_size` samples. dp rank r
gets the contiguous block r of those, micro-batch k of a rank the contiguous block k of its
share. A step is a pure function of its index, so resuming needs only that index.

Batches are dicts of int32 `[K, R_local, T]` arrays (contract in docs/CONTRACTS.md); with several
mixed training files (`data.train_weights`) also `source_ids`, each token's file (its index in
data.train_files), from which the step adds up the loss by source. With packing,
each rank's share is packed into a fixed number of rows (`K × micro_batch_size_per_gpu`), the
maximum any step of the run needs, found once by packing every step's lengths up front.

grain provides the iterator: a `MapDataset` over step indices, thread-prefetched, whose JSON
state is the loader's checkpoint.
"""

from __future__ import annotations

import functools
from typing import Iterator

import grain
import numpy as np

from jaxsft.data.dataset import TokenizedDataset
from jaxsft.data import mixture
from jaxsft.data.errors import DataError, at
from jaxsft.data.packing import pack

FIELDS = ("input_ids", "positions", "segment_ids", "loss_mask")
# What the loader state must match on resume, and the settings that decide it.
_FINGERPRINT_KEYS = {"num_samples": "the number of training samples (data.train_files, data.train_max_samples)",
                     "train_batch_size": "data.train_batch_size", "seed": "trainer.seed",
                     "weights": "data.train_weights", "source_rows": "the rows of each of data.train_files"}


@functools.lru_cache(maxsize=4)
def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch (verl draws it with torch's randperm and ignores its seed;
    the order differs, the semantics do not)."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def _empty(shape: tuple[int, ...], pad_token_id: int) -> dict[str, np.ndarray]:
    out = {k: np.zeros(shape, np.int32) for k in FIELDS}
    out["input_ids"].fill(pad_token_id)
    return out


def _fill_row(out: dict[str, np.ndarray], at: tuple[int, ...], dataset: TokenizedDataset, samples,
              source_of: np.ndarray | None = None) -> None:
    """Samples back to back in one row: positions restart at 0, segment ids 1, 2, ... per sample
    (and, with `source_of`, each sample's source index as its tokens' source_ids)."""
    col = 0
    for seg, i in enumerate(samples, start=1):
        ids, mask = dataset.tokens(i)
        n = len(ids)
        out["input_ids"][at][col:col + n] = ids
        out["loss_mask"][at][col:col + n] = mask
        out["positions"][at][col:col + n] = np.arange(n, dtype=np.int32)
        out["segment_ids"][at][col:col + n] = seg
        if source_of is not None:
            out["source_ids"][at][col:col + n] = source_of[i]
        col += n


def _check_lengths(dataset: TokenizedDataset, max_length: int) -> None:
    longest = int(np.argmax(dataset.lengths))
    if dataset.lengths[longest] > max_length:
        file, row = dataset.origins[longest]
        raise DataError(at(file, row, f"{dataset.lengths[longest]} tokens exceed max_length={max_length} "
                                      f"(the data set was built with a larger data.max_length)"))


def local_block(total: int, process_index: int, process_count: int, what: str) -> range:
    """The contiguous block of `total` items (ranks or rows) held by one process."""
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} is outside 0..{process_count - 1}")
    if total % process_count:
        raise DataError(f"{what}={total} is not divisible by the {process_count} processes: "
                        f"each process must hold an equal block of them")
    per = total // process_count
    return range(process_index * per, (process_index + 1) * per)


class TrainLoader:
    def __init__(self, dataset: TokenizedDataset, *, train_batch_size: int, micro_batch_size_per_gpu: int, dp: int,
                 max_length: int, packing: str = "none", seed: int = 0, total_epochs: int = 1, pad_token_id: int = 0,
                 process_index: int = 0, process_count: int = 1, prefetch: int = 2, verbose: bool | None = None,
                 weights=None, max_rows_per_rank: int | None = None):
        """`weights`: one per source file of `dataset` (`data.train_weights`), or None (concatenated).
        `max_rows_per_rank`: the packing pre-pass's result for these settings, when known."""
        # Settings are checked where they are resolved (jaxsft.config); what depends on the data is checked here.
        n, b = len(dataset), micro_batch_size_per_gpu
        per_rank = train_batch_size // dp
        if n < train_batch_size:
            raise DataError(f"data.train_batch_size={train_batch_size} is larger than the {n} training samples: "
                            f"an epoch would have no step (incomplete batches are dropped, as in verl)")
        _check_lengths(dataset, max_length)
        self.sources = dataset.sources()
        self.weights = None if weights is None else tuple(float(w) for w in weights)
        if self.weights is not None:
            _check_weights(self.sources, self.weights)
        # each sample's source when the step reports the loss by source (jaxsft.step.source_count)
        self.source_of = (np.repeat(np.arange(len(self.sources), dtype=np.int32), [n for _, n in self.sources])
                          if self.weights is not None and len(self.sources) > 1 else None)
        self.dataset, self.seed, self.packing, self.pad_token_id = dataset, seed, packing, pad_token_id
        self.train_batch_size, self.micro_batch_size, self.dp, self.max_length = train_batch_size, b, dp, max_length
        self.per_rank = per_rank
        self.steps_per_epoch = n // train_batch_size
        self.total_steps = self.steps_per_epoch * total_epochs
        self.local_ranks = local_block(dp, process_index, process_count, "dp")
        self.rows_per_micro_batch = dp * b  # global rows of one micro-batch
        self.local_rows = len(self.local_ranks) * b
        padded_micro_batches = per_rank // b
        if packing != "none" and max_rows_per_rank is None:
            max_rows_per_rank = self._max_rows_per_rank()
        self.num_micro_batches = padded_micro_batches if packing == "none" else -(-max_rows_per_rank // b)
        self.efficiency = self._efficiency(padded_micro_batches)
        if process_index == 0 if verbose is None else verbose:
            print(self.describe(), flush=True)

        self.data_fingerprint = dataset.fingerprint  # hashed once, here at build
        self._next = 0
        steps = grain.MapDataset.range(self.total_steps).map(self._step)
        self._iter = iter(steps.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)))

    @classmethod
    def for_run(cls, dataset: TokenizedDataset, settings, *, dp: int, pad_token_id: int, process_index: int = 0,
                process_count: int = 1, max_rows_per_rank: int | None = None, verbose: bool | None = None) -> "TrainLoader":
        """The loader of a run with `settings` (`jaxsft.settings.Settings`)."""
        d, t = settings.data, settings.trainer
        return cls(dataset, train_batch_size=d.train_batch_size, micro_batch_size_per_gpu=d.micro_batch_size_per_gpu,
                   dp=dp, max_length=d.max_length, packing=d.packing, seed=t.seed, total_epochs=t.total_epochs,
                   pad_token_id=pad_token_id, process_index=process_index, process_count=process_count,
                   weights=d.train_weights, max_rows_per_rank=max_rows_per_rank, verbose=verbose)

    # ---- what a step holds ----------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Dataset indices of epoch `epoch` in the order its steps take them (its first
        `steps_per_epoch × train_batch_size` entries are used)."""
        if self.weights is None:
            return epoch_permutation(len(self.dataset), self.seed, epoch)
        return mixture.epoch_order(tuple(n for _, n in self.sources), self.weights, self.seed, epoch,
                                   self.steps_per_epoch * self.train_batch_size)

    def step_samples(self, step: int) -> np.ndarray:
        """Dataset indices of global step `step` (0-based over the whole run), in loader order."""
        epoch, s = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[s * self.train_batch_size:(s + 1) * self.train_batch_size]

    def source_counts(self, epoch: int = 0) -> list[tuple[str, int, int, int]]:
        """(file, rows, samples, loss tokens) of each source file in epoch `epoch`'s steps."""
        idx = self.epoch_order(epoch)[:self.steps_per_epoch * self.train_batch_size]
        starts = np.cumsum([0] + [n for _, n in self.sources])
        of = np.searchsorted(starts, idx, side="right") - 1
        samples = np.bincount(of, minlength=len(self.sources))
        loss = np.bincount(of, weights=self.dataset.loss_tokens[idx], minlength=len(self.sources))
        return [(f, n, int(samples[i]), int(loss[i])) for i, (f, n) in enumerate(self.sources)]

    def step_lengths(self, step: int) -> np.ndarray:
        """Token counts of all samples of step `step`, whichever process holds their rows: the
        same on every process (throughput and MFU count the whole job's work)."""
        return self.dataset.lengths[self.step_samples(step)]

    def rank_rows(self, share: np.ndarray) -> list[list[int]]:
        """One rank's rows (lists of dataset indices) for its share of a step, in row order."""
        if self.packing == "none":
            return [[int(i)] for i in share]
        return [[int(share[p]) for p in row] for row in pack(self.dataset.lengths[share], self.max_length, self.packing)]

    def _max_rows_per_rank(self) -> int:
        most = 0
        for step in range(self.total_steps):
            idx = self.step_samples(step)
            for r in range(self.dp):
                share = idx[r * self.per_rank:(r + 1) * self.per_rank]
                most = max(most, len(pack(self.dataset.lengths[share], self.max_length, self.packing)))
        return most

    def _step(self, step: int) -> tuple[int, dict[str, np.ndarray]]:
        k_total, b = self.num_micro_batches, self.micro_batch_size
        out = _empty((k_total, self.local_rows, self.max_length), self.pad_token_id)
        if self.source_of is not None:
            out["source_ids"] = np.zeros_like(out["segment_ids"])
        idx = self.step_samples(step)
        for lr, r in enumerate(self.local_ranks):
            rows = self.rank_rows(idx[r * self.per_rank:(r + 1) * self.per_rank])
            if len(rows) > k_total * b:
                raise AssertionError(f"step {step} rank {r} needs {len(rows)} rows; the run was planned for {k_total * b}")
            for q, samples in enumerate(rows):
                k, j = divmod(q, b)
                _fill_row(out, (k, lr * b + j), self.dataset, samples, self.source_of)
        return step // self.steps_per_epoch, out

    # ---- efficiency report ------------------------------------------------------------------------

    def _efficiency(self, padded_micro_batches: int) -> dict[str, float]:
        real = loss = 0
        used = self.steps_per_epoch * self.train_batch_size
        for epoch in range(self.total_steps // self.steps_per_epoch):
            idx = self.epoch_order(epoch)[:used]
            real += int(self.dataset.lengths[idx].sum())
            loss += int(self.dataset.loss_tokens[idx].sum())
        slots = self.total_steps * self.rows_per_micro_batch * self.max_length
        return {"real_tokens": real / (slots * self.num_micro_batches), "loss_tokens": loss / (slots * self.num_micro_batches),
                "padded_real_tokens": real / (slots * padded_micro_batches),
                "padded_loss_tokens": loss / (slots * padded_micro_batches)}

    def describe(self) -> str:
        e = self.efficiency
        text = (f"[jaxsft] batches: {self.steps_per_epoch} steps/epoch of {self.train_batch_size} samples; each step "
                f"[{self.num_micro_batches} micro-batches, {self.rows_per_micro_batch} rows, {self.max_length} tokens] "
                f"(packing={self.packing}); of the row tokens, {e['real_tokens']:.1%} hold samples and "
                f"{e['loss_tokens']:.1%} are loss tokens")
        if self.packing != "none":
            text += f" (padded: {e['padded_real_tokens']:.1%} and {e['padded_loss_tokens']:.1%})"
        if len(self.sources) > 1:
            mix = "weights " + ":".join(f"{w:g}" for w in self.weights) if self.weights else "concatenated"
            text += f"; epoch 0 from the {len(self.sources)} files ({mix}): " + "; ".join(
                f"{f} {k} samples of {n} rows ({k / max(n, 1):.2f}x), {loss} loss tokens"
                for f, n, k, loss in self.source_counts(0))
        return text

    # ---- iterator and checkpoint state ------------------------------------------------------------

    def __iter__(self) -> "TrainLoader":
        return self

    @property
    def next_step(self) -> int:
        """The step (0-based over the run) that `next()` yields next."""
        return self._next

    def __next__(self) -> tuple[int, dict[str, np.ndarray]]:
        epoch, batch = next(self._iter)
        self._next += 1
        return epoch, batch

    def _fingerprint(self) -> dict:
        out = {"num_samples": len(self.dataset), "train_batch_size": self.train_batch_size, "seed": self.seed}
        if self.weights is not None:  # only then: states saved before weights existed still load
            out.update(weights=list(self.weights), source_rows=[n for _, n in self.sources])
        return out

    def get_state(self) -> dict:
        """JSON-able. After the last step of epoch e it reads "epoch e+1, step 0" (verl #7401)."""
        epoch, s = divmod(self._next, self.steps_per_epoch)
        return {"next_step": self._next, "epoch": epoch, "step_in_epoch": s, **self._fingerprint(),
                "data_fingerprint": self.data_fingerprint, "grain": self._iter.get_state()}

    def set_state(self, state: dict, *, accept_changed_data: bool = False, say=print) -> None:
        """Continue from `state` (`get_state` of the run that saved it). Other rows, batch or seed
        are refused; other tokens too (the data's fingerprint) unless `accept_changed_data`
        (trainer.resume_accept_changed_data). States saved before the fingerprint existed lack it."""
        saved, here = {k: state.get(k) for k in self._fingerprint()}, self._fingerprint()
        differ = [f"{_FINGERPRINT_KEYS[k]} gives {here[k]} here, {saved[k]} when it was saved" for k in here
                  if saved[k] != here[k]]
        if differ:
            raise DataError(f"the data-loader state of this checkpoint does not fit this run: {'; '.join(differ)}; "
                            f"resuming would replay a different sample order: resume with the settings that saved "
                            f"it, or choose another trainer.default_local_dir to start fresh")
        theirs = state.get("data_fingerprint")
        if theirs is not None and theirs != self.data_fingerprint:
            what = (f"{', '.join(self.dataset.inputs()) or 'the training data'}: the tokenised training "
                    f"data differs from the data this checkpoint was trained on (same {len(self.dataset)} rows, other "
                    f"tokens or loss masks; fingerprint {theirs[:12]} there, {self.data_fingerprint[:12]} here)")
            if not accept_changed_data:
                raise DataError(f"{what}; resuming would continue its sample order over other samples: set "
                                f"trainer.resume_accept_changed_data=true if that is meant, or choose another "
                                f"trainer.default_local_dir to start fresh")
            say(f"[jaxsft] note: {what}; resuming on it (trainer.resume_accept_changed_data=true)")
        self._iter.set_state(state["grain"])
        self._next = int(state["next_step"])


def _check_weights(sources: list[tuple[str, int]], weights: tuple[float, ...]) -> None:
    if len(weights) != len(sources):
        raise DataError(f"data.train_weights has {len(weights)} weight(s) for {len(sources)} training files: give one "
                        f"weight per file of data.train_files, in the same order")
    for (file, n), w in zip(sources, weights):
        if n == 0:
            raise DataError(f"data.train_weights gives {file} the weight {w:g}, but none of its rows is in the training "
                            f"set (data.train_max_samples keeps the first rows of the files in order): raise "
                            f"data.train_max_samples or leave the file out")


def val_batches(dataset: TokenizedDataset, *, rows: int, max_length: int, pad_token_id: int = 0,
                process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every sample exactly once, one per row, in data-set order: `[rows_local, T]` dicts. The last
    batch is completed with empty rows (segment 0, no loss). verl drops the leftovers instead."""
    mine = local_block(rows, process_index, process_count, "rows")
    _check_lengths(dataset, max_length)
    for start in range(0, len(dataset), rows):
        out = _empty((len(mine), max_length), pad_token_id)
        for j, g in enumerate(mine):
            if start + g < len(dataset):
                _fill_row(out, (j,), dataset, [start + g])
        yield out


def segment_lengths(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Lengths of all samples (non-zero segments) in a batch of any leading shape."""
    seg = np.asarray(batch["segment_ids"])
    seg = seg.reshape(-1, seg.shape[-1])
    keys = (np.arange(len(seg))[:, None] * (seg.shape[-1] + 1) + seg)[seg != 0]
    counts = np.bincount(keys)
    return counts[counts > 0]
