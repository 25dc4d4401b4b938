"""A run's data: the tokenised training and validation sets, the train loader, the step counts
and which steps validate and save."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import numpy as np

from jaxsft import distributed, parallel

from jaxsft.data.dataset import TokenizedDataset, build_dataset
from jaxsft.data.loader import TrainLoader, val_batches


def build_datasets(data, tokenizer, *, vocab_size: int) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """(train, val or None) for the data settings `data`, through the data cache (`data.cache_dir`,
    one builder per job); `vocab_size` (the model's) refuses token ids it cannot embed."""
    train = _build_once(data.train_files, data, tokenizer, split="train", vocab_size=vocab_size)
    val = _build_once(data.val_files, data, tokenizer, split="val", vocab_size=vocab_size) if data.val_files else None
    return train, val


@dataclasses.dataclass
class RunData:
    train: TokenizedDataset
    val: TokenizedDataset | None
    loader: TrainLoader
    total_steps: int  # the schedule's horizon: steps per epoch × epochs (verl)
    last_step: int  # where this run stops: trainer.total_training_steps may stop it earlier (verl)
    val_rows: int  # rows of one validation batch over all devices
    max_length: int
    test_freq: int | str  # trainer.test_freq: N, -1 or after_each_epoch
    save_freq: int | str  # trainer.save_freq

    @classmethod
    def build(cls, settings, train: TokenizedDataset, val: TokenizedDataset | None, *, pad_token_id: int, dp: int,
              process_index: int, process_count: int, max_rows_per_rank: int | None = None, say=print) -> "RunData":
        """The run's data from its tokenised sets (`build_datasets`); `max_rows_per_rank`: the
        packing pre-pass's result when a plan already made it (jaxsft.setup.settle_auto)."""
        d = settings.data
        loader = TrainLoader.for_run(train, settings, dp=dp, pad_token_id=pad_token_id, process_index=process_index,
                                     process_count=process_count, max_rows_per_rank=max_rows_per_rank)
        total = loader.steps_per_epoch * settings.trainer.total_epochs
        last = min(settings.trainer.total_training_steps or total, total)
        say(f"[jaxsft] {len(train)} train samples, {loader.steps_per_epoch} steps/epoch, schedule over {total} steps, "
            f"running to step {last}")
        return cls(train, val, loader, total, last, dp * d.micro_batch_size_per_gpu, d.max_length,
                   settings.trainer.test_freq, settings.checkpoint.save_freq)

    def step_lengths(self) -> np.ndarray:
        """Sample lengths of the step just taken from the loader, over every process."""
        return self.loader.step_lengths(self.loader.next_step - 1)

    def due(self, step: int, stop: bool) -> tuple[bool, bool]:
        """(validate, save) after `step`: every N steps or after each epoch as set, and at the
        last step (a save also when the run is stopping early)."""
        last, epoch_end = step >= self.last_step, step % self.loader.steps_per_epoch == 0

        def on(freq) -> bool:
            return epoch_end if freq == "after_each_epoch" else freq > 0 and step % freq == 0

        return self.val is not None and (last or on(self.test_freq)), last or stop or on(self.save_freq)

    def val_batches(self, mesh) -> Iterator[dict]:
        """Every validation sample once, as global arrays of `[rows, T]` on `mesh`."""
        for batch in val_batches(self.val, rows=self.val_rows, max_length=self.max_length,
                                 pad_token_id=self.loader.pad_token_id, process_index=jax.process_index(),
                                 process_count=jax.process_count()):
            yield distributed.global_batch(batch, parallel.eval_batch_sharding(mesh))


def _build_once(files, data, tokenizer, *, split: str, vocab_size: int):
    """`build_dataset` with the data cache; in a job of several processes, process 0 looks up or
    builds the cache entry while the others wait, then they read it (a shared filesystem) or, if
    they do not see it (each host its own disk), build their own. A data error stops process 0
    first; the others then find no entry and stop with the same error."""
    kwargs = dict(split=split, vocab_size=vocab_size, cache_dir=data.cache_dir)
    if data.cache_dir is None or jax.process_count() == 1:
        return build_dataset(files, data, tokenizer, **kwargs)
    if distributed.is_primary():
        try:
            return build_dataset(files, data, tokenizer, **kwargs)
        finally:
            distributed.barrier(f"jaxsft-data-cache-{split}")
    distributed.barrier(f"jaxsft-data-cache-{split}")
    return build_dataset(files, data, tokenizer, **kwargs)
